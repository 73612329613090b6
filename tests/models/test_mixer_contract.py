"""The :class:`ESSMixer` contract, for every mixer of the registry (``mixer_names()``), in several settings.

Operator views (shapes, ``op.apply(u) == y``, ``readout``), causality of ``T`` and of the Jacobian, the fast
forward against a token-by-token reference (``tests/reference_mixers.py``), gradients, bfloat16,
deterministic init, and the recurrent (Gramian) ESS against the dense one. Outputs of sums over ``L`` tokens
and ``d`` features are compared elementwise to ``tol(dtype, max |expected|, n=L + d)`` (tests/tolerances.py).
Family-specific checks (state sizes, argument errors, inits, operator structure) live in
``tests/models/test_mixers_attention_family.py`` and ``tests/models/test_mixers_ssm_conv.py``; the kernels' in
``tests/models/test_ops_*.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import ess_train.ess as ess
from ess_train.ess import DenseOperator, RecurrentOperator
from ess_train.models.mixer_registry import get_mixer_class, mixer_names
from ess_train.models.mixers.attention import SoftmaxAttention
from ess_train.models.mixers.decayed_linear_attention import DecayedLinearAttention
from ess_train.models.mixers.deltanet import DeltaNet
from ess_train.models.mixers.gla import GatedLinearAttention
from ess_train.models.mixers.hyena import Hyena
from ess_train.models.mixers.linear_attention import LinearAttention
from ess_train.models.mixers.mamba import Mamba
from ess_train.models.mixers.s4d import S4D
from ess_train.models.mixers.short_conv import ShortConv
from ess_train.models.mixers.sliding_window_attention import SlidingWindowAttention
from ess_train.models.protocol import ESSMixer, OperatorView
from tests.reference_mixers import reference_forward, reference_y
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


@dataclass(frozen=True)
class Config:
    """One setting of a registered mixer: ``build(chunk)`` makes it (``chunk``: chunk length of the
    chunked kernels, ignored by the others); ``perturb``: scale of the noise added to its parameters."""

    mixer: str
    build: Callable[[int], ESSMixer]
    perturb: float
    heads: bool = False  # head-wise (u: [B, H, L, d_v]) rather than per channel (u: [B, G, L])
    dense: bool = False  # a DenseOperator (no state recursion)
    softmax: bool = False  # rows of T sum to 1
    fft: bool = False  # FFT convolution: round-off leaks into the future


def _heads(mixer: str, build: Callable[[int], ESSMixer], **kw) -> Config:
    return Config(mixer, build, 0.5, heads=True, **kw)


CONFIGS: dict[str, Config] = {
    "attention": _heads("attention", lambda c: SoftmaxAttention(D, H), dense=True, softmax=True),
    "attention_rotary": _heads(
        "attention", lambda c: SoftmaxAttention(D, H, rotary=True), dense=True, softmax=True
    ),
    "swa": _heads(
        "sliding_window_attention",
        lambda c: SlidingWindowAttention(D, H, window=3, rotary=True),
        dense=True,
        softmax=True,
    ),
    "linear_elu": _heads(
        "linear_attention", lambda c: LinearAttention(D, H, feature_map="elu", chunk_size=c)
    ),
    "linear_identity": _heads(
        "linear_attention",
        lambda c: LinearAttention(D, H, feature_map="identity", normalize=False, chunk_size=c),
    ),
    "linear_taylor": _heads(
        "linear_attention", lambda c: LinearAttention(D, H, feature_map="taylor", feature_dim=3, chunk_size=c)
    ),
    "decayed": _heads(
        "decayed_linear_attention", lambda c: DecayedLinearAttention(D, H, rotary=True, chunk_size=c)
    ),
    "gla": _heads(
        "gla",
        lambda c: GatedLinearAttention(D, H, gate_low_rank_dim=4, gate_logit_normalizer=2.0, chunk_size=c),
    ),
    "deltanet": _heads("deltanet", lambda c: DeltaNet(D, H, chunk_size=c)),
    "deltanet_gated": _heads(
        "deltanet",
        lambda c: DeltaNet(D, H, expand_v=2.0, qk_activation="identity", use_output_gate=True, chunk_size=c),
    ),
    "mamba": Config("mamba", lambda c: Mamba(D, d_state=4, chunk_size=4), 0.3),
    "mamba_auto_chunk": Config("mamba", lambda c: Mamba(D, d_state=3, d_conv=3, expand=1.5, dt_rank=2), 0.3),
    "s4d": Config("s4d", lambda c: S4D(D, d_state=5), 0.3, fft=True),
    "s4d_plain": Config(
        "s4d", lambda c: S4D(D, d_state=3, activation="identity", gated_output=False), 0.3, fft=True
    ),
    "short_conv": Config("short_conv", lambda c: ShortConv(D, kernel_size=4), 0.3),
    "short_conv3_silu": Config(
        "short_conv", lambda c: ShortConv(D, kernel_size=3, bias=True, activation="silu"), 0.3
    ),
    "hyena": Config("hyena", lambda c: Hyena(D, max_seq_len=16, filter_order=8), 0.3, dense=True, fft=True),
}
NAMES = list(CONFIGS)
RECURRENT = [n for n in NAMES if not CONFIGS[n].dense]


def make(
    name: str,
    chunk: int = 4,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: torch.device | None = None,
) -> ESSMixer:
    """A mixer with perturbed parameters (operators away from their init's near-uniform ones), built on the
    CPU (the same parameters on every device) and moved to ``device``."""
    torch.manual_seed(seed)
    cfg = CONFIGS[name]
    m = cfg.build(chunk)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(cfg.perturb * torch.randn_like(p))
    return m.to(device=device, dtype=dtype)


def inputs(
    B: int, L: int, dtype: torch.dtype = torch.float32, seed: int = 1, device: torch.device | None = None
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, D, generator=g).to(device=device, dtype=dtype)


def groups(name: str, m: ESSMixer) -> int:
    """Operators per sequence: heads, Mamba's inner channels, or the model's channels."""
    return H if CONFIGS[name].heads else m.d_inner if isinstance(m, Mamba) else D


def realize(T: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``T @ u`` for head-wise (``u [..., L, d]``) and per-channel (``u [..., L]``) streams."""
    return T @ u if u.dim() == T.dim() else (T @ u[..., None])[..., 0]


def assert_seq_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, n: int, what: str
) -> None:
    """Sums of ``n`` terms (``L`` tokens and ``D`` features: ``n = L + D``) in any order (chunked kernels,
    token-by-token references, BLAS): elementwise ``tol(dtype, max |expected|, n)``."""
    assert_within(actual, expected, tol(dtype, expected.detach().abs().amax(), n=n), what)


