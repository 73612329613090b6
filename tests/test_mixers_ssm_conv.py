"""SSM and convolution mixers (Mamba, S4D, short conv, Hyena): operator views, causality, references, TSS."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import ess_train.ess as ess
from ess_train.ess import DenseOperator, RecurrentOperator
from ess_train.models.mixers.hyena import GatedToeplitzOperator, Hyena
from ess_train.models.mixers.mamba import (
    A_INITS,
    Mamba,
    SelectiveSSMOperator,
    selective_scan,
    selective_scan_reference,
)
from ess_train.models.mixers.s4d import S4D, fft_causal_conv
from ess_train.models.mixers.short_conv import ShortConv
from ess_train.models.protocol import ESSMixer, OperatorView
from tests.tolerances import (
    assert_within,
    entropy_ess_error,
    gramian_eig_error,
    gramian_scale,
    sigma_error_from_eig,
    svd_error,
    tol,
)

D = 8
F32, F64 = torch.float32, torch.float64


def seq_tol(dtype: torch.dtype, L: int, d: int = D) -> float:
    """Relative round-off of a sequence mixer's output (``rel``): sums over ``L`` tokens and ``d`` features,
    in any order (chunked scans, FFTs, token-by-token references, BLAS)."""
    return tol(dtype, n=L + d)


FACTORIES: dict[str, Callable[[], ESSMixer]] = {
    "mamba": lambda: Mamba(D, d_state=4, chunk_size=4),
    "mamba_auto_chunk": lambda: Mamba(D, d_state=3, d_conv=3, expand=1.5, dt_rank=2),
    "s4d": lambda: S4D(D, d_state=5),
    "s4d_plain": lambda: S4D(D, d_state=3, activation="identity", gated_output=False),
    "short_conv": lambda: ShortConv(D, kernel_size=4),
    "short_conv3_silu": lambda: ShortConv(D, kernel_size=3, bias=True, activation="silu"),
    "hyena": lambda: Hyena(D, max_seq_len=16, filter_order=8),
}
NAMES = list(FACTORIES)
RECURRENT = [n for n in NAMES if not n.startswith("hyena")]


def make(name: str, dtype: torch.dtype = torch.float32, seed: int = 0, perturb: bool = True) -> ESSMixer:
    """A mixer, by default with perturbed parameters (operators away from their init)."""
    torch.manual_seed(seed)
    m = FACTORIES[name]()
    if perturb:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return m.to(dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max().clamp_min(1e-30))


def inputs(B: int, L: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, D, generator=g).to(dtype)


# ---------------------------------------------------------------------------------- token-by-token refs
def mamba_reference(m: Mamba, x: torch.Tensor) -> torch.Tensor:
    """mamba_ssm's ``Mamba.step`` unrolled: conv state, SSM state, one token at a time."""
    B, L, _ = x.shape
    W = m.conv1d.weight[:, 0, :]
    conv_state = x.new_zeros(B, m.d_inner, m.d_conv)
    h = x.new_zeros(B, m.d_inner, m.d_state)
    A = -torch.exp(m.A_log)
    outs = []
    for t in range(L):
        xi, z = m.in_proj(x[:, t]).chunk(2, dim=-1)
        conv_state = torch.cat([conv_state[:, :, 1:], xi[:, :, None]], dim=-1)
        u = (conv_state * W).sum(-1)
        if m.conv1d.bias is not None:
            u = u + m.conv1d.bias
        u = F.silu(u)
        dt_in, Bt, Ct = m.x_proj(u).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
        dt = F.softplus(m.dt_proj(dt_in))
        h = torch.exp(dt[..., None] * A) * h + dt[..., None] * Bt[:, None, :] * u[..., None]
        y = (h * Ct[:, None, :]).sum(-1) + m.D * u
        outs.append(m.out_proj(y * F.silu(z)))
    return torch.stack(outs, dim=1)


def s4d_reference(m: S4D, x: torch.Tensor) -> torch.Tensor:
    B, L, H = x.shape
    dt = m.log_dt.exp()[:, None]
    a, b = torch.exp(-dt * m.A_log.exp()), dt * m.B
    s = x.new_zeros(B, H, m.d_state)
    outs = []
    for t in range(L):
        s = a * s + b * x[:, t, :, None]
        y = (m.C * s).sum(-1) + m.D * x[:, t]
        if m.activation == "gelu":
            y = F.gelu(y)
        y = m.output_linear(y)
        outs.append(F.glu(y, dim=-1) if m.gated_output else y)
    return torch.stack(outs, dim=1)


