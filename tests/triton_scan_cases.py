"""The fused Triton scan (``ess_train.models.ops.triton_scan``) where triton imports, under Triton's CPU
interpreter (``TRITON_INTERPRET=1``) or on CUDA: outputs against the torch ``mamba_scan`` and the
token-by-token reference (``ess_train/models/ops/naive.py``),
gradients (w.r.t. dt, A, B, C, u) equal to the torch
path's and close to the reference's, and the Mamba mixer with ``scan_backend="triton"`` against ``"torch"``.

Not collected by the main environment's pytest (no ``test_`` prefix: triton lives in ``.fla-env``);
``tests/models/test_ops_triton_scan.py`` runs this file in a subprocess with ``.fla-env`` on ``PYTHONPATH``.

Tolerances (``tests/tolerances.py``): the kernel runs the recurrence itself, ``L`` steps then a sum of ``N``
terms, every rounding relative to the terms' size, so ``|y - y_exact| <= tol(dtype, size, n=L + N)`` with
``size`` the same scan of ``|B|, |C|, |u|``; ``mamba_scan`` is held to that bound by
``tests/models/test_ops_scan.py``, so the two agree within twice it.
"""

from __future__ import annotations

import pytest
import torch

from ess_train.models.mixers.mamba import Mamba
from ess_train.models.ops import mamba_scan
from ess_train.models.ops.naive import mamba_scan_reference, selective_scan_reference
from ess_train.models.ops.triton_scan import select_scan_backend, triton_interpreting, triton_mamba_scan
from tests.models.test_mixer_contract import assert_seq_close
from tests.reference_mixers import reference_forward
from tests.tolerances import assert_within, tol

F32, F64 = torch.float32, torch.float64
INS = ("dt", "A", "B", "C", "u")
DEVICE = torch.device("cpu" if triton_interpreting() else "cuda")


def scan_inputs(b: int, D: int, L: int, N: int, dtype: torch.dtype, dt_scale: float = 0.3, seed: int = 0):
    """``dt [b, D, L] >= 0``, ``A [D, N] < 0``, ``B, C [b, L, N]``, ``u [b, D, L]`` (leaves on DEVICE)."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.rand(b, D, L, generator=g, dtype=F64) * dt_scale
    A = -(torch.rand(D, N, generator=g, dtype=F64) + 0.5)
    Bm, Cm = (torch.randn(b, L, N, generator=g, dtype=F64) for _ in range(2))
    u = torch.randn(b, D, L, generator=g, dtype=F64)
    return tuple(t.to(DEVICE, dtype).requires_grad_(True) for t in (dt, A, Bm, Cm, u))


def exact(ins: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 reference on the (rounded) inputs, and the size of its terms (the scan of their moduli)."""
    dt, A, Bm, Cm, u = (t.detach().cpu().double() for t in ins)
    return mamba_scan_reference(dt, A, Bm, Cm, u), mamba_scan_reference(dt, A, Bm.abs(), Cm.abs(), u.abs())


