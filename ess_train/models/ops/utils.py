"""Small helpers shared by the chunked kernels of :mod:`ess_train.models.ops`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["round_up", "kernel_dtype", "pad_len", "chunk_plan"]


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def kernel_dtype(*xs: Tensor) -> torch.dtype:
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def pad_len(x: Tensor, pad: int) -> Tensor:
    """Zero-pad dim -2 (sequence) of ``[..., L, d]`` at the end."""
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def chunk_plan(L: int, chunk_size: int) -> tuple[int, int, int]:
    """``(C, Lp, n)``: chunk length ``min(chunk_size, L)``, the length padded to a multiple of it, chunks."""
    C = min(chunk_size, L)
    Lp = round_up(L, C)
    return C, Lp, Lp // C