def short_conv_reference(m: ShortConv, x: torch.Tensor) -> torch.Tensor:
    taps = m.conv.weight[:, 0, :].flip(-1)  # taps[:, j] on lag j
    outs = []
    for t in range(x.shape[1]):
        y = sum(taps[:, j] * x[:, t - j] for j in range(m.kernel_size) if t - j >= 0)
        if m.conv.bias is not None:
            y = y + m.conv.bias
        outs.append(F.silu(y) if m.activation == "silu" else y)
    return torch.stack(outs, dim=1)


def hyena_reference(m: Hyena, x: torch.Tensor) -> torch.Tensor:
    """``y_t = x0_t (sum_{s <= t} h[t - s] x1_s v_s + bias x1_t v_t)`` with an explicit sum."""
    L = x.shape[1]
    uc = m.short_filter(m.in_proj(x).transpose(1, 2))[..., :L]
    x0, x1, v = uc.split(m.d_model, dim=1)
    h = m.filter(L, x.dtype)
    w = x1 * v
    ys = []
    for t in range(L):
        acc = sum(h[:, t - s] * w[..., s] for s in range(t + 1)) + m.bias * w[..., t]
        ys.append(x0[..., t] * acc)
    return m.out_proj(torch.stack(ys, dim=-1).transpose(1, 2))


def reference(m: ESSMixer, x: torch.Tensor) -> torch.Tensor:
    table = {
        Mamba: mamba_reference,
        S4D: s4d_reference,
        ShortConv: short_conv_reference,
        Hyena: hyena_reference,
    }
    return table[type(m)](m, x)


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_view_shapes_and_apply_matches_fast_forward(name: str) -> None:
    m = make(name)
    x = inputs(2, 13)
    view = m.operator(x)
    G = m.d_inner if isinstance(m, Mamba) else D
    assert isinstance(view, OperatorView)
    assert tuple(view.op.batch_shape) == (2, G) and view.op.seq_len == 13
    assert view.u.shape == (2, G, 13) and view.y.shape == view.u.shape
    assert rel(view.op.apply(view.u), view.y) < seq_tol(F32, 13)
    out = m(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, m.readout(view, x))
    assert isinstance(view.op, DenseOperator if name.startswith("hyena") else RecurrentOperator)


@pytest.mark.parametrize("name", NAMES)
def test_dense_is_causal_and_realizes_y(name: str) -> None:
    m = make(name)
    view = m.operator(inputs(2, 9))
    T = view.op.dense()
    G = view.u.shape[1]
    assert T.shape == (2, G, 9, 9)
    assert torch.equal(torch.triu(T, 1), torch.zeros_like(T))
    assert rel((T @ view.u[..., None])[..., 0], view.y) < seq_tol(F32, 9)


@pytest.mark.parametrize("name", NAMES)
def test_jacobian_outputs_never_depend_on_future_inputs(name: str) -> None:
    m = make(name, dtype=torch.float64)
    L = 7
    x = inputs(1, L, torch.float64)
    J = torch.autograd.functional.jacobian(lambda z: m(z), x)[0, :, :, 0]  # [L, D, L, D]
    block = J.abs().amax(dim=(1, 3))
    t, s = torch.meshgrid(torch.arange(L), torch.arange(L), indexing="ij")
    # FFT convolutions (S4D, Hyena) leak round-off into the future (~ eps log(n) of the largest entry,
    # padded length n = 2L), nothing more
    fft = name.startswith(("s4d", "hyena"))
    assert (block[s > t] <= (tol(F64, block.max(), n=2 * L) if fft else 0)).all()
    if name.startswith("short_conv"):
        k = m.kernel_size
        assert (block[t - s >= k] == 0).all() and (block[(s <= t) & (t - s < k)] > 1e-8).all()
    else:
        assert (block[s < t] > 1e-8).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("L", [1, 11, 37])
