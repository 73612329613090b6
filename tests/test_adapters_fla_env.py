"""fla's adapter tests, in the environment fla is installed in: ``.fla-env`` (README's install command).

fla and triton are kept out of the main environment (with fla importable, transformers routes Qwen3-Next to
fla's GPU kernels, and its CPU forward fails), so ``tests/test_adapters_fla.py`` runs here in a subprocess
with ``.fla-env`` first on ``PYTHONPATH``, and every one of its tests must pass there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLA_ENV = ROOT / ".fla-env"
INSTALL = (
    "pip install --target .fla-env --no-deps flash-linear-attention==0.6.0 fla-core==0.6.0 einops "
    "triton==3.9.0"
)


def test_fla_adapters_pass_in_the_fla_environment() -> None:
    try:
        import fla.layers  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("fla imports in this environment: tests/test_adapters_fla.py runs in-process")
    assert (FLA_ENV / "fla").is_dir(), f"no fla in {FLA_ENV}: run README's install ({INSTALL})"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(FLA_ENV), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_adapters_fla.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    tail = done.stdout[-3000:] + done.stderr[-2000:]
    assert done.returncode == 0, tail
    summary = done.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 20, summary
    assert not re.search(r"skipped|failed|error", summary), summary
