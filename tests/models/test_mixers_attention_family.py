"""Attention-family mixers: state sizes, argument errors, features, inits, operator structure.

The contract every mixer meets (views, causality, fast forward vs references, gradients, ESS) is
tested in ``tests/models/test_mixer_contract.py``; the chunked kernels in ``tests/models/test_ops_*.py``.
"""

from __future__ import annotations

import pytest
import torch

from ess_train.ess import DeltaRuleOperator, RecurrentOperator
from ess_train.models.mixers.attention import SoftmaxAttention
from ess_train.models.mixers.decayed_linear_attention import DecayedLinearAttention
from ess_train.models.mixers.deltanet import DeltaNet
from ess_train.models.mixers.gla import GatedLinearAttention
from ess_train.models.mixers.linear_attention import LinearAttention, taylor_features
from ess_train.models.mixers.parts import rotary_embedding
from ess_train.models.mixers.sliding_window_attention import SlidingWindowAttention
from ess_train.models.protocol import OperatorView
from tests.models.test_mixer_contract import assert_seq_close, inputs, make
from tests.reference_mixers import reference_y
from tests.tolerances import assert_within, tol

D, H = 8, 2
F32, F64 = torch.float32, torch.float64


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


def test_gla_strong_gates_forward_backward_finite() -> None:
    m = make("gla", chunk=32)
    with torch.no_grad():
        m.gk_proj[1].bias.fill_(-60.0)
    m.apply_init(gate_logit_normalizer=1.0)
    x = inputs(2, 37)
    view = m.operator(x)
    assert_seq_close(view.y, reference_y(m, x), F32, 37 + D, "y vs reference")
    m(x).square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------------------------------


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
    with pytest.raises(TypeError, match="gamma"):
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
    with pytest.raises(TypeError, match="normalizer"):
        m.apply_init(normalizer=2.0)


# ----------------------------------------------------------------------------------------------------


def test_view_is_an_operator_view() -> None:
    m = make("gla")
    assert isinstance(m.operator(inputs(1, 3)), OperatorView)


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
