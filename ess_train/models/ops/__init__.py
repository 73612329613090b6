"""Kernels of the mixer zoo (as fla's ``ops/`` next to ``layers/``): pure functions on tensors, no modules.

- :mod:`.linear_attention`: chunked (gated) linear attention, :func:`chunk_linear_attention`,
  :func:`chunk_decayed_linear_attention` (plain autograd);
- :mod:`.delta_rule`: the chunkwise delta rule, :func:`chunk_delta_rule` (plain autograd);
- :mod:`.scan`: Mamba's scans with their custom autograd Functions, :func:`selective_scan`,
  :func:`mamba_scan`, and :func:`exp_nonpositive`;
- :mod:`.triton_scan`: :func:`triton_mamba_scan`, ``mamba_scan``'s forward as one fused Triton kernel (CUDA;
  ``triton`` imported on first use), and :func:`select_scan_backend` (the Mamba mixer's ``scan_backend``);
- :mod:`.fft_conv`: :func:`fft_causal_conv` (S4D, Hyena).

The layers that use them live in :mod:`ess_train.models.mixers`; token-by-token references in ``tests/``.
"""

from __future__ import annotations

from ess_train.models.ops.delta_rule import chunk_delta_rule
from ess_train.models.ops.fft_conv import fft_causal_conv
from ess_train.models.ops.linear_attention import (
    chunk_decayed_linear_attention,
    chunk_linear_attention,
    sub_chunk_for,
)
from ess_train.models.ops.scan import exp_nonpositive, mamba_scan, selective_scan
from ess_train.models.ops.triton_scan import select_scan_backend, triton_available, triton_mamba_scan

__all__ = [
    "chunk_linear_attention",
    "chunk_decayed_linear_attention",
    "sub_chunk_for",
    "chunk_delta_rule",
    "selective_scan",
    "mamba_scan",
    "exp_nonpositive",
    "triton_mamba_scan",
    "select_scan_backend",
    "triton_available",
    "fft_causal_conv",
]
