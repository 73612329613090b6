"""Argument checks shared by the tasks, the models and the config validation (no torch): each error names
the argument, the value it got and the bound it breaks, so a bad Hydra override fails with a message that
says what to fix.

Keyword names: :func:`accepted_keywords` (what a callable, a class or a task's dataclass ``config_cls``
accepts), :func:`unknown_keys_message` / :func:`check_keywords` (the one "unknown key, did you mean"
error).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = [
    "check_int",
    "check_float",
    "check_bool",
    "check_choice",
    "check_positive_int",
    "check_positive_float",
    "check_open_unit",
    "accepted_keywords",
    "suggest",
    "unknown_keys_message",
    "check_keywords",
    "check_optional_positive_int",
    "check_non_negative_float",
    "check_patterns",
    "check_position_spec",
    "check_callable",
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


def check_optional_positive_int(name: str, value: Any) -> int | None:
    """``None`` (no cap) or a positive int."""
    return None if value is None else check_positive_int(name, value)


def check_non_negative_float(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_patterns(name: str, value: Any) -> list[str] | None:
    """``None`` or ``fnmatch`` patterns: a list of strings, or one string (one pattern, not its letters)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    try:
        patterns = list(value)
    except TypeError:
        raise ValueError(f"{name} must be a pattern or a list of patterns, got {value!r}") from None
    if not all(isinstance(v, str) for v in patterns):
        raise ValueError(f"{name} must hold strings (fnmatch patterns), got {patterns!r}")
    return patterns or None


def check_position_spec(name: str, value: Any, auto: bool = False) -> Any:
    """A positions argument: ``None`` or ``"all"`` (all), a positive int count, a list of ints >= 0
    (``"auto"`` too where ``auto``)."""
    if value is None or (auto and value in ("auto", "all")):  # (the monitor's check_limits reads "all")
        return value
    if value == "all":
        return None
    if isinstance(value, str) or isinstance(value, bool) or isinstance(value, float):
        allowed = (
            "None, 'auto', a positive int or a list of ints"
            if auto
            else "None, a positive int or a list of ints"
        )
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    if isinstance(value, int):
        return check_positive_int(name, value)
    items = list(value)
    if not items or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in items):
        raise ValueError(f"{name} must be a non-empty list of ints >= 0, got {items!r}")
    return items


def check_callable(name: str, value: Any) -> Any:
    """``None`` or a callable."""
    if value is not None and not callable(value):
        raise ValueError(f"{name} must be callable (or None), got {type(value).__name__} {value!r}")
    return value


# --------------------------------------------------------------------------- keyword names


def accepted_keywords(target: Any) -> tuple[frozenset[str], bool]:
    """Keyword names ``target`` accepts, and whether it takes ``**kwargs``.

    ``target`` is a callable or a class (its constructor, ``self`` left out); a class with a dataclass
    ``config_cls`` (the task data modules) accepts that dataclass's fields, and a dataclass its init fields.
    """
    config_cls = getattr(target, "config_cls", None)
    if config_cls is not None and dataclasses.is_dataclass(config_cls):
        return frozenset(f.name for f in dataclasses.fields(config_cls) if f.init), False
    if isinstance(target, type) and dataclasses.is_dataclass(target):
        return frozenset(f.name for f in dataclasses.fields(target) if f.init), False
    names: set[str] = set()
    var_kw = False
    for p in inspect.signature(target).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.add(p.name)
    names.discard("self")
    return frozenset(names), var_kw


def _closest(key: str, valid: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(key, sorted(valid), n=1)
    return close[0] if close else None


def suggest(key: str, valid: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest valid name, or ``""``."""
    close = _closest(key, valid)
    return f" (did you mean '{close}'?)" if close else ""


def unknown_keys_message(unknown: Sequence[str], accepted: Iterable[str], where: str = "") -> str:
    """``unknown key 'n_layer' for SequenceModel (did you mean 'n_layers'?); valid keys: a, b`` (several
    keys: ``unknown keys ['a', 'b'] ...`` with a suggestion for each that has one)."""
    valid = sorted(accepted)
    unknown = sorted(unknown)
    where = f" {where}" if where else ""
    if len(unknown) == 1:
        head = f"unknown key {unknown[0]!r}{where}{suggest(unknown[0], valid)}"
    else:
        hints = [f"'{c}' for {k!r}" for k in unknown if (c := _closest(k, valid))]
        head = f"unknown keys {unknown}{where}" + (f" (did you mean {', '.join(hints)}?)" if hints else "")
    return f"{head}; valid keys: {', '.join(valid)}"


def check_keywords(
    given: Iterable[str],
    target: Any = None,
    *,
    accepted: Iterable[str] | None = None,
    where: str = "",
    error: Callable[[str], Exception] = ValueError,
) -> None:
    """Raise ``error(message)`` (:func:`unknown_keys_message`) for names in ``given`` that ``target``
    (see :func:`accepted_keywords`) or the explicit ``accepted`` names do not accept; nothing is unknown
    to a target taking ``**kwargs``."""
    if accepted is None:
        names, var_kw = accepted_keywords(target)
        if var_kw:
            return
    else:
        names = frozenset(accepted)
    unknown = [k for k in given if k not in names]
    if unknown:
        raise error(unknown_keys_message(unknown, names, where))