# ----------------------------------------------------------------------------------------------------
# the registry as collected (tests may register more names later, e.g. aliases in test_backbone.py)
@pytest.mark.parametrize("mixer", mixer_names())
def test_every_registered_mixer_is_covered(mixer: str) -> None:
    settings = [c for c in CONFIGS.values() if c.mixer == mixer]
    assert settings, f"no contract setting for the registered mixer {mixer!r}"
    assert all(type(c.build(4)) is get_mixer_class(mixer) for c in settings)


@pytest.mark.parametrize("name", NAMES)
def test_view_shapes_and_apply_matches_fast_forward(name: str, device: torch.device) -> None:
    m = make(name, device=device)
    L = 13 if not CONFIGS[name].heads else 11
    x = inputs(2, L, device=device)
    view = m.operator(x)
    G = groups(name, m)
    assert isinstance(view, OperatorView)
    assert tuple(view.op.batch_shape) == (2, G) and view.op.seq_len == L
    if CONFIGS[name].heads:
        dv = view.u.shape[-1]
        assert view.u.shape == (2, G, L, dv)
        assert m.state_size(L).multiplicity == dv
    else:
        assert view.u.shape == (2, G, L)
    assert view.y.shape == view.u.shape
    assert_seq_close(view.op.apply(view.u), view.y, F32, L + D, "op.apply(u) vs y")
    out = m(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, m.readout(view, x))
    assert isinstance(view.op, DenseOperator if CONFIGS[name].dense else RecurrentOperator)


