"""The fused Triton scan (``ess_train.models.ops.triton_scan``) and the Mamba mixer's ``scan_backend``.

Triton lives in ``.fla-env`` (README's fla install), not in the main environment, so its cases
(``tests/triton_scan_cases.py``: outputs and gradients against ``mamba_scan`` and the token-by-token
reference, the mixer end to end) run in a subprocess with ``.fla-env`` first on ``PYTHONPATH``: under
Triton's CPU interpreter (``TRITON_INTERPRET=1``), and compiled with ``--device cuda``. Here: the backend
choice, the CPU default, the error without the interpreter, and that importing ``ess_train`` never imports
triton.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ess_train.models.mixers.mamba import Mamba
from ess_train.models.ops.triton_scan import select_scan_backend
from tests.fla_env import FLA_ENV, INSTALL, ROOT, env_with_fla_env, run_pytest_passes

CASES = "tests/triton_scan_cases.py"
N_CASES = 13  # the tests in CASES, all of which must pass


def env_with_triton(**extra: str) -> dict[str, str]:
    """This environment with ``.fla-env`` (where triton is) first on ``PYTHONPATH``."""
    return env_with_fla_env(**extra)


def run_cases(env: dict[str, str]) -> None:
    """``pytest CASES`` in a subprocess (no conftest: it would import fla); every case must pass."""
    run_pytest_passes(["--noconftest", CASES], env, N_CASES)


@pytest.mark.slow
def test_triton_scan_cases_pass_under_the_interpreter() -> None:
    assert (FLA_ENV / "triton").is_dir(), f"no triton in {FLA_ENV}: {INSTALL}"
    run_cases(env_with_triton(TRITON_INTERPRET="1"))


def test_triton_scan_cases_pass_on_cuda(device: torch.device) -> None:
    """``--device cuda``: the same cases, compiled for the GPU (triton from here or from ``.fla-env``)."""
    if device.type != "cuda":
        pytest.skip("the compiled kernel needs --device cuda (on CPU its cases run under the interpreter)")
    run_cases(env_with_triton())


def test_importing_ess_train_never_imports_triton() -> None:
    """Triton importable, a Mamba built and run on CPU (``scan_backend="auto"``): triton stays unloaded."""
    code = (
        "import sys, torch, ess_train, ess_train.models.ops\n"
        "from ess_train.models.mixers.mamba import Mamba\n"
        "Mamba(4, d_state=2)(torch.randn(1, 3, 4))\n"
        "import importlib.util; assert importlib.util.find_spec('triton'), 'triton not importable'\n"
        "assert 'triton' not in sys.modules, sorted(m for m in sys.modules if 'triton' in m)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env_with_triton(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def test_scan_backend_is_one_of_the_choices() -> None:
    with pytest.raises(ValueError, match=r"scan_backend must be one of \('auto', 'torch', 'triton'\)"):
        Mamba(4, d_state=2, scan_backend="cuda")
    with pytest.raises(ValueError, match="scan_backend must be one of"):
        select_scan_backend("fused", torch.device("cpu"))


def test_cpu_default_is_the_torch_path() -> None:
    cpu = torch.device("cpu")
    assert select_scan_backend("auto", cpu) == select_scan_backend("torch", cpu) == "torch"
    assert select_scan_backend("torch", torch.device("cuda")) == "torch"
    torch.manual_seed(0)
    m_auto = Mamba(4, d_state=3)
    torch.manual_seed(0)
    m_torch = Mamba(4, d_state=3, scan_backend="torch")
    assert m_auto.scan_backend == "auto"
    x = torch.randn(2, 9, 4)
    assert torch.equal(m_auto(x), m_torch(x))


def test_triton_backend_on_cpu_without_the_interpreter_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    m = Mamba(4, d_state=2, scan_backend="triton")  # the device is known at the forward only
    with pytest.raises(ValueError, match="scan_backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1"):
        m(torch.randn(1, 3, 4))
