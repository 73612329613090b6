"""The hybrids' own mixers: found with no registration, exact against references built from the modeling
files' own scan inputs (``tests/hf_hybrids.py``), multi-chunk lengths, float64, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ess_train
from ess_train.adapters import AdaptedLayer, CaptureError, registry
from ess_train.analysis.mixing_probe import unmeasured_mixing
from ess_train.ess import DenseOperator, entropy_ess
from ess_train.measure.layers import find_layers
from ess_train.models.protocol import capture_operators
from tests.hf_hybrids import MIXERS, mixers, model, reference_operators, tokens

FAMILIES = list(MIXERS)
#: float32 operators against float64 references: entries are sums of <= L products of O(1) terms, so
#: ``T`` agrees to ~L eps32 (2.4e-6 at L=20) relative to its largest entry; entropy-ESS moves by at most
#: a few times the singular values' relative error (it is a smooth function of sigma / sum(sigma))
OPERATOR_RTOL = 1e-5
ESS_RTOL = 1e-4


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_mixers_are_found_and_exact_against_the_modeling_files_scan_inputs(family):
    m = model(family)
    ids = tokens(length=20)  # Mamba2 chunks of 8: three chunks, the last one partial
    names = mixers(m, family)
    layers = find_layers(m)
    assert set(names) <= set(layers)
    for name in names:
        layer = layers[name]
        assert isinstance(layer, AdaptedLayer) and layer.kind == MIXERS[family][2]
        assert type(layer).__name__ == MIXERS[family][1]
    with torch.no_grad(), reference_operators(m, family) as refs, capture_operators(layers) as views:
        m(ids, use_cache=False)
    assert set(names) <= set(refs)
    for name in names:
        op = views[name].op
        assert op.dense().shape == refs[name].shape
        assert _rel(op.dense(), refs[name]) < OPERATOR_RTOL, name
        assert layers[name].checked_error is not None and layers[name].checked_error < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_analyze_entropy_ess_matches_the_reference(family):
    m = model(family)
    ids = tokens(length=20)
    with torch.no_grad(), reference_operators(m, family) as refs:
        report = ess_train.analyze(m, ids, positions=5)
    for name in mixers(m, family):
        layer = report.layers[name]
        ref = entropy_ess(DenseOperator(refs[name]), layer.positions).double()
        want = ref.reshape(-1, ref.shape[-1]).mean(0)
        got = torch.tensor(layer.entropy_ess, dtype=torch.float64)
        assert torch.allclose(got, want, rtol=ESS_RTOL, atol=0), (name, got, want)
        assert 0 < layer.utilization <= 1


def test_float64_mamba2_operator_and_tolerance_ess_are_float64():
    """Issue case 2: the operator was built in float32, so tolerance-ESS used the float32 threshold."""
    m = model("bamba", dtype=torch.float64)
    ids = tokens(length=20)
    layers = find_layers(m)
    with torch.no_grad(), capture_operators(layers) as views:
        m(ids, use_cache=False)
    assert views["model.layers.0.mamba"].op.dtype == torch.float64
    with torch.no_grad(), reference_operators(m, "bamba") as refs:
        report = ess_train.analyze(m, ids, positions=5)
    layer = report.layers["model.layers.0.mamba"]
    ref = ess_train.ess.tolerance_ess(DenseOperator(refs["model.layers.0.mamba"]), layer.positions)
    want = ref.double().reshape(-1, ref.shape[-1]).mean(0)
    got = torch.tensor(layer.tolerance_ess, dtype=torch.float64)
    assert torch.allclose(got, want, rtol=0, atol=1e-9), (got, want)


def test_recurrent_gemma_refuses_packed_rows_and_continuations():
    m = model("recurrent_gemma")
    ids = tokens(batch=1, length=12)
    layers = find_layers(m, include=["model.layers.0.temporal_block"])
    packed = torch.cat([torch.arange(6), torch.arange(6)])[None]
    with torch.no_grad(), capture_operators(layers), pytest.raises(CaptureError, match="restart"):
        m(ids, position_ids=packed, use_cache=False)
    with torch.no_grad(), capture_operators(layers), pytest.raises(CaptureError, match="position 0"):
        m(ids, position_ids=torch.arange(3, 15)[None], use_cache=False)


@pytest.mark.parametrize("family", ["lfm2", "bamba", "jamba", "recurrent_gemma", "zamba2", "falcon_h1"])
def test_generation_steps_are_refused(family):
    m = model(family)
    layers = find_layers(m, include=[next(iter(mixers(m, family)))])
    with torch.no_grad(), capture_operators(layers), pytest.raises(CaptureError, match="cached state"):
        m.generate(tokens(batch=1, length=6), max_new_tokens=2, do_sample=False)


def _probe(m, ids):
    L = ids.shape[1]
    return unmeasured_mixing(m, find_layers(m), lambda n: m(ids[:1, :n], use_cache=False), L)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "falcon_h1_norm"])
def test_not_measured_lists_the_mixers_by_structure_when_not_adapted(family, monkeypatch):
    """Issue case 5: LFM2's short conv, RecurrentGemma's block, GraniteMoeHybrid's mamba layer (and the
    other hybrids' mixers) are listed when no adapter measures them, and absent when one does; MLPs,
    norms, MoE blocks and anything inside or around a measured layer are never listed."""
    m = model(family)
    ids = tokens(length=20)
    names = set(mixers(m, family))
    attention = {n for n, mod in m.named_modules() if type(mod).__name__.endswith("Attention")}
    listed = _probe(m, ids)
    assert not names & set(listed) and set(listed) <= attention, listed
    key = next(k for k in registry.ADAPTERS if k.endswith("." + MIXERS[family][1]))
    monkeypatch.delitem(registry.ADAPTERS, key)
    listed = _probe(m, ids)
    assert names <= set(listed) <= names | attention, listed
    assert all("mixes along time" in listed[n] for n in names)


class _Pointwise(nn.Module):
    """A kernel-1 convolution over time: position-wise, not mixing."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(d, d, 1)

    def forward(self, x):
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


