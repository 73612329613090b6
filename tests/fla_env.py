"""Running tests in ``.fla-env`` (README's second install: flash-linear-attention and triton, kept out of the
main environment): the environment to run them in and a pytest subprocess whose every test must pass."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLA_ENV = ROOT / ".fla-env"
INSTALL = (
    "pip install --target .fla-env --no-deps flash-linear-attention==0.6.0 fla-core==0.6.0 einops "
    "triton==3.9.0"
)


def env_with_fla_env(**extra: str) -> dict[str, str]:
    """This environment with ``.fla-env`` first on ``PYTHONPATH`` (then the repository, for ``tests``);
    ``TRITON_INTERPRET`` only where ``extra`` sets it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(FLA_ENV), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**env, **extra}


def run_pytest_passes(args: list[str], env: dict[str, str], min_passed: int) -> None:
    """``pytest -q <args>`` in a subprocess from the repository root: it exits 0, at least ``min_passed``
    tests pass and none is skipped, failed or in error."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *args],
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
    assert passed and int(passed.group(1)) >= min_passed, summary
    assert not re.search(r"skipped|failed|error", summary), summary
