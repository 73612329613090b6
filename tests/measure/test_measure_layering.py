"""ess_train.measure sits below Lightning: it imports torch, the engine, the protocol, the adapters and the
argument checks, nothing above; the adapters sit below measure and import transformers only on use."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import ess_train.measure as measure

ROOT = Path(__file__).resolve().parents[2]
# ess_train.checks: the torch-free argument checks (it imports nothing of ess_train), below every layer
ALLOWED = (
    "ess_train.ess",
    "ess_train.models.protocol",
    "ess_train.measure",
    "ess_train.checks",
    "ess_train.adapters",
)
# the adapters: below measure (measure finds layers through them), above the protocol
ADAPTERS_ALLOWED = ("ess_train.ess", "ess_train.models.protocol", "ess_train.adapters", "ess_train.checks")


def test_importing_measure_does_not_import_lightning():
    code = (
        "import sys, ess_train.measure\n"
        "found = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'lightning_fabric', 'pytorch_lightning'))\n"
        "assert 'lightning' not in sys.modules and not found, found\n"
        "assert 'transformers' not in sys.modules, 'importing measure loaded transformers'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _module_imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_adapters_import_only_the_engine_and_the_protocol():
    for path in sorted((ROOT / "ess_train" / "adapters").glob("*.py")):
        for name in _module_imports(path):
            if name.split(".")[0] in ("ess_train", "lightning", "lightning_fabric", "pytorch_lightning"):
                assert name.startswith(ADAPTERS_ALLOWED), f"adapters/{path.name} imports {name}"


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
