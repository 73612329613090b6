"""fla's adapter tests, in the environment fla is installed in: ``.fla-env`` (README's install command).

fla and triton are kept out of the main environment (with fla importable, transformers routes Qwen3-Next to
fla's GPU kernels, and its CPU forward fails), so ``tests/adapters/test_adapters_fla.py`` runs here in a
subprocess with ``.fla-env`` first on ``PYTHONPATH``, and every one of its tests must pass there.
"""

from __future__ import annotations

import pytest

from tests.fla_env import FLA_ENV, INSTALL, env_with_fla_env, run_pytest_passes

pytestmark = pytest.mark.slow  # starts processes or trains (the fast lane: -m 'not slow')


def test_fla_adapters_pass_in_the_fla_environment() -> None:
    try:
        import fla.layers  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("fla imports in this environment: tests/adapters/test_adapters_fla.py runs in-process")
    assert (FLA_ENV / "fla").is_dir(), f"no fla in {FLA_ENV}: run README's install ({INSTALL})"
    run_pytest_passes(["tests/adapters/test_adapters_fla.py"], env_with_fla_env(), 20)
