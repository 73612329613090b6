"""Mamba's scans (``ess_train.models.ops.scan``): outputs and gradients against the token-by-token
references (``ess_train/models/ops/naive.py``), and float64 ``gradcheck`` of both custom backwards
(``_SelectiveScan``: the adjoint scan; ``_MambaScan``: block-wise recomputation) on small sizes."""

from __future__ import annotations

import pytest
import torch

import ess_train.models.ops.scan as ops_scan
from ess_train.models.ops import exp_nonpositive, mamba_scan, selective_scan
from ess_train.models.ops.naive import mamba_scan_reference, selective_scan_reference
from tests.models.test_mixer_contract import assert_seq_close
from tests.tolerances import assert_within, tol

F32, F64 = torch.float32, torch.float64


def grads(y: torch.Tensor, ins: tuple[torch.Tensor, ...], gy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(y, ins, gy)


def assert_grads_match(fast: tuple, ref: tuple, n: int, what: str) -> None:
    """float64 gradients of sums of at most ``n`` terms, in another order: ``tol(F64, max |ref|, n)``."""
    for i, (g, r) in enumerate(zip(fast, ref)):
        assert_seq_close(g, r, F64, n, f"{what}: grad of input {i}")


# ---------------------------------------------------------------------------------- selective_scan
# float64 gradcheck, ~3 s a case: the fast lane keeps one single-chunk and one multi-chunk case
@pytest.mark.parametrize(
    "chunk",
    [
        None,
        pytest.param(1, marks=pytest.mark.slow),
        pytest.param(3, marks=pytest.mark.slow),
        8,
        pytest.param(64, marks=pytest.mark.slow),
    ],
)
def test_selective_scan_matches_reference_and_gradcheck(chunk: int | None, device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    la = (-torch.rand(2, 3, 21, 4, generator=g, dtype=torch.float64) * 2).to(device)
    x = torch.randn(2, 3, 21, 4, generator=g, dtype=torch.float64).to(device)
    c = torch.randn(2, 1, 21, 4, generator=g, dtype=torch.float64).to(device)  # broadcast over dim 1
    ref = selective_scan_reference(la, x)
    # a scan of 21 steps, each term's size given by the same scan of |x| (then 4 more terms with c)
    size = selective_scan_reference(la, x.abs())
    assert_within(selective_scan(la, x, chunk), ref, tol(F64, size, n=21), "scan")
    bound = tol(F64, (size * c.abs()).sum(-1), n=21 + 4)
    assert_within(selective_scan(la, x, chunk, c=c), (ref * c).sum(-1), bound, "scan, contracted with c")
    for t in (la, x, c):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: selective_scan(a, b, chunk), (la, x))
    assert torch.autograd.gradcheck(lambda a, b, cc: selective_scan(a, b, chunk, c=cc), (la, x, c))


@pytest.mark.parametrize("chunk", [None, 1, 4, 64])
def test_selective_scan_gradients_match_reference(chunk: int | None, device: torch.device) -> None:
    """The adjoint backward against autograd through the token-by-token loop (with and without ``c``)."""
    g = torch.Generator().manual_seed(2)
    la = (-torch.rand(2, 3, 37, 4, generator=g, dtype=F64) * 2).to(device).requires_grad_(True)
    x = torch.randn(2, 3, 37, 4, generator=g, dtype=F64).to(device).requires_grad_(True)
    c = torch.randn(2, 1, 37, 4, generator=g, dtype=F64).to(device).requires_grad_(True)
    gh = torch.randn(2, 3, 37, 4, generator=g, dtype=F64).to(device)
    ref = selective_scan_reference(la, x)
    assert_grads_match(grads(selective_scan(la, x, chunk), (la, x), gh), grads(ref, (la, x), gh), 37 * 4, "h")
    gy = gh[..., 0]
    y_ref = (selective_scan_reference(la, x) * c).sum(-1)
    fast = grads(selective_scan(la, x, chunk, c=c), (la, x, c), gy)
    assert_grads_match(fast, grads(y_ref, (la, x, c), gy), 2 * 37 * 4, "y = c . h")


def test_selective_scan_survives_extreme_decays(device: torch.device) -> None:
    g = torch.Generator().manual_seed(1)
    la = (-torch.rand(1, 2, 64, 3, generator=g) * 5).to(device)
    la[..., 10:20, 0] = -1e4  # a total reset
    la[..., 30:, 1] = -200.0  # exp(cumsum) far below float32's range
    la[..., 2] = 0.0  # no decay at all
    x = torch.randn(1, 2, 64, 3, generator=g).to(device)
    fast = selective_scan(la.requires_grad_(True), x, 8)
    ref = selective_scan_reference(la.double(), x.double())
    assert torch.isfinite(fast).all()
    # float32 against the float64 scan of the same inputs: 64 steps, terms of the size of the |x| scan
    size = selective_scan_reference(la.double(), x.double().abs())
    assert_within(fast, ref, tol(F32, size, n=64), "float32 scan")
    fast.square().sum().backward()
    assert torch.isfinite(la.grad).all()


def test_selective_scan_shape_errors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        selective_scan(torch.zeros(1, 4, 2), torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan(torch.zeros(1, 4, 2), torch.zeros(1, 4, 2), 0)
    with pytest.raises(ValueError, match="broadcast"):
        selective_scan(torch.zeros(1, 4, 2), torch.zeros(1, 4, 2), c=torch.zeros(3, 4, 2))


def test_exp_nonpositive_flushes_only_below_the_normal_range() -> None:
    x = torch.tensor([0.0, -1.0, -79.0, -81.0, -1e4])
    torch.testing.assert_close(exp_nonpositive(x)[:3], torch.exp(x[:3]), rtol=0, atol=0)
    assert (exp_nonpositive(x)[3:] == 0).all()
    xd = x.double()
    torch.testing.assert_close(exp_nonpositive(xd)[:4], torch.exp(xd[:4]), rtol=0, atol=0)


# ---------------------------------------------------------------------------------- mamba_scan
def mamba_inputs(
    b: int, D: int, L: int, N: int, dt_scale: float = 0.3, seed: int = 0, device: torch.device | None = None
) -> tuple:
    """``dt [b, D, L] >= 0``, ``A [D, N] < 0``, ``B, C [b, L, N]``, ``u [b, D, L]`` (float64, leaves on
    ``device``; drawn on the CPU, so the same values on every device)."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.rand(b, D, L, generator=g, dtype=F64) * dt_scale
    A = -(torch.rand(D, N, generator=g, dtype=F64) + 0.5)
    Bm, Cm = (torch.randn(b, L, N, generator=g, dtype=F64) for _ in range(2))
    u = torch.randn(b, D, L, generator=g, dtype=F64)
    return tuple(t.to(device).requires_grad_(True) for t in (dt, A, Bm, Cm, u))


def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cut ``_MambaScan``'s (batch, channel) blocks to one channel of one sequence each."""
    blocks = ops_scan._blocks
    monkeypatch.setattr(ops_scan, "_blocks", lambda b, D, L, N: blocks(b, D, L, N, target=1))


# chunk 64 > L: one chunk; 4: several, L padded to a multiple; dt_scale 30: chunks halved until the
# factored form is safe; 1e4: too strong for any chunk, the exact selective_scan fallback
MAMBA_CASES = [(64, 0.3), (4, 0.3), (None, 30.0), (None, 1e4)]


@pytest.mark.parametrize("blocked", [False, True])
@pytest.mark.parametrize("chunk,dt_scale", MAMBA_CASES)
def test_mamba_scan_matches_reference_outputs_and_gradients(
    chunk: int | None, dt_scale: float, blocked: bool, monkeypatch: pytest.MonkeyPatch, device: torch.device
) -> None:
    if blocked:
        small_blocks(monkeypatch)
    ins = mamba_inputs(2, 3, 21, 4, dt_scale, device=device)
    y, ref = mamba_scan(*ins, chunk), mamba_scan_reference(*ins)
    # per channel: a scan of 21 steps contracted with C over 4 states
    dt, A, Bm, Cm, u = (t.detach() for t in ins)
    size = mamba_scan_reference(dt, A, Bm.abs(), Cm.abs(), u.abs())
    assert_within(y, ref, tol(F64, size, n=21 + 4), "mamba_scan")
    gy = torch.randn_like(ref)
    assert_grads_match(grads(y, ins, gy), grads(ref, ins, gy), 2 * 3 * 21 * 4, "mamba_scan")


@pytest.mark.parametrize("blocked", [False, True])
@pytest.mark.parametrize("chunk,dt_scale", MAMBA_CASES)
def test_mamba_scan_gradcheck(
    chunk: int | None, dt_scale: float, blocked: bool, monkeypatch: pytest.MonkeyPatch, device: torch.device
) -> None:
    """float64 gradcheck of the custom backward (``_MambaScan``; the fallback's ``_SelectiveScan``) in all of
    ``dt, A, B, C, u``, on every path; ``blocked``: several (batch, channel) blocks accumulate ``A``, ``B``,
    ``C``'s gradients."""
    if blocked:
        small_blocks(monkeypatch)
    ins = mamba_inputs(2, 2, 9, 3, dt_scale, seed=1, device=device)
    assert torch.autograd.gradcheck(lambda *t: mamba_scan(*t, chunk), ins)


def test_mamba_scan_float32_matches_float64_reference(device: torch.device) -> None:
    ins = mamba_inputs(2, 3, 70, 4, device=device)
    y = mamba_scan(*(t.detach().float() for t in ins), 16)
    assert y.dtype == F32
    dt, A, Bm, Cm, u = (t.detach() for t in ins)
    size = mamba_scan_reference(dt, A, Bm.abs(), Cm.abs(), u.abs())
    assert_within(y, mamba_scan_reference(*ins), tol(F32, size, n=70 + 4), "float32 mamba_scan")
