"""Float32 ESS is as exact as a float32 SVD (issue 14): both paths against a float64 SVD of the same operator.

Cases: diagonal transitions ``a ~ U(0.79, 0.99)``, ``U(0, 1)``, Mamba-like rates (1e-3 to 1 across the
state), ``U(0.99, 1)``, and DeltaNet's full ``A_t = I - beta k k^T``; all positions (the scan) and a few
(the segment path); softmax attention on the dense path. Two kinds of assertions:

- the error model of ``tests/tolerances.py`` (float64 sums, float32 products, no squaring in float32),
  propagated to entropy-ESS: a worst-case round-off bound, valid on any machine;
- the issue's targets, which the model implies with a wide margin here (entropy-ESS within 5e-5
  relative of float64; tolerance-ESS at ``rtol = 1e-5`` equal at >= 99% of positions). The previous
  float32 path (sums and eigenproblems in float32) missed both by 10-1000x on these cases.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from ess_train.ess import (
    DenseOperator,
    RecurrentOperator,
    default_rtol,
    entropy_ess,
    hankel_singular_values,
    tolerance_ess,
)
from ess_train.ess.dense_svd import gram_svdvals
from tests.tolerances import (
    assert_within,
    entropy_ess_error,
    gramian_scale,
    gramian_sigma_error,
    near_threshold,
    svd_error,
)

F32, F64 = torch.float32, torch.float64
CASES = ["U(0.79,0.99)", "U(0,1)", "mamba", "U(0.99,1)", "deltanet"]
ENTROPY_TARGET = 5e-5  # issue 14: relative error of float32 entropy-ESS against float64
AGREEMENT_TARGET = 0.99  # issue 14: tolerance-ESS at rtol=1e-5, fraction of positions equal to float64


def make_case(
    case: str, B: int = 2, L: int = 96, N: int = 12, seed: int = 0, device: torch.device | None = None
) -> RecurrentOperator:
    """A float32 operator of issue 14's table (random ``b``, ``c``; drawn on the CPU, moved to ``device``)."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(B, L, N, generator=g)
    c = torch.randn(B, L, N, generator=g)
    u = torch.rand(B, L, N, generator=g)
    if case == "U(0.79,0.99)":
        a = 0.79 + 0.2 * u
    elif case == "U(0,1)":
        a = u
    elif case == "mamba":
        a = torch.exp(-torch.exp(0.5 * torch.randn(B, L, 1, generator=g)) * torch.logspace(-3, 0, N))
    elif case == "U(0.99,1)":
        a = 0.99 + 0.01 * u
    else:
        k = torch.nn.functional.normalize(torch.randn(B, L, N, generator=g), dim=-1)
        a = torch.eye(N) - torch.rand(B, L, 1, 1, generator=g) * k.unsqueeze(-1) * k.unsqueeze(-2)
    return RecurrentOperator(a.to(device), b.to(device), c.to(device))


def as_f64(op: RecurrentOperator) -> RecurrentOperator:
    return RecurrentOperator(op.a.double(), op.b.double(), op.c.double())


