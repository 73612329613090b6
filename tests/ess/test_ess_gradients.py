"""Entropy-ESS is differentiable on both paths: gradcheck, agreement, finiteness in degenerate cases."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from ess_train.ess import DenseOperator, RecurrentOperator, entropy_ess, hankel_singular_values
from tests.tolerances import (
    assert_within,
    entropy_ess_error,
    gramian_eig_error,
    gramian_scale,
    gramian_sigma_error,
    svd_error,
    tol,
)

F64 = torch.float64


def _ess_error(op, method: str, k: int = 1) -> torch.Tensor:
    """Round-off bound of ``k`` runs of entropy-ESS of ``op`` on ``method``'s path (tests/tolerances.py)."""
    dtype = torch.float64 if op.dtype == F64 else torch.float32
    s = hankel_singular_values(op, method=method).detach().double()
    if method == "gramian":  # float64 sums, products in the operator's dtype (tests/tolerances.py)
        ds = gramian_sigma_error(dtype, s, gramian_scale(op), op.seq_len, op.state_dim, k)
    else:
        ds = k * svd_error(dtype, s.amax(-1, keepdim=True), op.seq_len, op.seq_len)
    return entropy_ess_error(s, ds, dtype)


def _params(*shapes, seed: int, dtype=F64, device=None):
    """Random tensors drawn on the CPU (the same values on every device), then moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=dtype).to(device) for shape in shapes]


def test_gradcheck_dense_path(device):
    (X,) = _params((2, 7, 7), seed=0, device=device)
    X.requires_grad_()
    assert gradcheck(lambda X: entropy_ess(DenseOperator(torch.tril(X))), (X,))


def test_gradcheck_gramian_diagonal(gramian_path, device):
    a, b, c = _params((2, 6, 3), (2, 6, 3), (2, 6, 3), seed=1, device=device)
    a = (torch.sigmoid(a) * 0.9 + 0.05).requires_grad_()
    assert gradcheck(
        lambda a, b, c: entropy_ess(RecurrentOperator(a, b, c)), (a, b.requires_grad_(), c.requires_grad_())
    )


def test_gradcheck_gramian_full(device):
    A, b, c = _params((2, 5, 3, 3), (2, 5, 3), (2, 5, 3), seed=2, device=device)
    args = ((A * 0.5).requires_grad_(), b.requires_grad_(), c.requires_grad_())
    assert gradcheck(lambda a, b, c: entropy_ess(RecurrentOperator(a, b, c)), args)


def test_gradcheck_gramian_position_chunks(gramian_path, device):
    a, b, c = _params((1, 7, 3), (1, 7, 3), (1, 7, 3), seed=3, device=device)
    a = (torch.sigmoid(a) * 0.9).requires_grad_()
    fn = lambda a, b, c: entropy_ess(RecurrentOperator(a, b, c), chunk_elements=100)  # noqa: E731
    assert gradcheck(fn, (a, b.requires_grad_(), c.requires_grad_()))


@pytest.mark.parametrize("diagonal", [True, False])
def test_gramian_and_dense_gradients_agree(diagonal, gramian_path, device):
    L, N = 16, 4
    a, b, c = _params((2, L, N) if diagonal else (2, L, N, N), (2, L, N), (2, L, N), seed=4, device=device)
    a = torch.sigmoid(a) if diagonal else a / N**0.5
    grads = {}
    for method in ("gramian", "dense"):
        leaves = [x.clone().requires_grad_() for x in (a, b, c)]
        w = torch.linspace(0.5, 1.5, L, dtype=F64, device=device)  # weight positions differently
        (entropy_ess(RecurrentOperator(*leaves), method=method) * w).sum().backward()
        grads[method] = [x.grad for x in leaves]
    # first-order error propagation: ESS_i depends on theta through sigma_ik, each off by a relative
    # r_ik on either path: the Gramian's delta / sigma^2 (tests/tolerances.py), the SVD's c L eps sigma_max
    # / gap (singular vectors, hence d sigma / d theta, are accurate to eps over the gap to the next
    # value). So |d grad| <= sum_ik |w_i dESS_i/dsigma_ik| |dsigma_ik/dtheta| r_ik (+ the gradient's own
    # round-off), with the Jacobian d sigma / d theta from the dense path.
    op = RecurrentOperator(a, b, c)
    s = hankel_singular_values(op, method="dense")
    J = torch.autograd.functional.jacobian(
        lambda *p: hankel_singular_values(RecurrentOperator(*p), method="dense"), (a, b, c)
    )
    S = s.sum(-1, keepdim=True)
    p = s / S
    ent = -torch.xlogy(p, p).sum(-1, keepdim=True)
    dess = ent.exp() * (-torch.log(torch.where(s > 0, p, torch.ones_like(p))) - ent) / S
    nxt = torch.cat([s[..., 1:], torch.zeros_like(s[..., :1])], -1)  # the next value (0 after the last)
    prv = torch.cat([torch.full_like(s[..., :1], float("inf")), s[..., :-1]], -1)
    gap = torch.minimum(prv - s, s - nxt)
    r = 2 * gramian_eig_error(F64, gramian_scale(op), L, N) / s**2
    r = r + svd_error(F64, s.amax(-1, keepdim=True), L, L) / gap
    v = torch.where(s > 0, (w[:, None] * dess).abs() * r, torch.zeros_like(s))
    v = torch.nan_to_num(v, nan=float("inf"))  # a repeated sigma (gap 0): no bound on its own gradient
    for g_gram, g_dense, Jx in zip(grads["gramian"], grads["dense"], J):
        bound = (v.reshape(*v.shape, *[1] * g_dense.dim()) * Jx.abs()).sum(dim=(0, 1, 2))
        bound = bound + tol(F64, g_dense.abs().max(), n=L + N)
        assert_within(g_gram, g_dense, bound, "ESS gradient, Gramian vs dense")


def _finite_grads(make, params, method="auto"):
    leaves = [p.clone().requires_grad_() for p in params]
    ess = entropy_ess(make(*leaves), method=method)
    (ess.sum() + hankel_singular_values(make(*leaves), method=method).sum()).backward()
    for p in leaves:
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), p.grad
    return ess.detach()


DTYPES = [torch.float64, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["gramian", "dense"])
def test_zero_recurrent_operator_has_finite_gradients(dtype, method, gramian_path, device):
    z = torch.zeros(2, 8, 3, dtype=dtype, device=device)
    ess = _finite_grads(RecurrentOperator, (z, z, z), method)
    assert bool((ess == 0).all())
    full = torch.zeros(2, 8, 3, 3, dtype=dtype, device=device)
    assert bool((_finite_grads(RecurrentOperator, (full, z, z), method) == 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_dense_operator_has_finite_gradients(dtype, device):
    ess = _finite_grads(DenseOperator, (torch.zeros(2, 9, 9, dtype=dtype, device=device),))
    assert bool((ess == 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_repeated_singular_values_have_finite_gradients(dtype, gramian_path):
    # a delay: every non-zero singular value equals 1
    L, k = 12, 3
    T = torch.diag_embed(torch.ones(L - k, dtype=dtype), offset=-k)
    ess = _finite_grads(DenseOperator, (T,))
    assert_within(ess[4], 3.0, _ess_error(DenseOperator(T), "dense")[4], "delay, dense")
    # the same as a shift register (full transitions), and a = 1 with b = c = 1 (rank 1, P ~ 11^T)
    N = k + 1
    A = torch.diag_embed(torch.ones(N - 1, dtype=dtype), offset=-1).expand(L, N, N).contiguous()
    b = torch.zeros(L, N, dtype=dtype)
    b[:, 0] = 1
    c = torch.zeros(L, N, dtype=dtype)
    c[:, -1] = 1
    for method in ("gramian", "dense"):
        bound = _ess_error(RecurrentOperator(A, b, c), method)[4]
        assert_within(_finite_grads(RecurrentOperator, (A, b, c), method)[4], 3.0, bound, method)
    ones = torch.ones(2, L, 4, dtype=dtype)
    assert bool((_finite_grads(RecurrentOperator, (ones, ones, ones))[:, 1:] == 1).all())
    eye = torch.eye(4, dtype=dtype).expand(2, L, 4, 4).contiguous()
    _finite_grads(RecurrentOperator, (eye, ones, ones))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rank_deficient_operators_have_finite_gradients(dtype, gramian_path):
    g = torch.Generator().manual_seed(7)
    L, N = 14, 5
    a = torch.rand(2, L, N, generator=g, dtype=dtype)
    b = torch.zeros(2, L, N, dtype=dtype)
    b[..., :2] = torch.randn(2, L, 2, generator=g, dtype=dtype)  # only 2 states are ever driven
    c = torch.randn(2, L, N, generator=g, dtype=dtype)
    for method in ("gramian", "dense"):
        ess = _finite_grads(RecurrentOperator, (a, b, c), method)
        assert bool((ess <= 2.0 + _ess_error(RecurrentOperator(a, b, c), method)).all())  # rank <= 2
    a0 = a.clone()
    a0[:, 5] = 0  # a reset: H_6 has rank <= 1 ...
    c0 = c.clone()
    c0[:, 10:] = 0  # ... and the last outputs are 0
    _finite_grads(RecurrentOperator, (a0, b, c0))
    T = torch.tril(torch.randn(L, 2, generator=g, dtype=dtype) @ torch.randn(2, L, generator=g, dtype=dtype))
    T[:, :3] = 0  # zero columns, H_1 .. H_3 = 0
    _finite_grads(DenseOperator, (T,))


def test_half_precision_gradients_flow(gramian_path, device):
    a, b, c = _params((1, 10, 3), (1, 10, 3), (1, 10, 3), seed=9, dtype=torch.float32, device=device)
    leaves = [
        torch.sigmoid(a).bfloat16().requires_grad_(),
        b.bfloat16().requires_grad_(),
        c.bfloat16().requires_grad_(),
    ]
    ess = entropy_ess(RecurrentOperator(*leaves))
    assert ess.dtype == torch.float32  # (not rounded back to bfloat16)
    ess.sum().backward()
    assert all(p.grad.dtype == torch.bfloat16 and bool(torch.isfinite(p.grad).all()) for p in leaves)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cholesky_retry_path(monkeypatch, dtype, gramian_path):
    """With no initial jitter, singular Gramians fail to factor and go through the jitter ladder."""
    import ess_train.ess.gramian_svals as gramian_svals

    calls = []
    real = torch.linalg.cholesky_ex

    def counting(A, *args, **kwargs):
        out = real(A, *args, **kwargs)
        calls.append(int((out.info > 0).sum()))
        return out

    g = torch.Generator().manual_seed(8)
    L, N = 12, 4
    a = torch.rand(2, L, N, generator=g, dtype=dtype)
    b = torch.zeros(2, L, N, dtype=dtype)
    b[..., 0] = torch.randn(2, L, generator=g, dtype=dtype)  # P has rank 1: singular
    c = torch.randn(2, L, N, generator=g, dtype=dtype)
    expected = entropy_ess(RecurrentOperator(a, b, c))
    monkeypatch.setattr(gramian_svals, "JITTER_EPS", 0.0)
    monkeypatch.setattr(torch.linalg, "cholesky_ex", counting)
    ess = _finite_grads(RecurrentOperator, (a, b, c))
    assert calls and calls[0] > 0, "the first factorization should fail somewhere"
    # H_i has rank <= 1: ESS is 1 (or 0) on both, but for the round-off of two runs (the ladder's larger
    # jitter is corrected for as the default one is)
    bound = _ess_error(RecurrentOperator(a, b, c), "gramian", k=2)
    assert_within(ess, expected, bound, "jitter ladder vs default jitter")
    with torch.no_grad():  # the no-grad branch patches only the failed factors
        assert_within(entropy_ess(RecurrentOperator(a, b, c)), expected, bound, "no-grad ladder")
