"""SSM and convolution mixers (Mamba, S4D, short conv, Hyena): state sizes, argument errors, inits, operators.

The contract every mixer meets (views, causality, fast forward vs references, gradients, ESS) is
tested in ``tests/models/test_mixer_contract.py``; the scans and the FFT convolution in
``tests/models/test_ops_*.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ess_train.ess as ess
from ess_train.ess import DenseOperator, GatedToeplitzOperator, RecurrentOperator, SelectiveSSMOperator
from ess_train.models.mixers.hyena import Hyena
from ess_train.models.mixers.mamba import Mamba
from ess_train.models.mixers.s4d import S4D
from ess_train.models.mixers.short_conv import ShortConv
from ess_train.models.mixers.ssm_init import A_INITS
from ess_train.models.ops import fft_causal_conv
from ess_train.models.ops.naive import causal_conv_reference
from tests.models.test_mixer_contract import assert_seq_close, inputs, make
from tests.reference_mixers import mamba_reference
from tests.tolerances import assert_within, tol

D = 8
F32, F64 = torch.float32, torch.float64


# ----------------------------------------------------------------------------------------------------
def test_state_sizes() -> None:
    m = Mamba(16, d_state=8, expand=2)
    assert m.state_size(64) == ess_state(32 * 8, 8)
    assert m.state_size(10).per_operator == 5
    s = S4D(12, d_state=6)
    assert s.state_size(100) == ess_state(72, 6)
    c = ShortConv(10, kernel_size=4)
    assert c.state_size(50) == ess_state(30, 3)
    assert c.state_size(4).per_operator == 2
    h = Hyena(6, max_seq_len=32)
    assert h.state_size(20) == ess_state(6 * 20, 10)
    assert h.state_size(40).total == 240  # grows with L


def ess_state(total: int, per_operator: int):
    from ess_train.models.protocol import StateSize

    return StateSize(total=total, per_operator=per_operator, multiplicity=1)


@pytest.mark.parametrize(
    "cls,kwargs,needle",
    [
        (Mamba, {"d_model": 0}, "d_model"),
        (Mamba, {"d_state": 0}, "d_state"),
        (Mamba, {"d_conv": 1.5}, "d_conv"),
        (Mamba, {"expand": -1}, "expand"),
        (Mamba, {"dt_rank": 0}, "dt_rank"),
        (Mamba, {"dt_min": 0.2, "dt_max": 0.1}, "dt_min"),
        (Mamba, {"dt_min": -1.0}, "dt_min"),
        (Mamba, {"dt_init": "normal"}, "dt_init"),
        (Mamba, {"a_init": "s4d_complex"}, "a_init"),
        (Mamba, {"chunk_size": 0}, "chunk_size"),
        (Mamba, {"bias": 1}, "bias"),
        (S4D, {"d_state": -2}, "d_state"),
        (S4D, {"dt_max": 0.0}, "dt_max"),
        (S4D, {"a_init": "x"}, "a_init"),
        (S4D, {"activation": "relu"}, "activation"),
        (S4D, {"gated_output": "yes"}, "gated_output"),
        (ShortConv, {"kernel_size": 1}, "kernel_size"),
        (ShortConv, {"activation": "tanh"}, "activation"),
        (ShortConv, {"bias": "no"}, "bias"),
        (Hyena, {"max_seq_len": 1}, "max_seq_len"),
        (Hyena, {"emb_dim": 4}, "emb_dim"),
        (Hyena, {"filter_order": 0}, "filter_order"),
        (Hyena, {"decay_target": 2.0}, "decay_target"),
        (Hyena, {"modulate": 1}, "modulate"),
    ],
)
def test_bad_constructor_args_raise_value_error_naming_them(cls: type, kwargs: dict, needle: str) -> None:
    kwargs = {"d_model": 8, **kwargs}
    with pytest.raises(ValueError, match=needle):
        cls(**kwargs)


# ----------------------------------------------------------------------------------------------------


def test_mamba_init_dt_bias_and_a_log() -> None:
    torch.manual_seed(0)
    m = Mamba(64, d_state=16, dt_min=0.001, dt_max=0.1)
    dt = F.softplus(m.dt_proj.bias.detach().double())
    assert dt.shape == (128,)
    rtol = tol(F32, 1 + abs(math.log(0.001)), n=3)  # float32 exp, softplus^-1, softplus of ~ log dt
    assert (dt >= 0.001 * (1 - rtol)).all() and (dt <= 0.1 * (1 + rtol)).all()
    frac = (dt.log() - math.log(0.001)) / (math.log(0.1) - math.log(0.001))  # uniform on [0, 1]
    assert abs(float(frac.mean()) - 0.5) < 0.1 and frac.min() < 0.1 and frac.max() > 0.9
    assert getattr(m.dt_proj.bias, "_no_reinit", False) is True
    torch.testing.assert_close(m.A_log.detach(), torch.log(torch.arange(1, 17.0)).expand(128, 16))
    torch.testing.assert_close(m.D.detach(), torch.ones(128))
    std = m.dt_rank**-0.5
    assert m.dt_proj.weight.abs().max() <= std


def test_mamba_init_search_space_and_apply_init() -> None:
    m = Mamba(16, d_state=4, dt_min=0.002, dt_max=0.05, a_init="s4d_lin_real")
    space = m.init_search_space()
    assert set(space) == {"dt_range", "a_init"}
    assert space["dt_range"][0] == (0.002, 0.05) and (0.001, 0.1) in space["dt_range"]
    assert space["a_init"][0] == "s4d_lin_real" and set(space["a_init"]) == set(A_INITS)
    frozen = {k: v.clone() for k, v in m.state_dict().items()}
    m.apply_init(dt_range=(0.01, 0.02))
    dt = F.softplus(m.dt_proj.bias.detach())
    rtol = tol(F32, 1 + abs(math.log(0.01)), n=3)
    assert (dt >= 0.01 * (1 - rtol)).all() and (dt <= 0.02 * (1 + rtol)).all()
    m.apply_init(a_init="s4d_real")
    torch.testing.assert_close(m.A_log.detach(), torch.log(torch.arange(1, 5.0)).expand(32, 4))
    m.apply_init(a_init="constant")
    assert torch.equal(m.A_log.detach(), torch.zeros(32, 4))
    m.apply_init(a_init="log_uniform")
    assert (m.A_log >= 0).all() and (m.A_log <= math.log(4)).all()
    for k, v in m.state_dict().items():  # nothing else moved
        if k not in ("dt_proj.bias", "A_log"):
            assert torch.equal(v, frozen[k]), k
    with pytest.raises(TypeError, match="dt"):
        m.apply_init(dt=0.1)
    with pytest.raises(ValueError, match="a_init"):
        m.apply_init(a_init="hippo")
    with pytest.raises(ValueError, match="dt_range"):
        m.apply_init(dt_range=(0.1, 0.01))
    with pytest.raises(ValueError, match="dt_range"):
        m.apply_init(dt_range=0.1)


def test_mamba_operator_is_the_selective_ssm() -> None:
    m = make("mamba")
    x = inputs(2, 6)
    view = m.operator(x)
    op = view.op
    assert isinstance(op, SelectiveSSMOperator) and op.diagonal and op.state_dim == 4
    f = m.features(x)
    a = torch.exp(f["dt"][..., None] * f["A"][:, None, :])
    torch.testing.assert_close(op.a, a)
    torch.testing.assert_close(op.b, f["dt"][..., None] * f["B"][:, None])
    torch.testing.assert_close(op.c, f["C"][:, None].expand_as(op.b))
    assert (op.a > 0).all() and (op.a <= 1).all()
    plain = RecurrentOperator(op.a, op.b, op.c)
    torch.testing.assert_close(plain.dense(), op.dense())


def test_s4d_kernel_and_expanded_operator() -> None:
    m = make("s4d", dtype=torch.float64)
    L = 12
    K = m.kernel(L, torch.float64)
    log_a, b, c = m.ssm(torch.float64)
    for k in (0, 1, 7):
        # exp(k log a) against exp(log a) ** k: k + 1 roundings of each of the 5 terms
        terms = c * b * torch.exp(log_a) ** k
        assert_within(K[:, k], terms.sum(-1), tol(F64, terms.abs().sum(-1), n=k + 1 + 5), f"K[{k}]")
    u = torch.randn(3, D, L, dtype=torch.float64)
    direct = causal_conv_reference(u, K)
    # FFT: normwise error ~ eps log(n) ||K|| ||u||; bounded by that of the sum of |terms|, n = 2 L
    size = causal_conv_reference(u.abs(), K.abs())
    assert_within(fft_causal_conv(u, K), direct, tol(F64, size.amax(-1, keepdim=True), n=2 * L), "FFT conv")
    op = m.operator(inputs(3, L, torch.float64)).op
    for t in (op.a, op.b, op.c):  # input-invariant: broadcast over batch and time, not copied
        assert t.shape == (3, D, L, 5) and t.stride(0) == 0 and t.stride(2) == 0
    T = op.dense()
    # the recurrence's products a^k against the kernel's exp(k log a): k + 1 roundings of the 5 terms
    scale = (c * b).abs().sum(-1)
    assert_within(T[0, :, 5, 2], K[:, 3], tol(F64, scale, n=3 + 1 + 5), "T[5, 2] = K[3]")
    assert_within(T[1, :, 9, 0], K[:, 9], tol(F64, scale, n=9 + 1 + 5), "T[9, 0] = K[9]")


def test_short_conv_operator_is_the_shift_register_band() -> None:
    m = make("short_conv")
    op = m.operator(inputs(2, 8)).op
    k = m.kernel_size
    assert op.state_dim == k and not op.diagonal
    T = op.dense()
    taps = m.taps.detach()
    t, s = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    for j in range(k):
        torch.testing.assert_close(T[..., t - s == j], taps[:, j][None, :, None].expand(2, D, 8 - j))
    assert (T[..., (t - s >= k) | (s > t)] == 0).all()


def test_hyena_operator_and_filter() -> None:
    m = make("hyena")
    L = 10
    x = inputs(2, L)
    view = m.operator(x)
    op = view.op
    assert isinstance(op, GatedToeplitzOperator) and "T" not in vars(op)  # not built by the forward
    T = op.dense()
    assert op.dense() is T  # cached
    h = op.h
    t, s = 6, 2
    torch.testing.assert_close(T[1, 3, t, s], op.g_out[1, 3, t] * h[3, t - s] * op.g_in[1, 3, s])
    torch.testing.assert_close(h[:, 1:], m.filter(L)[:, 1:])
    # safari's positional features on its own grid (L = l_max)
    Lm = m.max_seq_len
    z, tt = m.filter.features(Lm, torch.float32, torch.device("cpu"))
    ref_t = torch.linspace(0, 1, Lm)[:, None]
    w = 2 * math.pi * torch.linspace(0, Lm - 1, Lm)[:, None] / Lm
    zc = torch.exp(-1j * torch.linspace(1e-4, 0, 1)[None] * w)
    torch.testing.assert_close(z, torch.cat([ref_t, zc.real, zc.imag], dim=-1))
    torch.testing.assert_close(tt, ref_t)
    # the exponential window: later taps of the slowest/fastest channels decay accordingly
    d = m.filter.deltas
    assert math.isclose(float(d[0]), math.log(1e-2) / 1.5, rel_tol=1e-6)
    assert math.isclose(float(d[-1]), math.log(1e-2) / 0.3, rel_tol=1e-6)
    # longer than max_seq_len: extrapolates, still exact
    x2 = inputs(1, 20)
    v2 = m.operator(x2)
    assert_seq_close(v2.op.apply(v2.u), v2.y, F32, 20 + D, "op.apply(u) vs y")


# ----------------------------------------------------------------------------------------------------


def test_ess_of_short_conv_and_hyena_bounds() -> None:
    tolerance_ess = ess.tolerance_ess
    L = 12
    c = make("short_conv", dtype=torch.float64)
    counts = tolerance_ess(c.operator(inputs(1, L, torch.float64)).op)
    i = torch.arange(L)
    expected = torch.minimum(torch.minimum(i, L - i), torch.tensor(c.kernel_size - 1))
    assert torch.equal(counts[0], expected.expand(D, L))  # generic taps: full rank k - 1
    h = make("hyena", dtype=torch.float64)
    op = h.operator(inputs(1, L, torch.float64)).op
    e = ess.entropy_ess(op)
    rank = torch.minimum(i, L - i)  # ESS <= rank (+ the round-off of evaluating it)
    assert e.shape == (1, D, L) and (e <= rank + tol(F64, rank, n=L)).all() and (e[..., 1:] > 0).all()
    torch.testing.assert_close(e, ess.entropy_ess(DenseOperator(op.dense().clone())))
    e.sum().backward()  # differentiable through the lazily built T
    assert h.filter.mlp[0].weight.grad is not None


@pytest.mark.parametrize("dt_scale", [1.0, 30.0, 1e4])
def test_mamba_scan_strong_decays_shrink_chunks_or_fall_back(dt_scale: float) -> None:
    """Large step sizes: the chunked cumsum form halves its chunks (or falls back to the exact scan); the
    output stays finite and equal to the token-by-token reference, gradients finite."""
    m = make("mamba", dtype=torch.float32)
    m.chunk_size = None
    with torch.no_grad():
        m.dt_proj.bias.add_(math.log(dt_scale))
    x = inputs(2, 37)
    out = m(x)
    ref = mamba_reference(m.double(), x.double()).float()
    m.float()
    assert torch.isfinite(out).all()
    assert_seq_close(out, ref, F32, 37 + D, "forward vs reference")
    m(x).square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
