"""Adapters of flash-linear-attention 0.6 layers (GLA, DeltaNet, GatedDeltaNet), on CPU.

fla's Triton kernels have no CPU path, so every forward here runs inside ``fla_on_cpu()``
(``tests/fla_cpu.py``), which routes the layers' kernels to fla's naive torch references: the adapters are
checked through those references, not through the Triton kernels. fla lives apart, in ``.fla-env``
(README's install): where it does not import, ``tests/conftest.py`` leaves this file out and
``tests/adapters/test_adapters_fla_env.py`` runs it in a subprocess with ``.fla-env`` on the path.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from fla.layers import DeltaNet, GatedDeltaNet, GatedLinearAttention  # collected only where fla imports
from torch import nn

from ess_train.adapters import base as adapters_base
from ess_train.adapters import fla_layers
from ess_train.adapters.base import AdaptedLayer, CaptureError, ExactnessError
from ess_train.analysis.report import analyze
from ess_train.ess import RecurrentOperator, entropy_ess
from ess_train.measure.layers import find_layers
from ess_train.models.protocol import capture_operators
from tests.fla_cpu import fla_on_cpu

D, VOCAB, L = 32, 37, 24
FACTORIES = {
    "gla": lambda i: GatedLinearAttention(hidden_size=D, num_heads=2, use_short_conv=True, layer_idx=i),
    "gla_gqa": lambda i: GatedLinearAttention(hidden_size=D, num_heads=4, num_kv_heads=2, layer_idx=i),
    "deltanet": lambda i: DeltaNet(hidden_size=D, num_heads=2, use_short_conv=True, layer_idx=i),
    "deltanet_sum": lambda i: DeltaNet(
        hidden_size=D, num_heads=2, use_short_conv=False, qk_norm="sum", allow_neg_eigval=True, layer_idx=i
    ),
    "gated_deltanet": lambda i: GatedDeltaNet(
        hidden_size=D, num_heads=2, head_dim=8, expand_v=2, layer_idx=i
    ),
    "gated_deltanet_gva": lambda i: GatedDeltaNet(
        hidden_size=D,
        num_heads=2,
        num_v_heads=4,
        head_dim=8,
        use_short_conv=False,
        allow_neg_eigval=True,
        layer_idx=i,
    ),
}
EXPECTED = {  # class name, kind, operators per row (heads)
    "gla": ("GatedLinearAttention", "gla", 2),
    "gla_gqa": ("GatedLinearAttention", "gla", 4),
    "deltanet": ("DeltaNet", "deltanet", 2),
    "deltanet_sum": ("DeltaNet", "deltanet", 2),
    "gated_deltanet": ("GatedDeltaNet", "gated_deltanet", 2),
    "gated_deltanet_gva": ("GatedDeltaNet", "gated_deltanet", 4),
}
MAIN = ["gla", "deltanet", "gated_deltanet"]


class Tiny(nn.Module):
    """Embedding, two fla layers with residuals, a head."""

    def __init__(self, family: str) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(FACTORIES[family](i) for i in range(2))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = x + layer(x)[0]
        return self.head(x)


def _model(family: str) -> Tiny:
    torch.manual_seed(0)
    return Tiny(family).eval()


def _ids(batch: int = 2, length: int = L) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def _capture(m: nn.Module, ids: torch.Tensor) -> tuple[dict, dict, torch.Tensor]:
    layers = find_layers(m)
    with torch.no_grad(), fla_on_cpu(), capture_operators(layers) as views:
        out = m(ids)
    return layers, dict(views), out


@pytest.mark.parametrize("family", list(FACTORIES))
def test_found_captured_and_exact(family):
    m, ids = _model(family), _ids()
    with torch.no_grad(), fla_on_cpu():
        before = m(ids)
    layers, views, out = _capture(m, ids)
    cls, kind, heads = EXPECTED[family]
    assert sorted(layers) == ["layers.0", "layers.1"] and set(views) == set(layers)
    for name, layer in layers.items():
        assert isinstance(layer, AdaptedLayer) and type(layer).__name__ == cls and layer.kind == kind
        assert layer.checked_error is not None and layer.checked_error < 1e-5, layer.checked_error
        assert tuple(views[name].op.batch_shape) == (2, heads) and views[name].op.seq_len == L
    assert torch.allclose(out, before, atol=1e-6)  # capturing does not change the model's output
    for mod in ("fla.layers.gla", "fla.layers.delta_net", "fla.layers.gated_deltanet"):  # globals restored
        assert not any(entry[2] is sys.modules[mod] for entry in adapters_base._SWAPS.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("family", MAIN)
def test_exact_in_other_dtypes(family, dtype):
    layers, views, _ = _capture(_model(family).to(dtype), _ids())
    # the naive references compute in float32, so float64 is held to float32 round-off
    bound = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert all(lay.checked_error is not None and lay.checked_error < bound for lay in layers.values())
    assert views["layers.0"].op.dtype == torch.promote_types(dtype, torch.float32)


def test_state_sizes():
    families = ("gla", "deltanet", "gated_deltanet_gva")
    sizes = {f: find_layers(_model(f))["layers.0"].state_size(L) for f in families}
    assert (sizes["gla"].total, sizes["gla"].per_operator, sizes["gla"].multiplicity) == (2 * 8 * 16, 8, 16)
    assert sizes["deltanet"].total == 2 * 16 * 16 and sizes["deltanet"].multiplicity == 16
    assert sizes["gated_deltanet_gva"].total == 4 * 8 * 16 and sizes["gated_deltanet_gva"].per_operator == 8


@pytest.mark.parametrize("family", MAIN)
def test_corrupted_operator_fails_loudly(family, monkeypatch):
    def bad(cls):  # c (the last argument of both operators) off by 1%
        return lambda *args: cls(*args[:-1], args[-1] * 1.01)

    monkeypatch.setattr(fla_layers, "RecurrentOperator", bad(fla_layers.RecurrentOperator))
    monkeypatch.setattr(fla_layers, "DeltaRuleOperator", bad(fla_layers.DeltaRuleOperator))
    with pytest.raises(ExactnessError, match=EXPECTED[family][0] + ".*max-relative error"):
        _capture(_model(family), _ids())


def _conv(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """Causal depthwise conv + SiLU by hand (fla's ShortConvolution)."""
    pad = conv.weight.shape[-1] - 1
    y = F.conv1d(x.transpose(1, 2), conv.weight, conv.bias, padding=pad, groups=x.shape[-1])
    return F.silu(y[..., : x.shape[1]].transpose(1, 2))


def _heads(x: torch.Tensor, d: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, d)).transpose(1, 2)  # [B, T, H d] -> [B, H, T, d]


