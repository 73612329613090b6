"""ESS engine: exact cases, Gramian vs dense, references, chunking, invariances, aggregates."""

from __future__ import annotations

import math

import pytest
import torch

from ess_train.ess import (
    DenseOperator,
    RecurrentOperator,
    average_ess,
    default_rtol,
    entropy_ess,
    hankel_singular_values,
    max_ess,
    tolerance_ess,
    tss_fraction,
)
from tests.tolerances import (
    assert_within,
    entropy_ess_error,
    gramian_eig_error,
    gramian_scale,
    gramian_sigma_error,
    near_threshold,
    sigma_error_from_eig,
    svd_error,
    tol,
)

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# slow, obvious references (a python loop of svdvals over positions)


def ref_svals(T: torch.Tensor) -> list[torch.Tensor]:
    """sigma(H_i) for each i, each a tensor [..., min(i, L - i)] (empty for i = 0)."""
    L = T.shape[-1]
    return [torch.linalg.svdvals(T[..., i:, :i]) if i else T.new_zeros(*T.shape[:-2], 0) for i in range(L)]


def ref_entropy(s: torch.Tensor) -> float:
    s = s[s > 0]
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return math.exp(float(-(p * p.log()).sum()))


def ref_tolerance(svals: list[torch.Tensor], rtol: float) -> list[int]:
    scale = max((float(s.max()) for s in svals if s.numel()), default=0.0)
    return [int((s > rtol * scale).sum()) for s in svals]


def random_diagonal(B: int, L: int, N: int, *, seed: int, dtype=F64) -> RecurrentOperator:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(B, L, N, generator=g, dtype=dtype) * 0.9 + 0.05
    b = torch.randn(B, L, N, generator=g, dtype=dtype)
    c = torch.randn(B, L, N, generator=g, dtype=dtype)
    return RecurrentOperator(a, b, c)


def random_full(B: int, L: int, N: int, *, seed: int, dtype=F64) -> RecurrentOperator:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, L, N, N, generator=g, dtype=dtype) / N**0.5
    b = torch.randn(B, L, N, generator=g, dtype=dtype)
    c = torch.randn(B, L, N, generator=g, dtype=dtype)
    return RecurrentOperator(a, b, c)


def mamba_like(B: int, L: int, N: int, *, seed: int) -> RecurrentOperator:
    """Input-dependent decays exp(-dt_t * A_n) over 3 decades, with some exact zeros (a reset)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.arange(1, N + 1, dtype=F64)
    dt = torch.exp(torch.rand(B, L, 1, generator=g, dtype=F64) * math.log(100.0) + math.log(1e-3))
    a = torch.exp(-dt * A)
    a[:, L // 3, :] = 0.0  # forget everything once
    b = torch.randn(B, L, N, generator=g, dtype=F64)
    c = torch.randn(B, L, N, generator=g, dtype=F64)
    return RecurrentOperator(a, b, c)


def on(op: RecurrentOperator, device: torch.device) -> RecurrentOperator:
    """``op`` with its tensors on ``device`` (operators are drawn on the CPU: the same values everywhere)."""
    return RecurrentOperator(op.a.to(device), op.b.to(device), op.c.to(device))


def min_i_L(L: int, cap: int) -> torch.Tensor:
    i = torch.arange(L)
    return torch.minimum(torch.minimum(i, L - i), torch.tensor(cap))


# round-off bounds (tests/tolerances.py): ``k`` independent computations of the same quantity differ by
# at most ``k`` times the bound of one


def gram_delta(op: RecurrentOperator, k: int = 1, dtype=F64) -> torch.Tensor:
    """Bound on the Gramian path's error in ``sigma^2`` at each position, ``[..., L, 1]``."""
    return k * gramian_eig_error(dtype, gramian_scale(op), op.seq_len, op.state_dim)


def dense_dsigma(s: torch.Tensor, L: int, k: int = 1, dtype=F64) -> torch.Tensor:
    """Bound on the dense path's error in each ``sigma(H_i)`` (``s [..., P, K]``; at most ``L`` rows)."""
    return k * svd_error(dtype, s.double().amax(-1, keepdim=True), L, L)