def reference(op: RecurrentOperator) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 SVD of the float32 operator's exact ``T`` (its values in float64), and each sigma's bound
    on the float32 Gramian path (float32 model plus the float64 SVD's own error)."""
    op64 = as_f64(op)
    s64 = hankel_singular_values(op64, method="dense")
    L, N = op.seq_len, op.state_dim
    ds = gramian_sigma_error(F32, s64, gramian_scale(op64), L, N)
    return s64, ds + svd_error(F64, s64.amax(-1, keepdim=True), L, L)


def rel_error(e: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    ref = ref.double()
    return torch.where(ref > 0, (e.double() - ref).abs() / torch.where(ref > 0, ref, 1.0), e.double().abs())


@pytest.mark.parametrize("case", CASES)
def test_gramian_float32_all_positions(case, gramian_path, device):
    op = make_case(case, device=device)
    s64, ds = reference(op)
    s32 = hankel_singular_values(op)
    assert s32.dtype == F32
    assert_within(s32, s64, ds, "sigma, float32 Gramian vs float64 SVD")
    e32, e64 = entropy_ess(op), entropy_ess(as_f64(op), method="dense")
    assert_within(e32, e64, entropy_ess_error(s64, ds, F32), "entropy-ESS, float32 Gramian")
    assert float(rel_error(e32, e64).max()) < ENTROPY_TARGET
    scale = s64.amax(dim=(-2, -1))
    t32 = tolerance_ess(op, rtol=1e-5, scale=scale.float())
    t64 = tolerance_ess(as_f64(op), rtol=1e-5, scale=scale, method="dense")
    assert float((t32 == t64).double().mean()) >= AGREEMENT_TARGET
    # at the default rtol, counts differ only by sigma that the error model puts near the threshold
    thr = default_rtol(F32) * scale[..., None, None]
    near = near_threshold(s64, thr, ds)
    t_def = tolerance_ess(as_f64(op), rtol=default_rtol(F32), scale=scale, method="dense")
    assert bool(((tolerance_ess(op, scale=scale.float()) - t_def).abs() <= near).all())


@pytest.mark.parametrize("case", ["U(0.79,0.99)", "U(0,1)", "mamba", "U(0.99,1)"])
def test_segment_path_float32_few_positions(case, device):
    op = make_case(case, L=128, device=device)
    pos = torch.linspace(1, 127, 16).round().long()
    s64, ds = reference(op)
    s32 = hankel_singular_values(op, pos)  # 16 of 128 positions: the segment path
    assert_within(s32, s64[:, pos], ds[:, pos], "sigma, float32 segment path")
    e64 = entropy_ess(as_f64(op), pos, method="dense")
    e32 = entropy_ess(op, pos)
    assert_within(e32, e64, entropy_ess_error(s64[:, pos], ds[:, pos], F32), "entropy-ESS, segments")
    assert float(rel_error(e32, e64).max()) < ENTROPY_TARGET


def _softmax_attention(B: int, L: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = 2.0 * torch.randn(B, L, L, generator=g)
    return scores.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf")).softmax(-1)


@pytest.mark.parametrize("positions", [None, [1, 5, 17, 40, 63]])
def test_dense_float32_softmax_attention(positions, device):
    L = 64
    T = _softmax_attention(3, L, seed=1).to(device)
    s64 = hankel_singular_values(T.double(), positions)
    s32 = hankel_singular_values(T, positions)
    assert s32.dtype == F32
    # float32 blocks via a float64 Gram matrix: within the float32 SVD's bound (tests/tolerances.py)
    ds = svd_error(F32, s64.amax(-1, keepdim=True), L, L) + svd_error(F64, s64.amax(-1, keepdim=True), L, L)
    assert_within(s32, s64, ds, "sigma, float32 dense")
    e32, e64 = entropy_ess(T, positions), entropy_ess(T.double(), positions)
    assert_within(e32, e64, entropy_ess_error(s64, ds, F32), "entropy-ESS, float32 dense")
    assert float(rel_error(e32, e64).max()) < ENTROPY_TARGET
    scale = hankel_singular_values(T.double()).amax(dim=(-2, -1))
    t32 = tolerance_ess(T, positions, rtol=1e-5, scale=scale.float())
    t64 = tolerance_ess(T.double(), positions, rtol=1e-5, scale=scale)
    assert float((t32 == t64).double().mean()) >= AGREEMENT_TARGET


def test_dense_float32_rank_deficient_is_exact_and_differentiable():
    """Linear attention of feature dim d: singular values past d are exactly 0 in float32 too, and the
    gradients through the float64 Gram route are finite."""
    g = torch.Generator().manual_seed(3)
    L, d = 40, 3
    q, k = torch.randn(2, L, d, generator=g), torch.randn(2, L, d, generator=g)
    X = (q @ k.mT).requires_grad_()
    T = torch.tril(X)
    s = hankel_singular_values(DenseOperator(T))
    assert bool((s[..., d:] == 0).all())
    assert (
        tolerance_ess(T.detach()).tolist()
        == torch.minimum(torch.minimum(torch.arange(L), L - torch.arange(L)), torch.tensor(d))
        .expand(2, L)
        .tolist()
    )
    (entropy_ess(T).sum() + s.sum()).backward()
    assert bool(torch.isfinite(X.grad).all())


def test_gram_svdvals_gradcheck(device):
    """The Gram route's backward (eigenvectors of the Gram matrix), in float64 inputs for gradcheck."""
    g = torch.Generator().manual_seed(4)
    for shape in ((2, 6, 4), (2, 3, 5)):
        H = torch.randn(*shape, generator=g, dtype=F64).to(device).requires_grad_()
        assert gradcheck(gram_svdvals, (H,))


def test_default_rtol_float32_resolves_resets():
    """The float32 default rtol (~1e-5) sees a state that decays to 1e-4 of the peak: the old default
    (3.5e-3) counted it as gone."""
    assert default_rtol(F64) == 1e-6
    assert 1e-5 < default_rtol(F32) < 2e-5
    assert default_rtol(torch.bfloat16) == default_rtol(F32)
    L = 64
    a = torch.ones(1, L, 2)
    b = torch.zeros(1, L, 2)
    b[0, 0] = torch.tensor([1.0, 0.0])
    b[0, 1] = torch.tensor([0.0, 1e-4])  # a second, weak state
    c = torch.ones(1, L, 2)
    c[0, ::2, 1] = -1.0  # the two states read out differently: rank 2 from position 2 on
    t = tolerance_ess(RecurrentOperator(a, b, c))
    assert t[0, 2:].tolist() == [2] * (L - 3) + [1]  # H_{L-1} is one row