@pytest.mark.parametrize("name", NAMES)
def test_dense_is_causal_and_realizes_y(name: str, device: torch.device) -> None:
    m = make(name, device=device)
    view = m.operator(inputs(2, 9, device=device))
    T = view.op.dense()
    G = view.u.shape[1]
    assert T.shape == (2, G, 9, 9)
    assert torch.equal(torch.triu(T, 1), torch.zeros_like(T))
    # nothing above the diagonal was dropped: the lower-triangular T alone gives the layer's y
    assert_seq_close(realize(T, view.u), view.y, F32, 9 + D, "T u vs y")
    if CONFIGS[name].softmax:
        assert_within(T.sum(-1), 1.0, tol(F32, n=9), "softmax rows sum to 1")
    if name == "swa":
        t, s = torch.meshgrid(torch.arange(9, device=device), torch.arange(9, device=device), indexing="ij")
        assert (T[..., t - s >= 3] == 0).all() and (T[..., (t - s < 3) & (s <= t)] > 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_jacobian_outputs_never_depend_on_future_inputs(name: str, device: torch.device) -> None:
    m = make(name, chunk=2, dtype=torch.float64, device=device)
    L = 6 if CONFIGS[name].heads else 7
    x = inputs(1, L, torch.float64, device=device)
    J = torch.autograd.functional.jacobian(lambda z: m(z), x)[0, :, :, 0]  # [L, D, L, D]
    block = J.abs().amax(dim=(1, 3))  # [t, s]
    t, s = torch.meshgrid(torch.arange(L, device=device), torch.arange(L, device=device), indexing="ij")
    # FFT convolutions (S4D, Hyena) leak round-off into the future (~ eps log(n) of the largest entry,
    # padded length n = 2L), nothing more
    assert (block[s > t] <= (tol(F64, block.max(), n=2 * L) if CONFIGS[name].fft else 0)).all()
    if isinstance(m, SlidingWindowAttention):
        assert (block[(s < t) & (t - s < m.window)] > 1e-8).all()  # and the past does matter
        assert (block[t - s >= m.window] == 0).all()
    elif isinstance(m, ShortConv):
        k = m.kernel_size
        assert (block[t - s >= k] == 0).all() and (block[(s <= t) & (t - s < k)] > 1e-8).all()
    else:
        assert (block[s < t] > 1e-8).all()


# the SSM/conv references are whole layers (m(x)), the attention family's the operator output (view.y);
# chunking only concerns the recurrent attention-family mixers, the softmax ones run at one setting
_FAST_VS_REFERENCE = [
    case
    for n in NAMES
    for case in (
        [(n, 11, 4)] + ([(n, 37, 32)] if not CONFIGS[n].dense else [])
        if CONFIGS[n].heads
        else [(n, 1, 4), (n, 11, 4), (n, 37, 4)]
    )
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,L,chunk", _FAST_VS_REFERENCE)
def test_fast_forward_matches_token_by_token_reference(
    name: str, L: int, chunk: int, dtype: torch.dtype, device: torch.device
) -> None:
    m = make(name, chunk=chunk, dtype=dtype, device=device)
    x = inputs(2, L, dtype, device=device)
    if not CONFIGS[name].heads:
        with torch.no_grad():
            fast, ref = m(x), reference_forward(m, x)
        assert fast.dtype == dtype
        assert_seq_close(fast, ref, dtype, L + D, "forward vs reference")
    view = m.operator(x)
    assert view.y.dtype == dtype and view.op.dtype == dtype
    if CONFIGS[name].heads:
        assert_seq_close(view.y, reference_y(m, x), dtype, L + D, "y vs reference")
    if dtype == torch.float64:
        assert_seq_close(view.op.apply(view.u), view.y, dtype, L + D, "op.apply(u) vs y")


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_gradients_flow_through_forward_and_operator(name: str, device: torch.device) -> None:
    m = make(name, device=device)
    x = inputs(2, 7, device=device).requires_grad_(True)
    view = m.operator(x)
    loss = m.readout(view, x).square().mean() + view.op.dense().square().mean()
    loss.backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_smoke(name: str, device: torch.device) -> None:
    m = make(name, dtype=torch.bfloat16, device=device)
    out = m(inputs(1, 9, torch.bfloat16, device=device))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("name", NAMES)
def test_reset_parameters_is_in_init_and_deterministic(name: str) -> None:
    torch.manual_seed(3)
    m1 = CONFIGS[name].build(4)
    torch.manual_seed(3)
    m2 = CONFIGS[name].build(4)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
    assert isinstance(m1, nn.Module) and callable(m1.reset_parameters)
    m1.reset_parameters()  # callable on its own


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", RECURRENT)
def test_recurrent_and_dense_ess_agree(name: str, device: torch.device) -> None:
    entropy_ess = ess.entropy_ess
    m = make(name, dtype=torch.float64, device=device)
    op = m.operator(inputs(1, 10, torch.float64, device=device)).op
    rec = entropy_ess(op)
    dense = entropy_ess(op, method="dense")
    # the Gramian path squares singular values: tiny ones (S4D's fast-decaying spectrum) are resolved
    # to ~ sqrt((L + N) eps) only (tests/tolerances.py); the dense path keeps up to L // 2 values; position
    # 0 (empty H_0) is the engine's own convention, tested there
    s = ess.hankel_singular_values(DenseOperator(op.dense()))  # [..., L, L // 2]
    ds = svd_error(F64, s.amax(-1, keepdim=True), 10, 10).expand_as(s).clone()
    N = op.state_dim
    ds[..., :N] += sigma_error_from_eig(s[..., :N], gramian_eig_error(F64, gramian_scale(op), 10, N))
    assert_within(rec[..., 1:], dense[..., 1:], entropy_ess_error(s, ds)[..., 1:], "Gramian vs dense")
    assert (rec >= 0).all() and (rec[..., 1:] > 0).any()
    bound = m.state_size(10).per_operator  # at most that many non-zero values: ESS <= bound (+ round-off)
    assert (rec <= bound + tol(F64, bound, n=bound + 2)).all()