# ----------------------------------------------------------------------------------------------
# dense path against the reference


def test_dense_matches_python_loop_reference(device):
    g = torch.Generator().manual_seed(0)
    T = torch.tril(torch.randn(2, 21, 21, generator=g, dtype=F64)).to(device)
    s = hankel_singular_values(DenseOperator(T))
    assert s.shape == (2, 21, 10)
    e = entropy_ess(DenseOperator(T))
    L = 21
    for b in range(2):
        ref = ref_svals(T[b])
        thr = default_rtol(F64) * max(float(r.max()) for r in ref if r.numel())
        t = tolerance_ess(DenseOperator(T[b]))
        for i, (r, t_ref) in enumerate(zip(ref, ref_tolerance(ref, default_rtol(F64)))):
            k = r.numel()
            ds = 2 * svd_error(F64, float(r.max()) if k else 0.0, L - i, i)  # two SVDs of H_i
            assert_within(s[b, i, :k], r, ds, f"sigma(H_{i})")
            assert bool((s[b, i, k:] == 0).all())
            assert_within(e[b, i], ref_entropy(r), entropy_ess_error(r, ds), f"entropy-ESS_{i}")
            # counts agree but for a sigma that round-off may put on either side of the threshold
            assert abs(int(t[i]) - t_ref) <= int(near_threshold(r, thr, ds + default_rtol(F64) * ds))
    assert bool((s[..., :-1] >= s[..., 1:]).all()), "descending"


# ----------------------------------------------------------------------------------------------
# exact cases of ESS.md


@pytest.mark.parametrize("k", [1, 3, 5])
def test_delay_has_ess_min_k_i_L_minus_i(k):
    L = 24
    T = torch.diag_embed(torch.ones(L - k, dtype=F64), offset=-k)
    expected = min_i_L(L, k)
    assert tolerance_ess(DenseOperator(T)).tolist() == expected.tolist()
    # all non-zero singular values are 1: entropy-ESS equals the rank
    s = hankel_singular_values(DenseOperator(T))
    assert_within(entropy_ess(DenseOperator(T)), expected, entropy_ess_error(s, dense_dsigma(s, L)), "dense")
    # the same delay as a shift register with N = k + 1 states (full transitions), Gramian path
    N = k + 1
    A = torch.diag_embed(torch.ones(N - 1, dtype=F64), offset=-1).expand(L, N, N)
    b = torch.zeros(L, N, dtype=F64)
    b[:, 0] = 1
    c = torch.zeros(L, N, dtype=F64)
    c[:, -1] = 1
    op = RecurrentOperator(A, b, c)
    torch.testing.assert_close(op.dense(), T)
    assert tolerance_ess(op).tolist() == expected.tolist()
    s = hankel_singular_values(op)
    ds = sigma_error_from_eig(s, gram_delta(op))
    assert_within(entropy_ess(op), expected, entropy_ess_error(s, ds), "Gramian")


def test_causal_running_mean_has_ess_one():
    L = 30
    t = torch.arange(L, dtype=F64)
    T = torch.tril(1.0 / (t + 1).unsqueeze(1).expand(L, L))
    expected = (torch.arange(L) >= 1).long()
    assert tolerance_ess(DenseOperator(T)).tolist() == expected.tolist()
    s = hankel_singular_values(DenseOperator(T))
    assert_within(entropy_ess(DenseOperator(T)), expected, entropy_ess_error(s, dense_dsigma(s, L)), "dense")
    # recurrence: h_t = h_{t-1} + u_t, y_t = h_t / (t + 1)
    op = RecurrentOperator(
        torch.ones(L, 1, dtype=F64), torch.ones(L, 1, dtype=F64), (1.0 / (t + 1)).unsqueeze(1)
    )
    torch.testing.assert_close(op.dense(), T)
    assert tolerance_ess(op).tolist() == expected.tolist()
    s = hankel_singular_values(op)
    ds = sigma_error_from_eig(s, gram_delta(op))
    assert_within(entropy_ess(op), expected, entropy_ess_error(s, ds), "Gramian")


