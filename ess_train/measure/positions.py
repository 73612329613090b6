"""Which positions ESS is evaluated at, and the per-position rank bound there.

One value says "which positions" (:data:`PositionSpec`: all, a count, or a list) everywhere a model is
measured; :func:`resolve_positions` turns it into positions for a sequence length, and
:func:`position_bounds` gives the bound ``b_i = min(per_operator, i, L - i)`` that utilization divides by.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence

import torch

__all__ = ["PositionSpec", "resolve_positions", "position_bounds"]

PositionSpec = int | Sequence[int] | None


def resolve_positions(spec: PositionSpec, seq_len: int) -> list[int] | None:
    """Positions at which ESS is evaluated.

    ``None``: all ``seq_len`` positions (``0..L-1``, returned as ``None``); an ``int`` ``k``: ``k`` evenly
    spaced positions in ``[1, L-1]`` (``ESS_0`` is always 0, so it is left out); a sequence of ints: those
    positions. A float is refused even where it is whole (``16.0``): a count is an int, and a list entry
    such as ``4.7`` would otherwise be truncated to a position nobody asked for.
    """
    if spec is None:
        return None
    if isinstance(spec, bool):
        raise TypeError("positions must be None, an int count or a sequence of ints, got a bool")
    if isinstance(spec, float):
        raise TypeError(
            f"positions must be None, an int count or a sequence of ints, got the float {spec!r}"
            + (f" (pass {int(spec)})" if spec.is_integer() else "")
        )
    if isinstance(spec, (str, bytes)) or not isinstance(spec, (numbers.Integral, Iterable)):
        raise TypeError(
            f"positions must be None, an int count or a sequence of ints, got {type(spec).__name__} {spec!r}"
        )
    if isinstance(spec, numbers.Integral):
        spec = int(spec)
        if spec <= 0:
            raise ValueError(f"positions count must be >= 1, got {spec}")
        if seq_len <= 1:
            return [0]
        if spec >= seq_len - 1:
            return list(range(1, seq_len))
        pos = torch.linspace(1, seq_len - 1, spec).round().long().unique()
        return [int(p) for p in pos]
    items = list(spec)
    bad = [
        p
        for p in items
        if isinstance(p, bool)
        or not isinstance(p, (numbers.Integral, torch.Tensor))
        or (isinstance(p, torch.Tensor) and (p.numel() != 1 or p.is_floating_point()))
    ]
    if bad:
        raise TypeError(f"positions must be ints, got {bad[:3]!r} in {items[:8]!r}")
    pos = sorted({int(p) for p in items})
    if not pos:
        raise ValueError("positions must not be empty")
    if pos[0] < 0 or pos[-1] >= seq_len:
        raise ValueError(f"positions must lie in [0, {seq_len - 1}] for seq_len={seq_len}, got {pos}")
    return pos


def position_bounds(per_operator: int, seq_len: int, positions: list[int] | None) -> list[int]:
    """Per-position bound on ``rank(H_i)`` of one operator: ``b_i = min(per_operator, i, L - i)``.

    ``H_i = T[i:, :i]`` has ``i`` columns and ``L - i`` rows, so ``b_0 = 0`` whatever the layer;
    ``per_operator`` is the layer's own cap (``StateSize.per_operator``: ``d`` for linear attention,
    ``N`` for Mamba, ``w - 1`` for sliding-window attention, ``L // 2`` for softmax attention, which
    makes ``b_i = min(i, L - i)``). ``positions=None``: all ``0..L-1``.
    """
    pos = range(seq_len) if positions is None else positions
    return [max(0, min(int(per_operator), int(i), seq_len - int(i))) for i in pos]
