"""Positions: one value for "which positions" (None, a count, a list) and the per-position rank bound."""

from __future__ import annotations

import pytest

from ess_train.measure import position_bounds, resolve_positions


def test_resolve_positions():
    assert resolve_positions(None, 10) is None
    assert resolve_positions(3, 10) == [1, 5, 9]
    assert resolve_positions(50, 5) == [1, 2, 3, 4]
    assert resolve_positions([3, 1, 3], 5) == [1, 3]
    with pytest.raises(ValueError):
        resolve_positions([7], 5)


def test_position_bounds():
    assert position_bounds(4, 12, None) == [0, 1, 2, 3, 4, 4, 4, 4, 4, 3, 2, 1]
    assert position_bounds(16, 32, [0, 1, 16, 31]) == [0, 1, 16, 1]
    assert position_bounds(0, 12, None) == [0] * 12