@pytest.mark.parametrize("w", [2, 4, 7])
def test_uniform_sliding_window_attention(w):
    L = 26
    t = torch.arange(L).view(-1, 1)
    s = torch.arange(L).view(1, -1)
    inside = (s <= t) & (s > t - w)
    T = inside.to(F64) / inside.sum(-1, keepdim=True)
    assert tolerance_ess(DenseOperator(T)).tolist() == min_i_L(L, w - 1).tolist()


@pytest.mark.parametrize("d", [1, 3, 6])
def test_linear_attention_has_ess_min_d_i_L_minus_i(d):
    L = 28
    g = torch.Generator().manual_seed(d)
    q = torch.randn(2, L, d, generator=g, dtype=F64)
    k = torch.randn(2, L, d, generator=g, dtype=F64)
    T = torch.tril(q @ k.mT)
    expected = min_i_L(L, d).expand(2, L)
    assert tolerance_ess(DenseOperator(T)).tolist() == expected.tolist()
    # as a recurrence h_t = h_{t-1} + k_t u_t, y_t = q_t . h_t (a = 1), in a state of size N > d
    N = d + 3
    U = torch.linalg.qr(torch.randn(N, d, generator=g, dtype=F64))[0]  # generic d-dim subspace
    op = RecurrentOperator(torch.ones(2, L, N, dtype=F64), k @ U.T, q @ U.T)
    # T[t, s] = (q_t U^T) . (U k_s): dots of N and d terms, and U^T U = I up to N eps
    qk = torch.tril(q.norm(dim=-1, keepdim=True) * k.norm(dim=-1).unsqueeze(-2))
    assert_within(op.dense(), T, tol(F64, qk, n=2 * N + d), "T of the realization")
    assert tolerance_ess(op).tolist() == expected.tolist()
    assert tolerance_ess(op, method="dense").tolist() == expected.tolist()
    # float32 Gramian path: the rank deficiency is exact too (and its default rtol is coarser); counts
    # agree but for a sigma that float32 round-off may put on either side of the threshold
    op32 = RecurrentOperator(op.a.float(), op.b.float(), op.c.float())
    s64 = hankel_singular_values(op)
    thr = default_rtol(torch.float32) * s64.amax(dim=(-2, -1), keepdim=True)
    near = near_threshold(s64, thr, gramian_sigma_error(torch.float32, s64, gramian_scale(op), L, N, k=2))
    t64 = tolerance_ess(op, rtol=default_rtol(torch.float32))
    assert bool(((tolerance_ess(op32) - t64).abs() <= near).all())
    s = hankel_singular_values(op32)
    assert bool((s[..., d:] == 0).all())


# ----------------------------------------------------------------------------------------------
# Gramian path against the dense path (float64)


def _assert_gramian_matches_dense(op: RecurrentOperator):
    sg = hankel_singular_values(op)
    sd = hankel_singular_values(op, method="dense")
    assert sg.shape == sd.shape == (*op.batch_shape, op.seq_len, op.state_dim)
    scale = sd.amax(dim=(-2, -1), keepdim=True)
    # sigma^2 agree to the Gramian path's absolute resolution ~ (L + N) eps times the Gramians' size at
    # each position (tests/tolerances.py), plus the SVD's
    delta = gram_delta(op) + 2 * sd.amax(-1, keepdim=True) * dense_dsigma(sd, op.seq_len)
    assert_within(sg**2, sd**2, delta, "sigma^2, Gramian vs dense")
    ds = sigma_error_from_eig(sd, delta)
    eg = entropy_ess(op)
    ed = entropy_ess(op, method="dense")
    assert bool((eg[..., 0] == 0).all()) and bool((ed[..., 0] == 0).all())
    assert_within(eg, ed, entropy_ess_error(sd, ds), "entropy-ESS, Gramian vs dense")
    # tolerance-ESS equal, except for a sigma that round-off may put on either side of the threshold
    tg, td = tolerance_ess(op), tolerance_ess(op, method="dense")
    thr = default_rtol(F64) * scale
    near = near_threshold(sd, thr, ds + default_rtol(F64) * ds.amax(dim=(-2, -1), keepdim=True))
    assert bool(((tg - td).abs() <= near).all())
    assert float((near > 0).float().mean()) < 0.1
    assert float((tg == td).float().mean()) > 0.9