class _CausalConv(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(d, d, 3, groups=d, padding=2)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        L = x.shape[1]
        return self.proj(self.conv(x.transpose(1, 2))[..., :L].transpose(1, 2))


class _Cumsum(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, dim=1) / x.shape[1]


class _Toy(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.pointwise = _Pointwise(d)
        self.mixer = _CausalConv(d)
        self.cumsum = _Cumsum()

    def forward(self, x):
        x = x + self.mlp(self.norm(x))
        return self.cumsum(self.mixer(self.pointwise(x)))


@pytest.mark.parametrize(
    ("measured", "expected"),
    [((), {"mixer", "cumsum"}), (("mixer",), {"cumsum"}), (("mixer.conv", "cumsum"), set())],
)
def test_probe_finds_mixing_modules_not_position_wise_ones(measured, expected):
    torch.manual_seed(0)
    net = _Toy().eval()
    x = torch.randn(2, 16, 8)
    listed = unmeasured_mixing(net, measured, lambda n: net(x[:1, :n]), 16)
    assert set(listed) == expected  # a conv1d is reported as the mixer that owns it; kernel-1 conv is not


@pytest.mark.parametrize("family", ["lfm2", "granitemoehybrid"])
def test_analyze_report_lists_the_unadapted_mixer(family, monkeypatch):
    """Issue case 5 end to end: the old class-name pattern missed ``Lfm2ShortConv`` and
    ``GraniteMoeHybridMambaLayer``, so the report looked complete."""
    m = model(family)
    attention = next(mod for mod in m.modules() if type(mod).__name__.endswith("Attention"))
    monkeypatch.setattr(registry, "ADAPTERS", dict(registry.ADAPTERS))
    registry.register_attention_class(type(attention))
    del registry.ADAPTERS[next(k for k in registry.ADAPTERS if k.endswith("." + MIXERS[family][1]))]
    report = ess_train.analyze(m, tokens(length=20), positions=4)
    assert set(report.not_measured) == set(mixers(m, family)) and report.layers


def test_probe_falls_back_to_the_full_input_for_a_fixed_shape_forward():
    m = model("lfm2")
    ids = tokens(length=20)
    shapes = []

    def forward(model_, x):
        shapes.append(tuple(x.shape))
        if x.shape != ids.shape:
            raise ValueError("this forward takes [2, 20] only")
        return model_(x, use_cache=False)

    report = ess_train.analyze(m, ids, positions=4, forward_fn=forward)
    assert shapes[0] == (1, 13) and shapes[1:] == [(2, 20), (2, 20)]
    assert report.not_measured == ess_train.analyze(m, ids, positions=4).not_measured
    assert "model.layers.0.conv" in report.layers


@pytest.mark.parametrize("family", ["lfm2", "recurrent_gemma", "falcon_h1"])
def test_gradients_reach_the_mixers_parameters(family):
    m = model(family)
    name = next(iter(mixers(m, family)))
    layers = find_layers(m, include=[name])
    with capture_operators(layers) as views:
        m(tokens(length=12), use_cache=False)
    entropy_ess(views[name].op, [4, 8]).sum().backward()
    grads = [p.grad for p in mixers(m, family)[name].parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("family", ["lfm2", "granitemoehybrid", "jamba", "falcon_h1", "recurrent_gemma"])
def test_padded_batches_are_refused(family):
    m = model(family)
    ids = tokens(length=10)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    layers = find_layers(m, include=[next(iter(mixers(m, family)))])
    with torch.no_grad(), capture_operators(layers), pytest.raises(CaptureError, match="padded"):
        m(ids, attention_mask=mask, use_cache=False)