def _by_hand(layer: nn.Module, x: torch.Tensor) -> RecurrentOperator:
    """The operator of one fla layer on input ``x``, built from its projections (not from a kernel call)."""
    dk = layer.head_k_dim
    q, k = (_conv(p(x), c) for p, c in ((layer.q_proj, layer.q_conv1d), (layer.k_proj, layer.k_conv1d)))
    q, k = _heads(q, dk), _heads(k, dk)
    if isinstance(layer, GatedLinearAttention):
        gk = _heads(F.logsigmoid(layer.gk_proj(x)) / layer.gate_logit_normalizer, dk)
        return RecurrentOperator(gk.exp(), k, q * dk**-0.5)
    q, k = F.normalize(q, dim=-1, eps=1e-3), F.normalize(k, dim=-1, eps=1e-3)
    beta = layer.b_proj(x).sigmoid().transpose(1, 2)  # [B, H, T]
    a = torch.eye(dk) - beta[..., None, None] * k[..., :, None] * k[..., None, :]
    if isinstance(layer, GatedDeltaNet):
        g = -layer.A_log.exp()[:, None] * F.softplus(layer.a_proj(x).transpose(1, 2) + layer.dt_bias[:, None])
        a = g.exp()[..., None, None] * a
    return RecurrentOperator(a, beta[..., None] * k, q * dk**-0.5)


@pytest.mark.parametrize("family", MAIN)
def test_analyze_matches_operator_built_by_hand(family):
    m, ids = _model(family), _ids()
    with fla_on_cpu():
        report = analyze(m, ids, positions=8)
    layer = report.layers["layers.0"]
    assert layer.kind == EXPECTED[family][1] and layer.exactness_error < 1e-5
    with torch.no_grad():
        op = _by_hand(m.layers[0], m.embed(ids))
        want = entropy_ess(op, layer.positions).mean(dim=(0, 1))
    got = torch.tensor(layer.entropy_ess, dtype=torch.float64)
    assert torch.allclose(got, want.double(), rtol=1e-3, atol=1e-6), (got, want)
    assert layer.tss == find_layers(m)["layers.0"].state_size(L).total


@pytest.mark.parametrize("family", MAIN)
def test_unknown_kernel_flag_refused(family, monkeypatch):
    kernels = dict(fla_layers.KERNEL_ARGS["0.6.0"])
    flag = "use_qk_l2norm_in_kernel" if family != "gla" else "state_v_first"
    for name, args in kernels.items():  # as if a newer fla passed a flag the table does not know
        kernels[name] = tuple(a for a in args if a != flag)
    monkeypatch.setitem(fla_layers.KERNEL_ARGS, "0.6.0", kernels)
    with pytest.raises(CaptureError, match=f"unknown kernel flag.*{flag}"):
        _capture(_model(family), _ids())


def test_bind_refuses_unknown_keyword_and_stateful_calls():
    with pytest.raises(CaptureError, match="unknown kernel flag.*'brand_new_flag'"):
        fla_layers.bind("chunk_gla", (), {"q": 0, "brand_new_flag": True}, "0.6.0")
    m = _model("gated_deltanet")
    layers = find_layers(m)
    x = m.embed(_ids())
    with torch.no_grad(), fla_on_cpu(), capture_operators(layers):
        with pytest.raises(CaptureError, match="padded batches"):
            m.layers[0](x, attention_mask=torch.tensor([[1] * L, [0] + [1] * (L - 1)]))


def test_unsupported_fla_version_is_refused(monkeypatch):
    import fla

    monkeypatch.setattr(fla, "__version__", "0.5.0")
    with pytest.raises(ImportError, match="0.5.0 is not supported"):
        find_layers(_model("gla"))


@pytest.mark.parametrize("family", MAIN)
def test_gradients_reach_parameters_through_a_capture(family):
    m = _model(family).train()
    layers = find_layers(m)
    with fla_on_cpu(), capture_operators(layers) as views:
        m(_ids(length=16))
    view = views["layers.0"]
    assert layers["layers.0"].checked_error < 1e-5  # training mode: GatedDeltaNet takes the chunk kernel
    loss = entropy_ess(view.op, [4, 8]).sum()
    loss.backward()
    layer = m.layers[0]
    names = {
        "gla": ["q_proj", "k_proj", "gk_proj.0"],
        "deltanet": ["q_proj", "k_proj", "b_proj"],
        "gated_deltanet": ["q_proj", "k_proj", "b_proj", "a_proj", "A_log", "dt_bias"],
    }[family]
    params = dict(layer.named_parameters())
    for n in names:
        p = params[n if n in params else n + ".weight"]
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
