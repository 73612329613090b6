"""Train/test leakage check: row hashes and exact matching of test rows against the training set."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["row_hashes", "rows_in"]


_P1, _P2 = 2_147_483_647, 2_147_483_629  # primes below 2**31
_B1, _B2 = 1_000_003, 998_244_353


def row_hashes(x: Tensor, chunk: int = 8192) -> Tensor:
    """A 62-bit polynomial hash of every row of ``x [N, L]`` (two moduli, vectorized)."""
    n, length = x.shape
    pw1 = _modpow_table(_B1, _P1, length)
    pw2 = _modpow_table(_B2, _P2, length)
    out = torch.empty(n, dtype=torch.long)
    for s in range(0, n, chunk):
        r = x[s : s + chunk].long()
        h1 = (((r % _P1) * pw1) % _P1).sum(1) % _P1
        h2 = (((r % _P2) * pw2) % _P2).sum(1) % _P2
        out[s : s + chunk] = h1 * _P2 + h2
    return out


def _modpow_table(base: int, mod: int, length: int) -> Tensor:
    vals, v = [], 1
    for _ in range(length):
        vals.append(v)
        v = v * base % mod
    return torch.tensor(vals, dtype=torch.long)


def rows_in(reference: Tensor, queries: Tensor, ref_hashes: Tensor | None = None) -> Tensor:
    """Bool mask over ``queries`` rows that occur exactly in ``reference`` (hash, then compare)."""
    if queries.shape[0] == 0 or reference.shape[0] == 0:
        return torch.zeros(queries.shape[0], dtype=torch.bool)
    if ref_hashes is None:
        ref_hashes = row_hashes(reference)
    sorted_h, order = ref_hashes.sort()
    qh = row_hashes(queries)
    pos = torch.searchsorted(sorted_h, qh).clamp_(max=sorted_h.numel() - 1)
    cand = sorted_h[pos] == qh
    hit = torch.zeros_like(cand)
    idx = cand.nonzero().squeeze(1)
    if idx.numel():
        hit[idx] = (reference[order[pos[idx]]] == queries[idx]).all(dim=1)
    return hit
