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
    state_utilization,
    tolerance_ess,
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


def min_i_L(L: int, cap: int) -> torch.Tensor:
    i = torch.arange(L)
    return torch.minimum(torch.minimum(i, L - i), torch.tensor(cap))


# ----------------------------------------------------------------------------------------------
# dense path against the reference


def test_dense_matches_python_loop_reference():
    g = torch.Generator().manual_seed(0)
    T = torch.tril(torch.randn(2, 21, 21, generator=g, dtype=F64))
    s = hankel_singular_values(DenseOperator(T))
    assert s.shape == (2, 21, 10)
    e = entropy_ess(DenseOperator(T))
    for b in range(2):
        ref = ref_svals(T[b])
        for i, r in enumerate(ref):
            k = r.numel()
            torch.testing.assert_close(s[b, i, :k], r, rtol=1e-12, atol=1e-12)
            assert bool((s[b, i, k:] == 0).all())
            assert e[b, i].item() == pytest.approx(ref_entropy(r), rel=1e-12, abs=1e-12)
        t = tolerance_ess(DenseOperator(T[b]))
        assert t.tolist() == ref_tolerance(ref, default_rtol(F64))
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
    torch.testing.assert_close(entropy_ess(DenseOperator(T)), expected.to(F64), rtol=1e-10, atol=1e-10)
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
    torch.testing.assert_close(entropy_ess(op), expected.to(F64), rtol=1e-10, atol=1e-10)


def test_causal_running_mean_has_ess_one():
    L = 30
    t = torch.arange(L, dtype=F64)
    T = torch.tril(1.0 / (t + 1).unsqueeze(1).expand(L, L))
    expected = (torch.arange(L) >= 1).long()
    assert tolerance_ess(DenseOperator(T)).tolist() == expected.tolist()
    torch.testing.assert_close(entropy_ess(DenseOperator(T)), expected.to(F64), atol=1e-10, rtol=0)
    # recurrence: h_t = h_{t-1} + u_t, y_t = h_t / (t + 1)
    op = RecurrentOperator(
        torch.ones(L, 1, dtype=F64), torch.ones(L, 1, dtype=F64), (1.0 / (t + 1)).unsqueeze(1)
    )
    torch.testing.assert_close(op.dense(), T)
    assert tolerance_ess(op).tolist() == expected.tolist()
    torch.testing.assert_close(entropy_ess(op), expected.to(F64), atol=1e-10, rtol=0)


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
    torch.testing.assert_close(op.dense(), T)
    assert tolerance_ess(op).tolist() == expected.tolist()
    assert tolerance_ess(op, method="dense").tolist() == expected.tolist()
    # float32 Gramian path: the rank deficiency is exact too (and its default rtol is coarser)
    op32 = RecurrentOperator(op.a.float(), op.b.float(), op.c.float())
    assert torch.equal(tolerance_ess(op32), tolerance_ess(op, rtol=default_rtol(torch.float32)))
    s = hankel_singular_values(op32)
    assert bool((s[..., d:] == 0).all())


# ----------------------------------------------------------------------------------------------
# Gramian path against the dense path (float64)


def _assert_gramian_matches_dense(op: RecurrentOperator):
    sg = hankel_singular_values(op)
    sd = hankel_singular_values(op, method="dense")
    assert sg.shape == sd.shape == (*op.batch_shape, op.seq_len, op.state_dim)
    scale = sd.amax(dim=(-2, -1), keepdim=True)
    # singular values agree to the Gramian resolution sqrt(eps) * sigma_max
    assert float(((sg - sd).abs() / scale).max()) < 1e-6
    eg = entropy_ess(op)
    ed = entropy_ess(op, method="dense")
    assert bool((eg[..., 0] == 0).all()) and bool((ed[..., 0] == 0).all())
    assert float(((eg - ed).abs() / ed.clamp_min(1e-300))[..., 1:].max()) < 1e-5
    # tolerance-ESS equal, except that a sigma within 10% of the threshold may fall either way
    tg, td = tolerance_ess(op), tolerance_ess(op, method="dense")
    thr = default_rtol(F64) * scale
    near = ((sd > thr * 0.9) & (sd < thr * 1.1)).sum(-1)
    assert bool(((tg - td).abs() <= near).all())
    assert float((near > 0).float().mean()) < 0.1
    assert float((tg == td).float().mean()) > 0.9


