"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["scan", "segments"])
def gramian_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Force the Gramian path's strategy for diagonal transitions, so that a test exercises both the
    full scan and the segment path (``ess_train.ess.gramian.use_segments`` picks one by cost otherwise)."""
    import ess_train.ess.gramian as gramian

    force = request.param == "segments"
    monkeypatch.setattr(gramian, "use_segments", lambda n_pos, L: force)
    return request.param


def _fla_imports() -> bool:
    try:  # fla needs triton even to import
        import fla.layers  # noqa: F401
    except ImportError:
        return False
    return True


# fla's adapter tests need fla, which lives apart (.fla-env: installed in the main environment it would make
# transformers route Qwen3-Next to fla's GPU kernels): where it does not import, test_adapters_fla_env.py
# runs that file in a subprocess with .fla-env on the path.
collect_ignore = [] if _fla_imports() else ["test_adapters_fla.py"]
