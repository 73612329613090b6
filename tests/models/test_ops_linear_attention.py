"""Chunked (gated) linear attention and the chunkwise delta rule (``ess_train.models.ops``): outputs and
gradients against the token-by-token recurrences (``ess_train/models/ops/naive.py``),
padding, chunk sizes, and
gates far beyond float32's range. The kernels use plain autograd (no custom backward)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ess_train.models.ops import chunk_decayed_linear_attention, chunk_delta_rule, chunk_linear_attention
from ess_train.models.ops.naive import delta_rule_reference, gated_reference
from tests.models.test_mixer_contract import assert_seq_close
from tests.models.test_ops_scan import assert_grads_match, grads

F32, F64 = torch.float32, torch.float64


def qkv(
    shape: tuple[int, ...], dv: int, seed: int = 0, device: torch.device | None = None
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(*shape, generator=g, dtype=F64) for _ in range(2))
    v = torch.randn(*shape[:-1], dv, generator=g, dtype=F64)
    return q.to(device), k.to(device), v.to(device)


def check_grads(fast: torch.Tensor, ref: torch.Tensor, ins: tuple, n: int, what: str) -> None:
    gy = torch.randn_like(ref)
    assert_grads_match(grads(fast, ins, gy), grads(ref, ins, gy), n, what)


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk,sub", [(64, 16), (8, 4), (4, 2), (1, 1)])
@pytest.mark.parametrize("gated", [False, True])
def test_chunk_linear_attention_matches_reference_outputs_and_gradients(
    chunk: int, sub: int, gated: bool, device: torch.device
) -> None:
    q, k, v = qkv((2, 3, 21, 4), 3, device=device)
    g = (
        F.logsigmoid(torch.randn(2, 3, 21, 4, dtype=F64) + 2)
        if gated
        else torch.zeros(2, 3, 21, 4, dtype=F64)
    ).to(device)
    ins = tuple(t.requires_grad_(True) for t in ((q, k, v, g) if gated else (q, k, v)))
    y = chunk_linear_attention(*ins, chunk_size=chunk, sub_chunk_size=sub)
    ref = gated_reference(q, k, v, g, 1.0)
    assert_seq_close(y, ref, F64, 21 + 4, "chunk_linear_attention")
    check_grads(y, ref, ins, 21 * 4, "chunk_linear_attention")


@pytest.mark.parametrize("chunk", [64, 5, 1])
def test_chunk_decayed_linear_attention_matches_reference_outputs_and_gradients(
    chunk: int, device: torch.device
) -> None:
    q, k, v = qkv((2, 3, 21, 4), 3, device=device)
    log_decay = torch.log(torch.tensor([0.5, 0.9, 0.999], dtype=F64, device=device))
    ins = tuple(t.requires_grad_(True) for t in (q, k, v, log_decay))
    y = chunk_decayed_linear_attention(*ins, chunk_size=chunk)
    ref = gated_reference(q, k, v, log_decay[None, :, None, None].expand(q.shape), 1.0)
    assert_seq_close(y, ref, F64, 21 + 4, "chunk_decayed_linear_attention")
    check_grads(y, ref, ins, 21 * 4, "chunk_decayed_linear_attention")


@pytest.mark.parametrize("chunk", [64, 5, 1])
def test_chunk_delta_rule_matches_reference_outputs_and_gradients(chunk: int, device: torch.device) -> None:
    q, k, v = qkv((2, 3, 13, 4), 3, device=device)
    k = F.normalize(k, dim=-1)
    beta = torch.rand(2, 3, 13, dtype=F64).to(device)
    ins = tuple(t.requires_grad_(True) for t in (q, k, v, beta))
    y = chunk_delta_rule(*ins, chunk_size=chunk)
    ref = delta_rule_reference(*ins)
    # the solve and the carried state compound a few more roundings per chunk than a plain sum
    assert_seq_close(y, ref, F64, 4 * (13 + 4), "chunk_delta_rule")
    check_grads(y, ref, ins, 4 * 13 * 4, "chunk_delta_rule")


# ----------------------------------------------------------------------------------------------------
def test_gated_kernel_survives_extreme_gates(device: torch.device) -> None:
    """Log-gates down to -60 per step: cumulative decays far below float32 range, still exact."""
    torch.manual_seed(0)
    q, k, v = (
        t.to(device) for t in (torch.randn(1, 2, 37, 4), torch.randn(1, 2, 37, 4), torch.randn(1, 2, 37, 3))
    )
    g = (-60.0 * torch.rand(1, 2, 37, 4)).to(device)
    g[..., ::5, :] = 0.0  # some steps keep the state: cross-step products stay O(1)
    g.requires_grad_(True)
    y = chunk_linear_attention(q, k, v, g, chunk_size=32, sub_chunk_size=8)
    ref = gated_reference(q, k, v, g, 1.0)
    assert torch.isfinite(y).all()
    assert_seq_close(y, ref, F32, 37 + 4, "extreme gates")
    y.square().sum().backward()
    assert torch.isfinite(g.grad).all()


def test_chunk_kernels_pad_and_match_across_chunk_sizes() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(2, 13, 4, dtype=torch.float64), torch.randn(2, 13, 4, dtype=torch.float64)
    v = torch.randn(2, 13, 3, dtype=torch.float64)
    g = torch.nn.functional.logsigmoid(torch.randn(2, 13, 4, dtype=torch.float64))
    outs = [
        chunk_linear_attention(q, k, v, g, chunk_size=c, sub_chunk_size=s)
        for c, s in [(64, 16), (4, 2), (1, 1)]
    ]
    for o in outs[1:]:
        assert_seq_close(o, outs[0], F64, 13 + 4, "gated, chunk sizes")
    kn = torch.nn.functional.normalize(k, dim=-1)
    beta = torch.rand(2, 13, dtype=torch.float64)
    outs = [chunk_delta_rule(q, kn, v, beta, chunk_size=c) for c in (64, 5, 1)]
    for o in outs[1:]:
        assert_seq_close(o, outs[0], F64, 13 + 4, "delta rule, chunk sizes")


def test_gated_kernel_factored_path_shrinks_chunks_for_strong_gates(device: torch.device) -> None:
    """Gates down to -3 per step: the factored (matmul) intra-chunk path needs chunks of 16 (span <= 30), the
    kernel halves the chunk and stays exact: agrees with the reference to round-off."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 4, dtype=torch.float64).to(device) for _ in range(3))
    g = (-3.0 * torch.rand(1, 2, 64, 4, dtype=torch.float64)).to(device)
    ref = gated_reference(q, k, v, g, 1.0)
    y64 = chunk_linear_attention(q, k, v, g, chunk_size=64, sub_chunk_size=16)
    assert_seq_close(y64, ref, F64, 64 + 4, "factored, float64")
    y32 = chunk_linear_attention(q.float(), k.float(), v.float(), g.float(), chunk_size=64, sub_chunk_size=16)
    assert torch.isfinite(y32).all()
    assert_seq_close(y32.double(), ref, F32, 64 + 4, "factored, float32")


def test_gated_kernel_pairwise_path_for_gates_too_strong_to_factor(device: torch.device) -> None:
    """Gates down to -40 per step: no chunk length keeps the factored exponents bounded, the kernel takes
    the pairwise path at the original chunking (with a padded, non-multiple length) and stays exact."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 70, 4, dtype=torch.float64).to(device) for _ in range(3))
    g = (-40.0 * torch.rand(2, 3, 70, 4, dtype=torch.float64)).to(device)
    ref = gated_reference(q, k, v, g, 1.0)
    for dtype in (torch.float64, torch.float32):
        y = chunk_linear_attention(*(x.to(dtype) for x in (q, k, v, g)), chunk_size=64, sub_chunk_size=16)
        assert torch.isfinite(y).all()
        assert_seq_close(y.double(), ref, dtype, 70 + 4, f"pairwise, {dtype}")