@pytest.mark.parametrize("name", NAMES)
def test_fast_forward_matches_token_by_token_reference(name: str, L: int, dtype: torch.dtype) -> None:
    m = make(name, dtype=dtype)
    x = inputs(2, L, dtype)
    with torch.no_grad():
        fast, ref = m(x), reference(m, x)
    assert fast.dtype == dtype
    assert rel(fast, ref) < seq_tol(dtype, L)
    view = m.operator(x)
    assert view.y.dtype == dtype and view.op.dtype == dtype
    if dtype == torch.float64:
        assert rel(view.op.apply(view.u), view.y) < seq_tol(dtype, L)


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
@pytest.mark.parametrize("chunk", [None, 1, 3, 8, 64])
def test_selective_scan_matches_reference_and_gradcheck(chunk: int | None) -> None:
    g = torch.Generator().manual_seed(0)
    la = -torch.rand(2, 3, 21, 4, generator=g, dtype=torch.float64) * 2
    x = torch.randn(2, 3, 21, 4, generator=g, dtype=torch.float64)
    c = torch.randn(2, 1, 21, 4, generator=g, dtype=torch.float64)  # broadcast over dim 1
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


def test_selective_scan_survives_extreme_decays() -> None:
    g = torch.Generator().manual_seed(1)
    la = -torch.rand(1, 2, 64, 3, generator=g) * 5
    la[..., 10:20, 0] = -1e4  # a total reset
    la[..., 30:, 1] = -200.0  # exp(cumsum) far below float32's range
    la[..., 2] = 0.0  # no decay at all
    x = torch.randn(1, 2, 64, 3, generator=g)
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
    with pytest.raises(ValueError, match="unknown"):
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
    f = m._features(x)
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
    direct = torch.stack([sum(K[:, j] * u[..., t - j] for j in range(t + 1)) for t in range(L)], -1)
    # FFT: normwise error ~ eps log(n) ||K|| ||u||; bounded by that of the sum of |terms|, n = 2 L
    size = torch.stack([sum(K[:, j].abs() * u[..., t - j].abs() for j in range(t + 1)) for t in range(L)], -1)
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
    assert isinstance(op, GatedToeplitzOperator) and op._T is None  # not built by the forward
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
    assert rel(v2.op.apply(v2.u), v2.y) < seq_tol(F32, 20)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_flow_through_forward_and_operator(name: str) -> None:
    m = make(name)
    x = inputs(2, 7).requires_grad_(True)
    view = m.operator(x)
    loss = m.readout(view, x).square().mean() + view.op.dense().square().mean()
    loss.backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_smoke(name: str) -> None:
    m = make(name, dtype=torch.bfloat16)
    out = m(inputs(1, 9, torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_reset_parameters_is_in_init_and_deterministic() -> None:
    for name in NAMES:
        torch.manual_seed(3)
        m1 = FACTORIES[name]()
        torch.manual_seed(3)
        m2 = FACTORIES[name]()
        for p1, p2 in zip(m1.parameters(), m2.parameters()):
            assert torch.equal(p1, p2)
        m1.reset_parameters()  # callable on its own


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RECURRENT)
def test_recurrent_and_dense_ess_agree(name: str) -> None:
    entropy_ess = ess.entropy_ess
    m = make(name, dtype=torch.float64)
    op = m.operator(inputs(1, 10, torch.float64)).op
    rec = entropy_ess(op)
    dense = entropy_ess(DenseOperator(op.dense()))
    # the Gramian path squares singular values: tiny ones (S4D's fast-decaying spectrum) are resolved
    # to ~ sqrt((L + N) eps) only (tests/tolerances.py); the dense path keeps up to L // 2 values
    s = ess.hankel_singular_values(DenseOperator(op.dense()))  # [..., L, L // 2]
    ds = svd_error(F64, s.amax(-1, keepdim=True), 10, 10).expand_as(s).clone()
    N = op.state_dim
    ds[..., :N] += sigma_error_from_eig(s[..., :N], gramian_eig_error(F64, gramian_scale(op), 10, N))
    assert_within(rec[..., 1:], dense[..., 1:], entropy_ess_error(s, ds)[..., 1:], "Gramian vs dense")
    assert (rec >= 0).all() and (rec[..., 1:] > 0).any()
    bound = m.state_size(10).per_operator  # at most that many non-zero values: ESS <= bound (+ round-off)
    assert (rec <= bound + tol(F64, bound, n=bound + 2)).all()


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
    assert torch.isfinite(out).all() and rel(out, ref) < seq_tol(F32, 37)
    m(x).square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
