"""ess_train.measure sits below Lightning: it imports torch, the engine, the protocol and the argument checks,
nothing above."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import ess_train.measure as measure

ROOT = Path(__file__).resolve().parent.parent
# ess_train.checks: the torch-free argument checks (it imports nothing of ess_train), below every layer
ALLOWED = ("ess_train.ess", "ess_train.models.protocol", "ess_train.measure", "ess_train.checks")


def test_importing_measure_does_not_import_lightning():
    code = (
        "import sys, ess_train.measure\n"
        "found = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'lightning_fabric', 'pytorch_lightning'))\n"
        "assert 'lightning' not in sys.modules and not found, found\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_measure_imports_only_the_engine_and_the_protocol():
    for path in sorted((ROOT / "ess_train" / "measure").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in ("ess_train", "lightning", "lightning_fabric", "pytorch_lightning"):
                    assert name.startswith(ALLOWED), f"{path.name} imports {name}"


def test_public_names_are_exported():
    assert all(hasattr(measure, name) for name in measure.__all__)
    from ess_train.callbacks import ESSWarning, ess_penalty

    assert ESSWarning is measure.ESSWarning and ess_penalty is measure.ess_penalty