@pytest.mark.parametrize("L,N", [(40, 4), (33, 7), (48, 12)])
def test_gramian_matches_dense_diagonal(L, N, gramian_path):
    _assert_gramian_matches_dense(random_diagonal(2, L, N, seed=L + N))


@pytest.mark.parametrize("L,N", [(40, 4), (31, 6)])
def test_gramian_matches_dense_full(L, N):
    _assert_gramian_matches_dense(random_full(2, L, N, seed=L * N))


def test_gramian_matches_dense_mamba_like_with_zero_decays(gramian_path):
    op = mamba_like(2, 40, 6, seed=3)
    sg = hankel_singular_values(op)
    sd = hankel_singular_values(op, method="dense")
    scale = sd.amax(dim=(-2, -1), keepdim=True)
    assert float(((sg - sd).abs() / scale).max()) < 1e-6
    eg, ed = entropy_ess(op), entropy_ess(op, method="dense")
    assert float(((eg - ed).abs() / ed.clamp_min(1e-300))[..., 1:].max()) < 1e-5
    # the reset at L // 3 cuts the past: H_{L//3 + 1} sees only u_{L//3}, rank <= 1
    assert tolerance_ess(op)[..., 40 // 3 + 1].tolist() == [1, 1]


def test_float32_gramian_close_to_float64(gramian_path):
    op = random_diagonal(2, 48, 8, seed=11)
    op32 = RecurrentOperator(op.a.float(), op.b.float(), op.c.float())
    e64 = entropy_ess(op, method="dense")
    e32 = entropy_ess(op32)
    assert e32.dtype == torch.float32
    assert float(((e32.double() - e64).abs() / e64.clamp_min(1e-30))[..., 1:].max()) < 5e-2


# ----------------------------------------------------------------------------------------------
# invariances, positions, chunking


@pytest.mark.parametrize("alpha", [1e-3, 7.0, 1e4])
def test_scale_invariance(alpha, gramian_path):
    op = random_diagonal(2, 30, 5, seed=5)
    scaled = RecurrentOperator(op.a, op.b, op.c * alpha)
    torch.testing.assert_close(entropy_ess(scaled), entropy_ess(op), rtol=1e-9, atol=1e-9)
    assert torch.equal(tolerance_ess(scaled), tolerance_ess(op))
    T = op.dense()
    torch.testing.assert_close(entropy_ess(T * alpha), entropy_ess(T), rtol=1e-12, atol=1e-12)
    assert torch.equal(tolerance_ess(T * alpha), tolerance_ess(T))


def test_positions_subset_order_duplicates():
    op = random_diagonal(3, 20, 4, seed=1)
    full = hankel_singular_values(op)
    pos = [7, 0, 19, 7, 3]
    for p in (pos, torch.tensor(pos)):
        torch.testing.assert_close(hankel_singular_values(op, p), full[:, pos], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(entropy_ess(op, 5), entropy_ess(op)[:, 5:6])
    dense_full = hankel_singular_values(op, method="dense")
    torch.testing.assert_close(hankel_singular_values(op, pos, method="dense"), dense_full[:, pos])
    assert hankel_singular_values(op, []).shape == (3, 0, 4)
    # a subset thresholded against the whole sequence's scale
    scale = full.amax(dim=(-2, -1))
    assert torch.equal(tolerance_ess(op, pos, scale=scale), tolerance_ess(op)[:, pos])


@pytest.mark.parametrize("make", [random_diagonal, random_full])
def test_chunking_does_not_change_results(make, gramian_path):
    op = make(3, 37, 5, seed=2)
    ref = hankel_singular_values(op)
    # batch chunks, then position chunks (Q checkpoints), down to one position at a time
    for ce in (37 * 5 * 16 * 2, 37 * 5 * 16 - 1, 300, 25, 1):
        got = hankel_singular_values(op, chunk_elements=ce)
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9 * float(ref.max()))
        torch.testing.assert_close(entropy_ess(op, chunk_elements=ce), entropy_ess(op), rtol=1e-9, atol=0)
    dref = hankel_singular_values(op, method="dense")
    for ce in (5000, 400, 1):
        torch.testing.assert_close(hankel_singular_values(op, method="dense", chunk_elements=ce), dref)


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
    torch.testing.assert_close(state_utilization(max_ess(ess), 4), torch.tensor([0.5, 0.75]))
    counts = torch.tensor([0, 1, 2, 3])
    assert average_ess(counts).item() == 1.5 and average_ess(counts).is_floating_point()
    assert state_utilization(counts, torch.tensor(3)).dtype.is_floating_point
    with pytest.raises(ValueError, match="tss"):
        state_utilization(ess, 0)


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
    thr = default_rtol(dtype) * sd.amax(dim=(-2, -1), keepdim=True)
    near = ((sd > thr * 0.9) & (sd < thr * 1.1)).sum(-1)
    td = (sd > thr).sum(-1)  # dense counts at this dtype's default rtol
    rel = 1e-2 if dtype == torch.float32 else 1e-6
    assert float(((e1 - ed).abs() / ed.clamp_min(1e-30))[..., 1:].max()) < rel
    assert bool(((t1 - td).abs() <= near).all())
    for spread in spreads:
        op, T2 = _rescaled(spread, dtype)
        torch.testing.assert_close(T2, T)  # same operator
        e, t = entropy_ess(op), tolerance_ess(op)
        assert float(((e - e1).abs() / e1.clamp_min(1e-30))[..., 1:].max()) < rel, spread
        assert float(((e - ed).abs() / ed.clamp_min(1e-30))[..., 1:].max()) < rel, spread
        assert bool(((t - td).abs() <= near).all()), spread
        assert bool(((t - t1).abs() <= near).all()), spread


def test_float32_keeps_small_singular_values(gramian_path):
    """sigma / sigma_max(H_i) >= 2e-3 (about 6x the sqrt(eps) floor) survives the jitter correction."""
    g = torch.Generator().manual_seed(0)
    B, L, N = 16, 64, 8
    a = torch.randn(B, L, N, generator=g)
    b = torch.randn(B, L, N, generator=g)
    c = torch.randn(B, L, N, generator=g)
    D = torch.logspace(0, 2, N)
    sd = hankel_singular_values(RecurrentOperator(a.double(), b.double(), c.double()), method="dense")
    r = sd / sd.amax(-1, keepdim=True).clamp_min(1e-300)
    small = (r > 2e-3) & (r < 1e-2)
    assert int(small.sum()) > 100
    for op in (RecurrentOperator(a, b, c), RecurrentOperator(a, b * D, c / D)):
        sg = hankel_singular_values(op).double()
        assert int((sg[small] == 0).sum()) == 0
        assert float(((sg - sd).abs() / sd)[small].max()) < 0.5


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
def test_segment_path_matches_scan(monkeypatch, make, positions):
    import ess_train.ess.gramian as gramian

    op = make(2, 46, 5, seed=len(positions))
    monkeypatch.setattr(gramian, "use_segments", lambda n_pos, L: False)
    ref = hankel_singular_values(op)[:, positions]
    monkeypatch.setattr(gramian, "use_segments", lambda n_pos, L: True)
    got = hankel_singular_values(op, positions)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9 * float(ref.max()))
    # batch chunking of the segment path changes nothing
    torch.testing.assert_close(hankel_singular_values(op, positions, chunk_elements=60), got)


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
    from ess_train.ess.dense import plan_dense_chunks

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
