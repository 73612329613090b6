"""Causal long convolution by FFT (S4D's and Hyena's fast forward; plain autograd)."""

from __future__ import annotations

import torch
from torch import Tensor

from ess_train.ess import compute_dtype

__all__ = ["fft_causal_conv"]


def fft_causal_conv(u: Tensor, k: Tensor) -> Tensor:
    """Causal convolution ``y[t] = sum_{j <= t} k[j] u[t - j]`` over the last dim, by FFT (zero-padded to 2L).

    ``u: [..., L]``, ``k`` broadcastable to it with last dim ``L``. Runs in float32 (float64 stays).
    """
    L = u.shape[-1]
    dtype = compute_dtype(torch.promote_types(u.dtype, k.dtype))
    n = 2 * L
    uf = torch.fft.rfft(u.to(dtype), n=n)
    kf = torch.fft.rfft(k.to(dtype), n=n)
    return torch.fft.irfft(uf * kf, n=n)[..., :L]
