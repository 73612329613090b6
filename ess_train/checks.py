"""Argument checks shared by the tasks and the mixers (no torch): each error names the argument, the value
it got and the bound it breaks, so a bad Hydra override fails with a message that says what to fix."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "check_int",
    "check_float",
    "check_bool",
    "check_choice",
    "check_positive_int",
    "check_positive_float",
    "check_open_unit",
]


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None, why: str = "") -> int:
    """An integer (not a bool) in ``[low, high]``; ``why`` is appended to a bound's error."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name}={value} must be >= {low}{why}")
    if high is not None and value > high:
        raise ValueError(f"{name}={value} must be <= {high}{why}")
    return value


def check_float(
    name: str, value: Any, low: float, high: float, low_open: bool = False, high_open: bool = False
) -> float:
    """A real number (not NaN) in an interval, open or closed at each end."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    bad_low = value <= low if low_open else value < low
    bad_high = value >= high if high_open else value > high
    if bad_low or bad_high or math.isnan(value):
        lb, hb = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name}={value} must lie in {lb}{low}, {high}{hb}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_positive_float(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_open_unit(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a number in the open interval (0, 1), got {value!r}")
    return float(value)
