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