# (b, D, L, N, block_d, dt_scale): D not a multiple of block_d (12 = 8 + 4, 5 = 3 * 2 - 1), one channel per
# program, N not a power of two, L odd / prime (mamba_scan's chunks padded), a single step; dt_scale 30:
# decays strong enough that mamba_scan halves its chunks (steps of up to exp(-45))
CASES = [
    (2, 12, 37, 5, 8, 0.3),
    (2, 5, 40, 8, 2, 0.3),
    (2, 3, 23, 3, 1, 30.0),
    (2, 4, 1, 4, None, 0.3),
]


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("b,D,L,N,block_d,dt_scale", CASES)
def test_triton_scan_matches_torch_and_reference(
    b: int, D: int, L: int, N: int, block_d: int | None, dt_scale: float, dtype: torch.dtype
) -> None:
    ins = scan_inputs(b, D, L, N, dtype, dt_scale)
    y = triton_mamba_scan(*ins, block_d=block_d)
    y_torch = mamba_scan(*ins)
    assert y.dtype == y_torch.dtype == dtype and y.shape == (b, D, L)
    ref, size = exact(ins)
    bound = tol(dtype, size, n=L + N)
    assert_within(y.cpu(), ref, bound, f"triton vs reference ({dtype})")
    assert_within(y.cpu(), y_torch.detach().cpu(), 2 * bound, f"triton vs mamba_scan ({dtype})")
    # gradients: the backward is mamba_scan's, recomputed from the same inputs: equal to the torch path's
    gy = torch.randn(b, D, L, generator=torch.Generator().manual_seed(1), dtype=F64).to(DEVICE, dtype)
    g = torch.autograd.grad(y, ins, gy)
    g_torch = torch.autograd.grad(y_torch, ins, gy)
    for name, a, e in zip(INS, g, g_torch):
        assert a.dtype == e.dtype and torch.equal(a, e), f"grad of {name}: differs from mamba_scan's"
    # ... and those against autograd through the float64 token loop, each gradient within its terms' size
    # (grad_sizes) times the chain of roundings: the L + N of the scan, and mamba_scan's factored
    # exponentials exp(+-S) (S = A cumsum(dt) within a chunk, rounded in about L steps: relative errors up to
    # L |S| eps on each term)
    ins64 = tuple(t.detach().cpu().double().requires_grad_(True) for t in ins)
    g_ref = torch.autograd.grad(mamba_scan_reference(*ins64), ins64, gy.cpu().double())
    dt, A = ins64[0].detach(), ins64[1].detach()
    s_max = float((dt.sum(-1, keepdim=True) * A.abs().amax(-1)[:, None]).max())
    n = L + N + L * s_max
    for name, a, e, size in zip(INS, g, g_ref, grad_sizes(ins64, gy)):
        assert_within(a.cpu(), e, tol(dtype, size, n=n), f"grad of {name} ({dtype})")