@pytest.mark.parametrize("L,N", [(40, 4), (33, 7), (48, 12)])
def test_gramian_matches_dense_diagonal(L, N, gramian_path, device):
    _assert_gramian_matches_dense(on(random_diagonal(2, L, N, seed=L + N), device))


@pytest.mark.parametrize("L,N", [(40, 4), (31, 6)])
def test_gramian_matches_dense_full(L, N, device):
    _assert_gramian_matches_dense(on(random_full(2, L, N, seed=L * N), device))


def test_gramian_matches_dense_mamba_like_with_zero_decays(gramian_path, device):
    op = on(mamba_like(2, 40, 6, seed=3), device)
    sg = hankel_singular_values(op)
    sd = hankel_singular_values(op, method="dense")
    delta = gram_delta(op) + 2 * sd.amax(-1, keepdim=True) * dense_dsigma(sd, op.seq_len)
    assert_within(sg**2, sd**2, delta, "sigma^2, Gramian vs dense")
    eg, ed = entropy_ess(op), entropy_ess(op, method="dense")
    assert_within(eg, ed, entropy_ess_error(sd, sigma_error_from_eig(sd, delta)), "entropy-ESS")
    # the reset at L // 3 cuts the past: H_{L//3 + 1} sees only u_{L//3}, rank <= 1
    assert tolerance_ess(op)[..., 40 // 3 + 1].tolist() == [1, 1]


def test_float32_gramian_close_to_float64(gramian_path, device):
    op = on(random_diagonal(2, 48, 8, seed=11), device)
    op32 = RecurrentOperator(op.a.float(), op.b.float(), op.c.float())
    e64 = entropy_ess(op, method="dense")
    e32 = entropy_ess(op32)
    assert e32.dtype == torch.float32
    # float32 Gramian round-off (it covers rounding the inputs; the float64 reference's is negligible):
    # float64 sums, float32 products, unsquared (tests/tolerances.py), then propagated to entropy-ESS
    sd = hankel_singular_values(op, method="dense")
    ds = gramian_sigma_error(torch.float32, sd, gramian_scale(op), 48, 8)
    assert_within(hankel_singular_values(op32), sd, ds, "sigma, float32 Gramian")
    bound = entropy_ess_error(sd, ds, torch.float32)
    assert_within(e32, e64, bound, "entropy-ESS, float32 Gramian vs float64 dense")


# ----------------------------------------------------------------------------------------------
# invariances, positions, chunking


@pytest.mark.parametrize("alpha", [1e-3, 7.0, 1e4])
def test_scale_invariance(alpha, gramian_path):
    # scaling rounds the inputs (relative eps), then both runs carry their own round-off
    op = random_diagonal(2, 30, 5, seed=5)
    scaled = RecurrentOperator(op.a, op.b, op.c * alpha)
    s = hankel_singular_values(op)
    ds = sigma_error_from_eig(s, gram_delta(op, 2))
    assert_within(entropy_ess(scaled), entropy_ess(op), entropy_ess_error(s, ds), "Gramian")
    thr = default_rtol(F64) * s.amax(dim=(-2, -1), keepdim=True)
    assert bool(((tolerance_ess(scaled) - tolerance_ess(op)).abs() <= near_threshold(s, thr, 2 * ds)).all())
    T = op.dense()
    s = hankel_singular_values(T)
    ds = dense_dsigma(s, 30, 2)
    assert_within(entropy_ess(T * alpha), entropy_ess(T), entropy_ess_error(s, ds), "dense")
    thr = default_rtol(F64) * s.amax(dim=(-2, -1), keepdim=True)
    assert bool(((tolerance_ess(T * alpha) - tolerance_ess(T)).abs() <= near_threshold(s, thr, 2 * ds)).all())


def test_positions_subset_order_duplicates(device):
    # a few positions take the segment path, all of them the scan: the same values up to round-off
    op = on(random_diagonal(3, 20, 4, seed=1), device)
    full = hankel_singular_values(op)
    pos = [7, 0, 19, 7, 3]
    delta = gram_delta(op, 2)
    for p in (pos, torch.tensor(pos)):
        got = hankel_singular_values(op, p)
        assert_within(got**2, full[:, pos] ** 2, delta[:, pos], "sigma^2 of a subset")
        assert torch.equal(got[:, 0], got[:, 3])  # a duplicate is the same value
    ds = sigma_error_from_eig(full, delta)
    assert_within(entropy_ess(op, [5]), entropy_ess(op)[:, 5:6], entropy_ess_error(full, ds)[:, 5:6], "ESS_5")
    # dense: other crops of T, other SVD problems
    dense_full = hankel_singular_values(op, method="dense")
    bound = dense_dsigma(dense_full, 20, 2)[:, pos]
    assert_within(hankel_singular_values(op, pos, method="dense"), dense_full[:, pos], bound, "dense subset")
    assert hankel_singular_values(op, []).shape == (3, 0, 4)
    # a subset thresholded against the whole sequence's scale
    scale = full.amax(dim=(-2, -1))
    near = near_threshold(full, default_rtol(F64) * scale[:, None, None], ds)[:, pos]
    assert bool(((tolerance_ess(op, pos, scale=scale) - tolerance_ess(op)[:, pos]).abs() <= near).all())


@pytest.mark.parametrize("make", [random_diagonal, random_full])
def test_chunking_does_not_change_results(make, gramian_path, device):
    # chunks re-associate the scans' products and sums: equal up to two runs' round-off
    op = on(make(3, 37, 5, seed=2), device)
    ref = hankel_singular_values(op)
    delta = gram_delta(op, 2)
    e_ref, e_bound = entropy_ess(op), entropy_ess_error(ref, sigma_error_from_eig(ref, delta))
    # batch chunks, then position chunks (Q checkpoints), down to one position at a time
    for ce in (37 * 5 * 16 * 2, 37 * 5 * 16 - 1, 300, 25, 1):
        got = hankel_singular_values(op, chunk_elements=ce)
        assert_within(got**2, ref**2, delta, f"sigma^2, chunk_elements={ce}")
        assert_within(entropy_ess(op, chunk_elements=ce), e_ref, e_bound, f"ESS, chunk_elements={ce}")
    dref = hankel_singular_values(op, method="dense")
    for ce in (5000, 400, 1):
        got = hankel_singular_values(op, method="dense", chunk_elements=ce)
        assert_within(got, dref, dense_dsigma(dref, 37, 2), f"dense, chunk_elements={ce}")


def test_dense_operator_shapes_and_K():
    T = torch.tril(torch.randn(2, 3, 9, 9, dtype=F64))
    assert hankel_singular_values(T).shape == (2, 3, 9, 4)
    assert entropy_ess(T).shape == (2, 3, 9)
    assert tolerance_ess(T).shape == (2, 3, 9) and tolerance_ess(T).dtype == torch.long
    op = random_diagonal(2, 9, 6, seed=0)  # N = 6 > L // 2 = 4: K = N on both paths
    assert hankel_singular_values(op, method="dense").shape == (2, 9, 6)


def test_zero_operator_has_zero_ess(gramian_path):
    for op in (
        DenseOperator(torch.zeros(2, 8, 8)),
        RecurrentOperator(*(torch.zeros(2, 8, 3) for _ in range(3))),
    ):
        assert bool((entropy_ess(op) == 0).all())
        assert bool((tolerance_ess(op) == 0).all())
        assert bool((hankel_singular_values(op) == 0).all())


# ----------------------------------------------------------------------------------------------
# aggregates


def test_aggregates():
    ess = torch.tensor([[0.0, 1.0, 2.0, 1.0], [0.0, 3.0, 3.0, 2.0]])
    torch.testing.assert_close(average_ess(ess), torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(max_ess(ess), torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(tss_fraction(max_ess(ess), 4), torch.tensor([0.5, 0.75]))
    counts = torch.tensor([0, 1, 2, 3])
    assert average_ess(counts).item() == 1.5 and average_ess(counts).is_floating_point()
    assert tss_fraction(counts, torch.tensor(3)).dtype.is_floating_point
    with pytest.raises(ValueError, match="tss"):
        tss_fraction(ess, 0)


# ----------------------------------------------------------------------------------------------
# state rescaling (b -> D b, c -> D^-1 c leaves T unchanged) must not change the Gramian path


def _rescaled(spread: float, dtype) -> tuple[RecurrentOperator, torch.Tensor]:
    g = torch.Generator().manual_seed(21)
    B, L, N = 2, 64, 8
    a = torch.rand(B, L, N, generator=g, dtype=F64)
    b = torch.randn(B, L, N, generator=g, dtype=F64)
    c = torch.randn(B, L, N, generator=g, dtype=F64)
    D = torch.logspace(0, math.log10(spread), N, dtype=F64)
    return RecurrentOperator(a.to(dtype), (b * D).to(dtype), (c / D).to(dtype)), RecurrentOperator(
        a, b, c
    ).dense()


@pytest.mark.parametrize("dtype,spreads", [(torch.float32, [10.0, 100.0]), (F64, [10.0, 100.0, 1e3])])
def test_gramian_invariant_to_state_rescaling(dtype, spreads, gramian_path):
    op1, T = _rescaled(1.0, dtype)
    e1, t1 = entropy_ess(op1), tolerance_ess(op1)
    ed = entropy_ess(T.to(dtype))
    sd = hankel_singular_values(T)  # float64 reference singular values
    # the rescaled runs are the same operator: they may differ from the reference (and from each other)
    # by the Gramian path's round-off at ``dtype`` (which covers rounding the inputs to ``dtype``) and the
    # dense path's; a state rescaling must not add to it
    N = op1.state_dim  # H_i has rank <= N: the dense path's other L // 2 - N values are round-off
    ds = dense_dsigma(sd, 64, 1, dtype).expand_as(sd).clone()
    ds[..., :N] += gramian_sigma_error(dtype, sd[..., :N], gramian_scale(op1), 64, N, k=2)
    e_bound = entropy_ess_error(sd, ds, dtype)
    thr = default_rtol(dtype) * sd.amax(dim=(-2, -1), keepdim=True)
    near = near_threshold(sd, thr, ds)
    td = (sd > thr).sum(-1)  # dense counts at this dtype's default rtol
    assert_within(e1, ed, e_bound, "entropy-ESS, Gramian vs dense")
    assert bool(((t1 - td).abs() <= near).all())
    for spread in spreads:
        op, T2 = _rescaled(spread, dtype)
        torch.testing.assert_close(T2, T)  # same operator
        e, t = entropy_ess(op), tolerance_ess(op)
        assert_within(e, e1, e_bound, f"entropy-ESS, rescaled by {spread} vs not")
        assert_within(e, ed, e_bound, f"entropy-ESS, rescaled by {spread} vs dense")
        assert bool(((t - td).abs() <= near).all()), spread
        assert bool(((t - t1).abs() <= 2 * near).all()), spread


def test_float32_keeps_small_singular_values(gramian_path):
    """sigma / sigma_max(H_i) down to 1e-5 (the float32 default rtol, ~100 eps32) survives in float32, to
    the error model of float64 sums and float32 products (no squaring: tests/tolerances.py)."""
    g = torch.Generator().manual_seed(0)
    B, L, N = 16, 64, 8
    a = torch.randn(B, L, N, generator=g)
    b = torch.randn(B, L, N, generator=g)
    c = torch.randn(B, L, N, generator=g)
    D = torch.logspace(0, 2, N)
    op64 = RecurrentOperator(a.double(), b.double(), c.double())
    sd = hankel_singular_values(op64, method="dense")
    r = sd / sd.amax(-1, keepdim=True).clamp_min(1e-300)
    small = (r > 1e-5) & (r < 1e-3)
    assert int(small.sum()) > 100
    ds = gramian_sigma_error(torch.float32, sd, gramian_scale(op64), L, N)
    ds = ds + 2 * dense_dsigma(sd, L)  # the float64 reference's own
    for op in (RecurrentOperator(a, b, c), RecurrentOperator(a, b * D, c / D)):
        sg = hankel_singular_values(op).double()
        assert int((sg[small] == 0).sum()) == 0
        assert_within(sg[small], sd[small], ds.expand_as(sd)[small], "small sigma, float32 Gramian")


# ----------------------------------------------------------------------------------------------
# the segment path (diagonal transitions, few positions) against the full scan


def _signed_with_zeros(B: int, L: int, N: int, *, seed: int) -> RecurrentOperator:
    """Diagonal transitions of both signs, with exact zeros (resets) in two places."""
    op = random_diagonal(B, L, N, seed=seed)
    sign = torch.where(torch.arange(L * N).reshape(L, N) % 3 == 0, -1.0, 1.0).to(F64)
    a = op.a * sign
    a[:, L // 4] = 0.0
    a[0, L // 2, 0] = 0.0
    return RecurrentOperator(a, op.b, op.c)


@pytest.mark.parametrize("make", [random_diagonal, mamba_like, _signed_with_zeros])
@pytest.mark.parametrize(
    "positions", [[0], [45], [1, 2, 3], [0, 44, 45], list(range(0, 46, 9)), [3, 17, 18, 30, 31, 40]]
)
def test_segment_path_matches_scan(monkeypatch, make, positions, device):
    import ess_train.ess.gramian as gramian

    op = on(make(2, 46, 5, seed=len(positions)), device)
    monkeypatch.setattr(gramian, "use_segments", lambda n_pos, L: False)
    ref = hankel_singular_values(op)[:, positions]
    monkeypatch.setattr(gramian, "use_segments", lambda n_pos, L: True)
    got = hankel_singular_values(op, positions)
    assert_within(got**2, ref**2, gram_delta(op, 2)[:, positions], "sigma^2, segments vs scan")
    # batch chunking of the segment path changes nothing
    chunked = hankel_singular_values(op, positions, chunk_elements=60)
    assert_within(chunked**2, got**2, gram_delta(op, 2)[:, positions], "sigma^2, batch chunks")


def test_segment_starts_cover_positions_with_bounded_segments():
    from ess_train.ess.gramian import segment_starts

    for L, pos in [(46, [0]), (46, [45]), (1000, [1, 2, 3]), (128, list(range(1, 128, 8))), (7, [0, 6])]:
        starts = segment_starts(pos, L)
        assert starts[0] == 0 and starts == sorted(set(starts)) and set(pos) <= set(starts)
        lengths = [b - a for a, b in zip(starts, [*starts[1:], L])]
        assert min(lengths) >= 1 and max(lengths) <= 2 * -(-L // len(pos))
    # evenly spaced positions need no extra cut
    assert segment_starts(list(range(1, 128, 8)), 128) == [0, *range(1, 128, 8)]


def test_auto_picks_segments_for_few_positions_only():
    from ess_train.ess.gramian import use_segments

    assert use_segments(16, 128) and use_segments(16, 64) and use_segments(256, 1024)
    assert not use_segments(128, 128) and not use_segments(257, 1024)


def test_dense_chunks_bound_memory_and_padding() -> None:
    """Every position lands in exactly one chunk; a chunk holds at most ``budget`` entries (or one
    position) and pads its SVD work to at most twice its positions' own: few spread-out positions are
    not all cropped to ``[L - 1, L - 1]``."""
    from ess_train.ess.dense_svd import plan_dense_chunks

    def svd_cost(r: int, c: int) -> int:
        return r * c * min(r, c)

    L = 128
    for pos, budget in (([1, 9, 17, 33, 64, 100, 127], 1 << 30), (list(range(L)), 4000), ([0, 5], 10)):
        chunks = plan_dense_chunks(pos, L, budget)
        assert [i for lo, hi in chunks for i in pos[lo:hi]] == pos
        for lo, hi in chunks:
            n, i0, i1 = hi - lo, pos[lo], pos[hi - 1]
            if n > 1:
                assert n * (L - i0) * i1 <= budget
                assert n * svd_cost(L - i0, i1) <= 2 * sum(svd_cost(L - i, i) for i in pos[lo:hi])
    assert len(plan_dense_chunks([1, 9, 17, 33, 64, 100, 127], L, 1 << 30)) > 1
    with pytest.raises(ValueError, match="max_waste"):
        plan_dense_chunks([1, 2], L, 100, float("nan"))
