"""Attention-family mixers: operator views, causality, fast forward vs token-by-token references, TSS."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import ess_train.ess as ess
from ess_train.ess import DenseOperator, RecurrentOperator
from ess_train.models.mixers._common import chunk_delta_rule, chunk_linear_attention, rotary_embedding
from ess_train.models.mixers.attention import SoftmaxAttention
from ess_train.models.mixers.decayed_linear_attention import DecayedLinearAttention
from ess_train.models.mixers.deltanet import DeltaNet, DeltaRuleOperator
from ess_train.models.mixers.gla import GatedLinearAttention
from ess_train.models.mixers.linear_attention import LinearAttention, taylor_features
from ess_train.models.mixers.sliding_window_attention import SlidingWindowAttention
from ess_train.models.protocol import ESSMixer, OperatorView
from tests.reference_mixers import gated_reference, reference_y
from tests.tolerances import (
    assert_within,
    entropy_ess_error,
    gramian_eig_error,
    gramian_scale,
    sigma_error_from_eig,
    svd_error,
    tol,
)

D, H = 8, 2
F32, F64 = torch.float32, torch.float64


def seq_tol(dtype: torch.dtype, L: int, d: int = D) -> float:
    """Relative round-off of a sequence mixer's output (``rel``): sums over ``L`` tokens and ``d`` features,
    in any order (chunked kernels, token-by-token references, BLAS)."""
    return tol(dtype, n=L + d)


def _factories(chunk: int) -> dict[str, Callable[[], ESSMixer]]:
    return {
        "attention": lambda: SoftmaxAttention(D, H),
        "attention_rotary": lambda: SoftmaxAttention(D, H, rotary=True),
        "swa": lambda: SlidingWindowAttention(D, H, window=3, rotary=True),
        "linear_elu": lambda: LinearAttention(D, H, feature_map="elu", chunk_size=chunk),
        "linear_identity": lambda: LinearAttention(
            D, H, feature_map="identity", normalize=False, chunk_size=chunk
        ),
        "linear_taylor": lambda: LinearAttention(D, H, feature_map="taylor", feature_dim=3, chunk_size=chunk),
        "decayed": lambda: DecayedLinearAttention(D, H, rotary=True, chunk_size=chunk),
        "gla": lambda: GatedLinearAttention(
            D, H, gate_low_rank_dim=4, gate_logit_normalizer=2.0, chunk_size=chunk
        ),
        "deltanet": lambda: DeltaNet(D, H, chunk_size=chunk),
        "deltanet_gated": lambda: DeltaNet(
            D, H, expand_v=2.0, qk_activation="identity", use_output_gate=True, chunk_size=chunk
        ),
    }


NAMES = list(_factories(4))
RECURRENT = [n for n in NAMES if "attention" not in n and n != "swa"]


def make(name: str, chunk: int = 4, dtype: torch.dtype = torch.float32, seed: int = 0) -> ESSMixer:
    """A mixer with perturbed parameters (operators far from their init's near-uniform ones)."""
    torch.manual_seed(seed)
    m = _factories(chunk)[name]()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return m.to(dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


def inputs(B: int, L: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, D, generator=g).to(dtype)


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_view_shapes_and_apply_matches_fast_forward(name: str) -> None:
    m = make(name)
    x = inputs(2, 11)
    view = m.operator(x)
    dv = view.u.shape[-1]
    assert tuple(view.op.batch_shape) == (2, H)
    assert view.u.shape == (2, H, 11, dv) and view.y.shape == view.u.shape
    assert m.state_size(11).multiplicity == dv
    assert rel(view.op.apply(view.u), view.y) < seq_tol(F32, 11)
    out = m(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, m.readout(view, x))
    kind = DenseOperator if "attention" in name or name == "swa" else RecurrentOperator
    assert isinstance(view.op, kind)


@pytest.mark.parametrize("name", NAMES)
def test_dense_is_causal_and_realizes_y(name: str) -> None:
    m = make(name)
    view = m.operator(inputs(2, 9))
    T = view.op.dense()
    assert T.shape == (2, H, 9, 9)
    assert torch.equal(torch.triu(T, 1), torch.zeros_like(T))
    # nothing above the diagonal was dropped: the lower-triangular T alone gives the layer's y
    assert rel(T @ view.u, view.y) < seq_tol(F32, 9)
    if isinstance(view.op, DenseOperator):
        assert_within(T.sum(-1), 1.0, tol(F32, n=9), "softmax rows sum to 1")
        if name == "swa":
            t, s = torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij")
            assert (T[..., t - s >= 3] == 0).all() and (T[..., (t - s < 3) & (s <= t)] > 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_jacobian_outputs_never_depend_on_future_inputs(name: str) -> None:
    m = make(name, chunk=2, dtype=torch.float64)
    L = 6
    x = inputs(1, L, torch.float64)
    J = torch.autograd.functional.jacobian(lambda z: m(z), x)[0, :, :, 0]  # [L, D, L, D]
    block = J.abs().amax(dim=(1, 3))  # [t, s]
    t, s = torch.meshgrid(torch.arange(L), torch.arange(L), indexing="ij")
    assert (block[s > t] == 0).all()
    visible = (s < t) & (t - s < 3) if name == "swa" else s < t
    assert (block[visible] > 1e-8).all()  # and the past does matter
    if name == "swa":
        assert (block[t - s >= 3] == 0).all()


# chunking only concerns the recurrent mixers: the attention ones run at one setting
_FAST_VS_REFERENCE = [(n, 11, 4) for n in NAMES] + [(n, 37, 32) for n in NAMES if n in RECURRENT]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,L,chunk", _FAST_VS_REFERENCE)
def test_fast_forward_matches_token_by_token_reference(
    name: str, L: int, chunk: int, dtype: torch.dtype
) -> None:
    m = make(name, chunk=chunk, dtype=dtype)
    x = inputs(2, L, dtype)
    view = m.operator(x)
    assert view.y.dtype == dtype and view.op.dtype == dtype
    assert rel(view.y, reference_y(m, x)) < seq_tol(dtype, L)
    if dtype == torch.float64:
        assert rel(view.op.apply(view.u), view.y) < seq_tol(dtype, L)


# ----------------------------------------------------------------------------------------------------
def test_state_sizes_follow_ess_md() -> None:
    L = 20
    a = SoftmaxAttention(16, 4).state_size(L)
    assert (a.total, a.per_operator, a.multiplicity) == (2 * L * 16, L // 2, 4)
    w = SlidingWindowAttention(16, 4, window=5).state_size(L)
    assert (w.total, w.per_operator, w.multiplicity) == (2 * 5 * 16, 4, 4)
    assert SlidingWindowAttention(16, 4, window=50).state_size(L).per_operator == L // 2
    assert SlidingWindowAttention(16, 4, window=50).state_size(L).total == 2 * L * 16
    la = LinearAttention(16, 4, feature_map="elu").state_size(L)
    assert (la.total, la.per_operator, la.multiplicity) == (4 * 4 * 4, 4, 4)
    tay = LinearAttention(16, 4, feature_map="taylor", feature_dim=3)
    assert tay.state_dim == 1 + 3 + 6 and tay.state_size(L).total == 4 * 10 * 4
    assert tay.state_size(L).per_operator == 10 and tay.state_size(6).per_operator == 3
    dla = DecayedLinearAttention(16, 4, expand_v=2.0).state_size(L)
    assert (dla.total, dla.per_operator, dla.multiplicity) == (4 * 4 * 8, 4, 8)
    gla = GatedLinearAttention(16, 4).state_size(L)  # expand_k = 0.5: d_k = 2, d_v = 4
    assert (gla.total, gla.per_operator, gla.multiplicity) == (4 * 2 * 4, 2, 4)
    dn = DeltaNet(16, 4).state_size(L)
    assert (dn.total, dn.per_operator, dn.multiplicity) == (4 * 4 * 4, 4, 4)


@pytest.mark.parametrize(
    "cls,kwargs,needle",
    [
        (SoftmaxAttention, {"d_model": 10, "num_heads": 3}, "num_heads"),
        (SoftmaxAttention, {"d_model": 0}, "d_model"),
        (SoftmaxAttention, {"d_model": 6, "num_heads": 2, "rotary": True}, "rotary"),
        (SoftmaxAttention, {"d_model": 8, "rotary": "yes"}, "rotary"),
        (SlidingWindowAttention, {"d_model": 8, "window": 0}, "window"),
        (LinearAttention, {"d_model": 8, "feature_map": "relu"}, "feature_map"),
        (LinearAttention, {"d_model": 8, "feature_map": "identity"}, "normalize"),
        (LinearAttention, {"d_model": 8, "feature_dim": -1}, "feature_dim"),
        (LinearAttention, {"d_model": 8, "chunk_size": 0}, "chunk_size"),
        (DecayedLinearAttention, {"d_model": 8, "decay_min": 1.0}, "decay_min"),
        (DecayedLinearAttention, {"d_model": 8, "num_heads": 2, "expand_k": 0.1}, "expand_k"),
        (GatedLinearAttention, {"d_model": 8, "gate_logit_normalizer": 0}, "gate_logit_normalizer"),
        (GatedLinearAttention, {"d_model": 8, "clamp_min": 1.0}, "clamp_min"),
        (GatedLinearAttention, {"d_model": 8, "gate_low_rank_dim": 2.5}, "gate_low_rank_dim"),
        (DeltaNet, {"d_model": 8, "qk_activation": "tanh"}, "qk_activation"),
        (DeltaNet, {"d_model": 8, "num_heads": 3}, "num_heads"),
    ],
)
def test_bad_constructor_args_raise_value_error_naming_them(cls: type, kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        cls(**kwargs)


# ----------------------------------------------------------------------------------------------------
def test_rotary_is_relative_and_norm_preserving() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(8), torch.randn(8)
    L = 12
    rq, rk = rotary_embedding(q.expand(L, 8)), rotary_embedding(k.expand(L, 8))
    scores = rq @ rk.T
    # float32 angles t * theta_j are off by ~ t eps32 (t < L), then dots of 8 terms of size |q||k|
    qk = float(q.norm() * k.norm())
    assert_within(scores[1:, 1:], scores[:-1, :-1], tol(F32, qk, n=L + 8), "depends on t - s only")
    assert_within(rq.norm(dim=-1), q.norm().expand(L), tol(F32, float(q.norm()), n=8), "norm")
    assert not torch.allclose(scores[5, 0], scores[5, 5])


# float64 too: the features' weights must be built in the input's dtype (they once were float32-rounded,
# a kernel error ~3e-8 relative in float64, 1e5 times its round-off)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_taylor_features_give_second_order_exp_kernel(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    q, k = torch.randn(5, 4, dtype=dtype), torch.randn(5, 4, dtype=dtype)
    pq, pk = taylor_features(q), taylor_features(k)
    assert pq.shape == (5, 1 + 4 + 10)
    s = (q * k).sum(-1) / 2.0  # sqrt(f) = 2
    # two sums of 15 and 4 products, in different orders
    assert_within((pq * pk).sum(-1), 1 + s + s**2 / 2, tol(dtype, (pq * pk).abs().sum(-1), n=15), "kernel")


def test_gated_kernel_survives_extreme_gates() -> None:
    """Log-gates down to -60 per step: cumulative decays far below float32 range, still exact."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 37, 4), torch.randn(1, 2, 37, 4), torch.randn(1, 2, 37, 3)
    g = -60.0 * torch.rand(1, 2, 37, 4)
    g[..., ::5, :] = 0.0  # some steps keep the state: cross-step products stay O(1)
    g.requires_grad_(True)
    y = chunk_linear_attention(q, k, v, g, chunk_size=32, sub_chunk_size=8)
    ref = gated_reference(q, k, v, g, 1.0)
    assert torch.isfinite(y).all() and rel(y, ref) < seq_tol(F32, 37, 4)
    y.square().sum().backward()
    assert torch.isfinite(g.grad).all()


def test_gla_strong_gates_forward_backward_finite() -> None:
    m = make("gla", chunk=32)
    with torch.no_grad():
        m.gk_proj[1].bias.fill_(-60.0)
    m.apply_init(gate_logit_normalizer=1.0)
    x = inputs(2, 37)
    view = m.operator(x)
    assert rel(view.y, reference_y(m, x)) < seq_tol(F32, 37)
    m(x).square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_chunk_kernels_pad_and_match_across_chunk_sizes() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 13, 4, dtype=torch.float64), torch.randn(2, 13, 4, dtype=torch.float64), None
    v = torch.randn(2, 13, 3, dtype=torch.float64)
    g = torch.nn.functional.logsigmoid(torch.randn(2, 13, 4, dtype=torch.float64))
    outs = [
        chunk_linear_attention(q, k, v, g, chunk_size=c, sub_chunk_size=s)
        for c, s in [(64, 16), (4, 2), (1, 1)]
    ]
    for o in outs[1:]:
        assert rel(o, outs[0]) < seq_tol(F64, 13, 4)
    kn = torch.nn.functional.normalize(k, dim=-1)
    beta = torch.rand(2, 13, dtype=torch.float64)
    outs = [chunk_delta_rule(q, kn, v, beta, chunk_size=c) for c in (64, 5, 1)]
    for o in outs[1:]:
        assert rel(o, outs[0]) < seq_tol(F64, 13, 4)


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_gradients_flow_through_forward_and_operator(name: str) -> None:
    m = make(name)
    x = inputs(2, 7).requires_grad_(True)
    view = m.operator(x)
    loss = m.readout(view, x).square().mean() + view.op.dense().square().mean()
    loss.backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_smoke(name: str) -> None:
    m = make(name, dtype=torch.bfloat16)
    out = m(inputs(1, 9, torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_deltanet_operator_is_the_full_transition_realization() -> None:
    m = make("deltanet")
    view = m.operator(inputs(1, 5))
    op = view.op
    assert isinstance(op, DeltaRuleOperator) and not op.diagonal
    k, beta = op.k, op.beta
    A = op.a
    assert A.shape == (1, H, 5, 4, 4)
    torch.testing.assert_close(A[0, 1, 3], torch.eye(4) - beta[0, 1, 3] * torch.outer(k[0, 1, 3], k[0, 1, 3]))
    torch.testing.assert_close(op.b, beta[..., None] * k)
    # a plain RecurrentOperator with the materialized transitions is the same operator
    plain = RecurrentOperator(op.a, op.b, op.c)
    torch.testing.assert_close(plain.dense(), op.dense())


# ----------------------------------------------------------------------------------------------------
def test_decayed_init_search_space_and_apply_init() -> None:
    m = DecayedLinearAttention(16, 4)
    retnet = 1 - 2.0 ** (-5 - torch.arange(4, dtype=torch.float64))
    # float32 decays through logit and sigmoid: a few roundings, each relative eps32
    assert_within(m.decays.double(), retnet, tol(F32, n=4), "RetNet decays")
    space = m.init_search_space()
    assert set(space) == {"decay_min", "decay_max"}
    assert space["decay_min"][0] == m.decay_min and space["decay_max"][0] == m.decay_max
    before = m.q_proj.weight.clone()
    m.apply_init(decay_min=0.5, decay_max=0.99)
    g = m.decays.double()
    assert_within(g[[0, -1]], torch.tensor([0.5, 0.99], dtype=F64), tol(F32, n=4), "decay range")
    assert (g.diff() > 0).all()
    torch.testing.assert_close(m.q_proj.weight, before)  # only the decays change
    m.apply_init(decay_min=space["decay_min"][0], decay_max=space["decay_max"][0])
    assert_within(m.decays.double(), retnet, tol(F32, n=4), "RetNet decays again")
    with pytest.raises(ValueError, match="decay_max"):
        m.apply_init(decay_max=1.5)
    with pytest.raises(ValueError, match="unknown"):
        m.apply_init(gamma=0.5)
    # the operator carries the decays
    op = m.operator(torch.randn(1, 3, 16)).op
    torch.testing.assert_close(op.a[0, :, 0, 0], m.decays.detach())


def test_gla_init_search_space_and_apply_init() -> None:
    m = make("gla")
    m.apply_init(gate_logit_normalizer=16.0)
    space = m.init_search_space()
    assert space["gate_logit_normalizer"][0] == 16.0 and 1.0 in space["gate_logit_normalizer"]
    x = inputs(1, 6)
    a16 = m.operator(x).op.a
    y16 = m(x)
    m.apply_init(gate_logit_normalizer=1.0)
    a1 = m.operator(x).op.a
    # log(exp(y)) is y to eps32 (|y| + 1): for y = ls / 16 that is multiplied by 16
    assert_within(a1.log(), 16.0 * a16.log(), tol(F32, 2 * a1.log().abs() + 17), "gates ** 16")
    assert not torch.allclose(m(x), y16)
    with pytest.raises(ValueError, match="gate_logit_normalizer"):
        m.apply_init(gate_logit_normalizer=-1.0)
    with pytest.raises(ValueError, match="unknown"):
        m.apply_init(normalizer=2.0)


def test_reset_parameters_is_in_init_and_deterministic() -> None:
    for name in NAMES:
        torch.manual_seed(3)
        m1 = _factories(4)[name]()
        torch.manual_seed(3)
        m2 = _factories(4)[name]()
        for p1, p2 in zip(m1.parameters(), m2.parameters()):
            assert torch.equal(p1, p2)
        assert isinstance(m1, nn.Module) and callable(m1.reset_parameters)


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RECURRENT)
def test_recurrent_and_dense_ess_agree(name: str) -> None:
    entropy_ess = ess.entropy_ess
    m = make(name, dtype=torch.float64)
    op = m.operator(inputs(1, 10, torch.float64)).op
    rec = entropy_ess(op)
    dense = entropy_ess(op, method="dense")
    # the Gramian path's and the SVD's round-off propagated to entropy-ESS (tests/tolerances.py);
    # position 0 (empty H_0) is the engine's own convention, tested there
    s = ess.hankel_singular_values(op, method="dense")
    delta = gramian_eig_error(F64, gramian_scale(op), op.seq_len, op.state_dim)
    ds = sigma_error_from_eig(s, delta) + svd_error(F64, s.amax(-1, keepdim=True), 10, 10)
    assert_within(rec[..., 1:], dense[..., 1:], entropy_ess_error(s, ds)[..., 1:], "Gramian vs dense")
    assert (rec >= 0).all() and (rec[..., 1:] > 0).any()


def test_view_is_an_operator_view() -> None:
    m = make("gla")
    assert isinstance(m.operator(inputs(1, 3)), OperatorView)


def test_gated_kernel_factored_path_shrinks_chunks_for_strong_gates() -> None:
    """Gates down to -3 per step: the factored (matmul) intra-chunk path needs chunks of 16 (span <= 30), the
    kernel halves the chunk and stays exact: agrees with the reference to round-off."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 4, dtype=torch.float64) for _ in range(3))
    g = -3.0 * torch.rand(1, 2, 64, 4, dtype=torch.float64)
    ref = gated_reference(q, k, v, g, 1.0)
    y64 = chunk_linear_attention(q, k, v, g, chunk_size=64, sub_chunk_size=16)
    assert rel(y64, ref) < seq_tol(F64, 64, 4)
    y32 = chunk_linear_attention(q.float(), k.float(), v.float(), g.float(), chunk_size=64, sub_chunk_size=16)
    assert torch.isfinite(y32).all() and rel(y32.double(), ref) < seq_tol(F32, 64, 4)


def test_gated_kernel_pairwise_path_for_gates_too_strong_to_factor() -> None:
    """Gates down to -40 per step: no chunk length keeps the factored exponents bounded, the kernel takes
    the pairwise path at the original chunking (with a padded, non-multiple length) and stays exact."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 70, 4, dtype=torch.float64) for _ in range(3))
    g = -40.0 * torch.rand(2, 3, 70, 4, dtype=torch.float64)
    ref = gated_reference(q, k, v, g, 1.0)
    for dtype in (torch.float64, torch.float32):
        y = chunk_linear_attention(*(x.to(dtype) for x in (q, k, v, g)), chunk_size=64, sub_chunk_size=16)
        assert torch.isfinite(y).all() and rel(y.double(), ref) < seq_tol(dtype, 70, 4), dtype


def test_gla_normalizer_survives_a_checkpoint() -> None:
    """ESSInitializer may change the normalizer (no parameter): it must travel in the state dict."""
    from ess_train.models import build_mixer

    gla = build_mixer("gla", d_model=16, num_heads=2)
    gla.apply_init(gate_logit_normalizer=2.0)
    fresh = build_mixer("gla", d_model=16, num_heads=2)
    assert fresh.gate_logit_normalizer == 16.0
    fresh.load_state_dict(gla.state_dict())
    assert fresh.gate_logit_normalizer == 2.0
    x = torch.randn(2, 8, 16)
    torch.testing.assert_close(fresh(x), gla(x))


def test_sliding_window_needs_a_past() -> None:
    from ess_train.models import build_mixer

    with pytest.raises(ValueError, match="window must be an int >= 2"):
        build_mixer("sliding_window_attention", d_model=8, window=1)