def grad_sizes(ins: tuple, gy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Upper bounds of the terms summed in each gradient of ``sum(gy * y)`` (dt, A, B, C, u), float64.

    With the moduli states ``H = scan(exp(dt A), dt |u| |B|)`` and adjoint states ``G_s = sum_{t >= s}
    exp(A (T_t - T_s)) |C_t gy_t|`` (``T = cumsum(dt)``): ``u``: ``sum_N dt |B| G``; ``B``:
    ``sum_D dt |u| G``;
    ``C``: ``sum_D |gy| H``; ``A``: ``sum_{b, t} |gy| T |C| H`` (``|dS / dA| <= T``); ``dt``: its own term
    ``sum_N |u B| G`` plus the decays', at most ``|A| sum_t |gy_t C_t| H_t`` over the whole sequence.
    """
    dt, A, Bm, Cm, u = (t.detach().cpu().double() for t in ins)
    gy = gy.detach().cpu().double().abs()
    log_a = dt[..., None] * A[:, None, :]  # [b, D, L, N]
    H = selective_scan_reference(log_a, (dt * u.abs())[..., None] * Bm.abs()[:, None])
    shifted = torch.nn.functional.pad(log_a[..., 1:, :], (0, 0, 0, 1))  # log a_{s+1}
    x = gy[..., None] * Cm.abs()[:, None]
    G = selective_scan_reference(shifted.flip(-2), x.flip(-2)).flip(-2)
    yH = gy[..., None] * Cm.abs()[:, None] * H  # [b, D, L, N]
    T = dt.cumsum(-1)
    size_dt = (u.abs()[..., None] * Bm.abs()[:, None] * G).sum(-1) + (
        A.abs()[:, None, :] * yH.sum(-2, keepdim=True)
    ).sum(-1)
    size_A = (T[..., None] * yH).sum((0, 2))
    size_B = ((dt * u.abs())[..., None] * G).sum(1)
    size_C = (gy[..., None] * H).sum(1)
    size_u = (dt[..., None] * Bm.abs()[:, None] * G).sum(-1)
    return size_dt, size_A, size_B, size_C, size_u


def test_triton_scan_strided_inputs_and_no_grad() -> None:
    """The layouts the mixer passes (dt transposed from ``[b, L, D]``, B/C slices of one projection), read
    in place, and inputs that need no gradient."""
    b, D, L, N = 2, 6, 19, 4
    g = torch.Generator().manual_seed(3)
    dt = (torch.rand(b, L, D, generator=g) * 0.3).transpose(1, 2)
    A = -(torch.rand(D, N, generator=g) + 0.5)
    BC = torch.randn(b, L, 2 * N + 3, generator=g)
    Bm, Cm = BC[..., 3 : 3 + N], BC[..., 3 + N :]
    u = torch.randn(b, D, L + 3, generator=g)[..., :L]
    ins = tuple(t.to(DEVICE) for t in (dt, A, Bm, Cm, u))
    y = triton_mamba_scan(*ins)
    ref, size = exact(ins)
    assert_within(y.cpu(), ref, tol(F32, size, n=L + N), "strided inputs")
    assert not y.requires_grad


def test_triton_scan_checks_its_arguments() -> None:
    ins = scan_inputs(1, 3, 4, 2, F32)
    with pytest.raises(ValueError, match="power of two"):
        triton_mamba_scan(*ins, block_d=3)
    with pytest.raises(ValueError, match="must be"):
        triton_mamba_scan(*ins[:4], ins[4][..., :3])


def mixers(dtype: torch.dtype) -> tuple[Mamba, Mamba]:
    """Two Mambas with the same weights (same seed), scan backends ``"triton"`` and ``"torch"``."""
    out = []
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        out.append(Mamba(6, d_state=5, d_conv=3, expand=2, scan_backend=backend).to(DEVICE, dtype))
    return out[0], out[1]


@pytest.mark.parametrize("dtype", [F32, F64])
def test_mamba_mixer_triton_backend_matches_torch(dtype: torch.dtype) -> None:
    """Same weights, same input: the scans agree within twice their bound, the outputs within that gap
    carried through ``out_proj`` (the readout is linear in ``y``), and both match the token-by-token layer
    (``tests/reference_mixers.py``, as the mixer contract checks); gradients of every parameter and of ``x``
    agree within the scan's relative error carried through sums over the ``b L`` tokens."""
    m_tri, m_torch = mixers(dtype)
    assert select_scan_backend(m_tri.scan_backend, DEVICE) == "triton"
    b, L, d, N = 2, 33, m_tri.d_model, m_tri.d_state
    x = torch.randn(b, L, d, generator=torch.Generator().manual_seed(1), dtype=F64).to(DEVICE, dtype)
    x_tri, x_torch = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    v_tri, v_torch = m_tri.operator(x_tri), m_torch.operator(x_torch)
    assert torch.equal(v_tri.op.dt, v_torch.op.dt) and torch.equal(v_tri.u, v_torch.u)  # the same features
    op = v_torch.op
    _, size = exact((op.dt, op.A, op.B, op.C, v_torch.u))
    y_gap = 2 * tol(dtype, size, n=L + N)  # [b, D, L]
    assert_within(v_tri.y.cpu(), v_torch.y.detach().cpu(), y_gap, f"mixer scan ({dtype})")
    out_tri, out_torch = m_tri.readout(v_tri, x_tri), m_torch.readout(v_torch, x_torch)
    # out' - out = W ((y' - y) silu(z)) + each side's rounding of (y + D u) silu(z) and of the product by W
    W = m_torch.out_proj.weight.detach().cpu().double().abs()  # [d, D]
    gate = torch.nn.functional.silu(v_torch.extras["z"]).detach().cpu().double().abs()  # [b, L, D]
    pre = (v_torch.y + m_torch.D[:, None] * v_torch.u).detach().cpu().double().abs().transpose(1, 2) * gate
    bound = (y_gap.transpose(1, 2) * gate) @ W.T + 2 * tol(dtype, pre @ W.T, n=m_tri.d_inner + 2)
    assert_within(out_tri.detach().cpu(), out_torch.detach().cpu(), bound, f"mixer output ({dtype})")
    with torch.no_grad():
        ref = reference_forward(m_torch, x)
    assert_seq_close(out_tri.detach(), ref, dtype, L + m_tri.d_inner, f"mixer vs reference ({dtype})")
    g = torch.randn(b, L, d, generator=torch.Generator().manual_seed(2), dtype=F64).to(DEVICE, dtype)
    (out_tri * g).sum().backward()
    (out_torch * g).sum().backward()
    n = b * L * (L + N + m_tri.d_inner)
    for (name, p_tri), p_torch in zip(m_tri.named_parameters(), m_torch.parameters()):
        assert_seq_close(p_tri.grad, p_torch.grad, dtype, n, f"grad of {name} ({dtype})")
    assert_seq_close(x_tri.grad, x_torch.grad, dtype, n, f"grad of x ({dtype})")


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton importable, but neither CUDA tensors nor ``TRITON_INTERPRET``: a clear error, no fallback."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    m = Mamba(4, d_state=2, scan_backend="triton")
    with pytest.raises(ValueError, match="scan_backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1"):
        m(torch.randn(1, 3, 4))
    assert select_scan_backend("auto", torch.device("cpu")) == "torch"
