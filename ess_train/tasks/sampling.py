"""Seeding and vectorized samplers of the synthetic tasks: every draw comes from a ``torch.Generator``
seeded from the master seed and a path of names (:func:`make_generator`), never the global RNG."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "derive_seed",
    "make_generator",
    "randint",
    "sample_distinct",
    "weighted_sample_distinct",
    "first_occurrence",
]


def derive_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed from the master seed and a path of names (stable across runs and platforms)."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int, *parts: Any) -> torch.Generator:
    """A CPU torch.Generator seeded with ``derive_seed(seed, *parts)`` (never the global RNG)."""
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, *parts))
    return g


def randint(high: int | Tensor, size: tuple[int, ...], g: torch.Generator) -> Tensor:
    """Uniform integers in [0, high); ``high`` may be a tensor broadcastable to ``size``."""
    if math.prod(size) == 0:
        return torch.zeros(size, dtype=torch.long)
    if isinstance(high, Tensor):
        return (torch.rand(size, generator=g, dtype=torch.float64) * high).long().clamp_(max=high - 1)
    return torch.randint(int(high), size, generator=g)


def sample_distinct(pool: int, k: int, n: int, g: torch.Generator, exclude: Tensor | None = None) -> Tensor:
    """``[n, k]`` integers from ``[0, pool)``, distinct within a row, in uniformly random order.

    ``exclude``: ``[n, m]`` values (distinct within a row, inside the pool) that rows must avoid.
    Sequential insertion (draw a rank among the remaining values, then step over the taken ones in
    ascending order): ``O(k (k + m))`` vector operations, no loop over rows.
    """
    m = 0 if exclude is None else exclude.shape[1]
    if k + m > pool:
        raise ValueError(f"cannot draw {k} distinct values from {pool - m}")
    if k == 0:
        return torch.zeros(n, 0, dtype=torch.long)
    if exclude is None and k * k > 8 * pool:
        return torch.rand(n, pool, generator=g).argsort(dim=1)[:, :k]
    if k + m <= 8:
        # few values: v = u + #{taken <= v} by fixed-point iteration (no sorting)
        taken = torch.zeros(n, 0, dtype=torch.long) if exclude is None else exclude.long()
        out = []
        for j in range(k):
            u = randint(pool - m - j, (n,), g)
            v = u
            for _ in range(taken.shape[1]):
                v = u + (taken <= v[:, None]).sum(dim=1)
            out.append(v)
            taken = torch.cat([taken, v[:, None]], dim=1)
        return torch.stack(out, dim=1)
    taken = torch.zeros(n, 0, dtype=torch.long) if exclude is None else exclude.long().sort(dim=1).values
    out = []
    for j in range(k):
        u = randint(pool - m - j, (n,), g)
        for c in range(taken.shape[1]):
            u += (u >= taken[:, c]).long()
        out.append(u)
        taken = torch.cat([taken, u[:, None]], dim=1).sort(dim=1).values
    return torch.stack(out, dim=1)


def weighted_sample_distinct(log_weights: Tensor, k: int, n: int, g: torch.Generator) -> Tensor:
    """``[n, k]`` indices drawn without replacement with probabilities proportional to
    ``exp(log_weights)``, in draw order (Gumbel-top-k; the same law as sequential draws)."""
    u = torch.rand(n, log_weights.numel(), generator=g, dtype=torch.float64).clamp_(min=1e-300)
    scores = log_weights.to(torch.float64) - torch.log(-torch.log(u))
    return scores.topk(k, dim=1, sorted=True).indices


def first_occurrence(codes: Tensor) -> Tensor:
    """For ``codes [n, S]``, the column index of the first occurrence of each entry's value in its row."""
    n, s = codes.shape
    sorted_codes, order = torch.sort(codes, dim=1, stable=True)
    is_start = torch.ones_like(sorted_codes, dtype=torch.bool)
    is_start[:, 1:] = sorted_codes[:, 1:] != sorted_codes[:, :-1]
    ar = torch.arange(s).expand(n, s)
    start_pos = torch.where(is_start, ar, torch.zeros_like(ar)).cummax(dim=1).values
    first_sorted = order.gather(1, start_pos)
    return torch.empty_like(order).scatter_(1, order, first_sorted)
