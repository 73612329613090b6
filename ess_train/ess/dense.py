"""Hankel singular values of a dense causal ``T``: ``torch.linalg.svdvals`` of every ``H_i``, batched.

Positions are processed in chunks. A chunk of positions ``i0 <= i <= i1`` crops ``T`` to the rows
``i0..L-1`` and columns ``0..i1-1`` it needs, and every ``H_i`` in it is that crop with rows ``< i``
and columns ``>= i`` zeroed: zero padding adds only zero singular values. A chunk holds at most
about ``chunk_elements`` matrix entries (one position at least), so memory stays bounded (no
``[L, L, L]`` tensor), and its padded SVD work is at most twice what its positions need on their own
(for a few spread-out positions, the regularizer's case, one crop for all would pad ``H_1`` to
``[L, L]``: 1.6-3.4x slower at L = 128-256).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dense_hankel_singular_values", "plan_dense_chunks"]


def _block_size(L: int, i0: int, i1: int, n: int) -> int:
    return n * (L - i0) * i1


def _svd_cost(rows: int, cols: int) -> int:
    return rows * cols * min(rows, cols)


def plan_dense_chunks(
    pos_list: list[int], L: int, budget: int, max_waste: float = 2.0
) -> list[tuple[int, int]]:
    """Greedy split of sorted positions into ``(start, stop)`` index ranges, each of at most ``budget``
    entries and with padded SVD work (``n`` crops of ``[L - i0, i1]``) at most ``max_waste`` times the
    work of its positions' own ``[L - i, i]`` blocks (``inf``: memory is the only limit)."""
    if not max_waste > 0:
        raise ValueError(f"max_waste must be > 0 (inf for no limit), got {max_waste}")
    chunks = []
    start = 0
    own = _svd_cost(L - pos_list[0], pos_list[0]) if pos_list else 0  # of pos_list[start : j]
    for j in range(1, len(pos_list) + 1):
        if j == len(pos_list):
            chunks.append((start, j))
            break
        i0, i1, n = pos_list[start], pos_list[j], j + 1 - start
        own += _svd_cost(L - i1, i1)
        if _block_size(L, i0, i1, n) > budget or n * _svd_cost(L - i0, i1) > max_waste * max(own, 1):
            chunks.append((start, j))
            start = j
            own = _svd_cost(L - i1, i1)
    return chunks


def dense_hankel_singular_values(
    T: Tensor, *, positions: Tensor, K: int, chunk_elements: int, max_waste: float = 2.0
) -> Tensor:
    """Singular values of ``H_i = T[..., i:, :i]`` for sorted unique ``positions``.

    ``T``: ``[B, L, L]`` lower triangular. Returns ``[B, len(positions), K]`` descending, zero-padded;
    values beyond the rank bound ``min(i, L - i)`` (and beyond ``K``) are dropped as round-off.
    ``max_waste``: see :func:`plan_dense_chunks` (``inf``: crops limited by memory only).
    """
    Bt, L, _ = T.shape
    n_pos = positions.numel()
    if Bt == 0 or n_pos == 0 or K == 0:
        return T.new_zeros(Bt, n_pos, K)
    pos_list = positions.tolist()
    biggest = max(max((L - i) * i for i in pos_list), 1)
    bb = max(1, min(Bt, chunk_elements // biggest))
    chunks = plan_dense_chunks(pos_list, L, max(1, chunk_elements // bb), max_waste)
    dev = T.device
    out = []
    for b0 in range(0, Bt, bb):
        Tb = T[b0 : b0 + bb]
        pieces = []
        for lo, hi in chunks:
            i0, i1 = pos_list[lo], pos_list[hi - 1]
            pos = positions[lo:hi].to(dev)
            if i1 == 0:  # only H_0, empty
                pieces.append(T.new_zeros(Tb.shape[0], hi - lo, K))
                continue
            block = Tb[:, i0:, :i1]  # [bb, L - i0, i1]
            rows = torch.arange(i0, L, device=dev)
            cols = torch.arange(i1, device=dev)
            mask = (rows.view(1, -1, 1) >= pos.view(-1, 1, 1)) & (cols.view(1, 1, -1) < pos.view(-1, 1, 1))
            H = torch.where(mask, block.unsqueeze(1), torch.zeros((), dtype=T.dtype, device=dev))
            s = torch.linalg.svdvals(H)  # [bb, n, min(L - i0, i1)]
            m = s.shape[-1]
            s = s[..., :K] if m >= K else torch.nn.functional.pad(s, (0, K - m))
            bound = torch.minimum(pos, L - pos)  # rank bound of H_i
            keep = torch.arange(K, device=dev).view(1, -1) < bound.view(-1, 1)
            pieces.append(torch.where(keep, s, torch.zeros((), dtype=s.dtype, device=dev)))
        out.append(torch.cat(pieces, 1))
    return torch.cat(out, 0)
