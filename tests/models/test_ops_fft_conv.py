"""The FFT causal convolution (``ess_train.models.ops.fft_causal_conv``; S4D, Hyena): outputs and gradients
against the explicit causal sum (``ess_train/models/ops/naive.py``); plain autograd (no custom backward)."""

from __future__ import annotations

import pytest
import torch

from ess_train.models.ops import fft_causal_conv
from ess_train.models.ops.naive import causal_conv_reference
from tests.models.test_ops_scan import assert_grads_match, grads
from tests.tolerances import assert_within, tol

F32, F64 = torch.float32, torch.float64


@pytest.mark.parametrize("L", [1, 7, 33])
def test_fft_causal_conv_matches_reference_outputs_and_gradients(L: int, device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 3, L, generator=g, dtype=F64).to(device).requires_grad_(True)
    k = torch.randn(3, L, generator=g, dtype=F64).to(device).requires_grad_(True)  # broadcast over the batch
    y, ref = fft_causal_conv(u, k), causal_conv_reference(u, k)
    assert y.shape == ref.shape and y.dtype == F64
    # FFT: normwise error ~ eps log(n) ||k|| ||u||; bounded by that of the sum of |terms|, n = 2 L
    size = causal_conv_reference(u.detach().abs(), k.detach().abs())
    assert_within(y, ref, tol(F64, size.amax(-1, keepdim=True), n=2 * L), "FFT conv")
    gy = torch.randn_like(ref)
    assert_grads_match(grads(y, (u, k), gy), grads(ref, (u, k), gy), 2 * 2 * L, "FFT conv")


def test_fft_causal_conv_runs_half_precision_in_float32(device: torch.device) -> None:
    u, k = torch.randn(2, 16).bfloat16().to(device), torch.randn(16).bfloat16().to(device)
    y = fft_causal_conv(u, k)
    assert y.dtype == F32
    ref = causal_conv_reference(u.double(), k.double())
    size = causal_conv_reference(u.double().abs(), k.double().abs())
    assert_within(y, ref, tol(F32, size.amax(-1, keepdim=True), n=2 * 16), "bfloat16 inputs, float32 FFT")
