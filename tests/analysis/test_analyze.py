"""``ess_train.analyze``: the report, and its agreement with ESS computed independently of the adapters."""

from __future__ import annotations

import json
import math

import pytest
import torch

import ess_train
from ess_train.analysis import UnsupportedModelError
from ess_train.ess import DenseOperator, RecurrentOperator, entropy_ess
from tests.hf_models import model, tokens

REL = 1e-3


def _close(got: list[float], ref: torch.Tensor) -> None:
    got_t = torch.tensor(got, dtype=torch.float64)
    ref = ref.detach().double()
    err = float(((got_t - ref).abs() / ref.abs().clamp_min(1e-12)).max())
    assert err < REL, (err, got, ref.tolist())


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_attention_matches_ess_of_the_models_own_eager_probabilities(family):
    m = model(family)
    ids = tokens(length=32)
    report = ess_train.analyze(m, ids, positions=8)
    m.config._attn_implementation = "eager"  # the model's own eager attention, probabilities returned
    with torch.no_grad():
        attentions = m(ids, output_attentions=True, use_cache=False).attentions
    names = list(report.layers)
    assert len(attentions) == len(names) == 2
    for name, P in zip(names, attentions):
        layer = report.layers[name]
        ref = entropy_ess(DenseOperator(P), positions=layer.positions).mean(dim=(0, 1))
        _close(layer.entropy_ess, ref)


def _record(monkeypatch, module, fn_name):
    calls = []
    original = getattr(module, fn_name)

    def wrapper(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, fn_name, wrapper)
    return calls


def test_mamba_matches_ess_from_its_scan_parameters(monkeypatch):
    import transformers.models.mamba.modeling_mamba as mm

    m = model("mamba")
    ids = tokens(length=32)
    report = ess_train.analyze(m, ids, positions=8)
    calls = _record(monkeypatch, mm, "mamba_selective_scan")
    with torch.no_grad():
        m(ids, use_cache=False)
    assert len(calls) == 2
    for name, (args, kw) in zip(report.layers, calls):
        u, dt, A, B, C = args[
            :5
        ]  # the kernel's own inputs: u [b, D, L], dt [b, D, L], A [D, N], B/C [b, N, L]
        dt = torch.nn.functional.softplus(dt + kw["delta_bias"][:, None])
        a = torch.exp(A[None, :, None, :] * dt[..., None])
        b = dt[..., None] * B.transpose(1, 2)[:, None]
        c = C.transpose(1, 2)[:, None].expand_as(b)
        layer = report.layers[name]
        ref = entropy_ess(RecurrentOperator(a, b, c), positions=layer.positions).mean(dim=(0, 1))
        _close(layer.entropy_ess, ref)


def test_mamba2_matches_ess_from_its_scan_parameters(monkeypatch):
    import transformers.models.mamba2.modeling_mamba2 as mm

    m = model("mamba2")
    ids = tokens(length=32)
    report = ess_train.analyze(m, ids, positions=8)
    calls = _record(monkeypatch, mm, "mamba2_chunk_scan")
    with torch.no_grad():
        m(ids, use_cache=False)
    assert len(calls) == 2
    for name, (args, kw) in zip(report.layers, calls):
        x, dt, A, B, C = args[:5]  # x [b, L, H, P], dt [b, L, H], A [H], B/C [b, L, G, N]
        lo, hi = kw["dt_limit"]
        dt = torch.nn.functional.softplus(dt + kw["dt_bias"]).clamp(lo, hi)
        H, N = x.shape[2], B.shape[-1]
        rep = H // B.shape[2]
        Bh = B.repeat_interleave(rep, dim=2).transpose(1, 2)  # [b, H, L, N]
        Ch = C.repeat_interleave(rep, dim=2).transpose(1, 2)
        a = torch.exp(A * dt).transpose(1, 2)[..., None].expand(-1, -1, -1, N)
        b = dt.transpose(1, 2)[..., None] * Bh
        layer = report.layers[name]
        ref = entropy_ess(RecurrentOperator(a, b, Ch), positions=layer.positions).mean(dim=(0, 1))
        _close(layer.entropy_ess, ref)


def test_report_fields_and_json():
    m = model("llama")
    report = ess_train.analyze(m, tokens(length=24), positions=6)
    assert list(report.layers) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    layer = report.layers["model.layers.0.self_attn"]
    assert layer.positions == report.positions and len(layer.positions) == 6
    assert all(isinstance(p, int) for p in layer.positions) and layer.positions[0] == 1
    assert len(layer.entropy_ess) == 6 and len(layer.tolerance_ess) == 6
    assert layer.kind == "softmax_attention" and layer.cls == "LlamaAttention"
    assert 0 < layer.utilization <= 1 and layer.tss == 2 * 24 * 2 * 8
    # total ESS: multiplicity (head_dim) * states (2 KV heads, each read by 2 query heads) * mean ESS
    assert math.isclose(layer.total_ess, 8 * 2 * layer.avg_entropy_ess, rel_tol=1e-5)
    assert layer.exactness_error is not None and layer.exactness_error < 1e-5
    data = json.loads(json.dumps(report.to_dict()))
    assert data["layers"]["model.layers.0.self_attn"]["entropy_ess"] == pytest.approx(layer.entropy_ess)
    assert data["total_tss"] == 2 * layer.tss


def test_positions_list_and_all():
    m = model("mamba", layers=1)
    ids = tokens(length=16)
    assert ess_train.analyze(m, ids, positions=[3, 8]).positions == [3, 8]
    full = ess_train.analyze(m, ids, positions="all")
    assert full.positions == list(range(16)) and len(full.layers["backbone.layers.0.mixer"].entropy_ess) == 16


def test_plots_are_written(tmp_path):
    report = ess_train.analyze(model("mamba2", layers=1), tokens(length=16), positions=4)
    paths = report.plot(tmp_path)
    assert [p.name for p in paths] == [
        "ess_profiles.png",
        "ess_utilization.png",
        "ess_utilization_layers.png",
        "ess_entropy_layers.png",
    ]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_unknown_layer_classes_are_reported_not_measured():
    m = model("mamba")
    mixer = m.backbone.layers[1].mixer
    mixer.__class__ = type("CustomMixer", (type(mixer),), {})
    report = ess_train.analyze(m, tokens(length=16), positions=4)
    assert list(report.layers) == ["backbone.layers.0.mixer"]
    assert "CustomMixer" in report.not_measured["backbone.layers.1.mixer"]


def test_unsupported_model_lists_what_was_found():
    net = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.MultiheadAttention(8, 2))
    with pytest.raises(UnsupportedModelError, match="MultiheadAttention"):
        ess_train.analyze(net, torch.zeros(1, 4, dtype=torch.long))


def test_bad_input_is_refused():
    m = model("llama")
    with pytest.raises(ValueError, match="exceeds the model's context of 128"):
        ess_train.analyze(m, tokens(length=130))
    ids = tokens(length=12)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with pytest.raises(ValueError, match="padded"):
        ess_train.analyze(m, ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"\[batch, L\]"):
        ess_train.analyze(m, ids[0])


def test_import_ess_train_stays_light_and_exports_analyze():
    import subprocess
    import sys

    code = (
        "import sys, ess_train\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
        "from ess_train.analysis import analyze\n"
        "assert ess_train.analyze is analyze\n"
        "import ess_train.adapters\n"
        "assert 'transformers' not in sys.modules, 'the adapters import transformers eagerly'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
