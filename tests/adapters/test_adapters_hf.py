"""Adapters of unmodified Hugging Face layers: exact operators, dispatch by exact class, refusals."""

from __future__ import annotations

import pytest
import torch

from ess_train.adapters import AdaptedLayer, CaptureError, ExactnessError, adapt, hf_attention
from ess_train.measure.layers import find_layers
from ess_train.models.protocol import capture_operators
from tests.hf_models import model, tokens

FAMILIES = [
    "llama",
    "llama_mha",
    "mistral",
    "gpt2",
    "qwen2",
    "qwen3",
    "mamba",
    "falcon_mamba",
    "mamba2",
    "qwen3_next",
]
EXPECTED = {
    "llama": ("model.layers.0.self_attn", "LlamaAttention", "softmax_attention", (2, 4)),
    "llama_mha": ("model.layers.0.self_attn", "LlamaAttention", "softmax_attention", (2, 4)),
    "mistral": ("model.layers.0.self_attn", "MistralAttention", "sliding_window_attention", (2, 4)),
    "gpt2": ("transformer.h.0.attn", "GPT2Attention", "softmax_attention", (2, 4)),
    "qwen2": ("model.layers.0.self_attn", "Qwen2Attention", "softmax_attention", (2, 4)),
    "qwen3": ("model.layers.0.self_attn", "Qwen3Attention", "softmax_attention", (2, 4)),
    "mamba": ("backbone.layers.0.mixer", "MambaMixer", "mamba", (2, 64)),
    "falcon_mamba": ("backbone.layers.0.mixer", "FalconMambaMixer", "falcon_mamba", (2, 64)),
    "mamba2": ("backbone.layers.0.mixer", "Mamba2Mixer", "mamba2", (2, 8)),
    "qwen3_next": ("model.layers.0.linear_attn", "Qwen3NextGatedDeltaNet", "gated_deltanet", (2, 4)),
}


def _capture(m, ids, **find):
    layers = find_layers(m, **find)
    with torch.no_grad(), capture_operators(layers) as views:
        out = m(ids, use_cache=False).logits
    return layers, dict(views), out


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layer_is_found_captured_and_exact(family):
    m = model(family)
    impl = m.config._attn_implementation
    ids = tokens()
    with torch.no_grad():
        before = m(ids, use_cache=False).logits
    layers, views, out = _capture(m, ids)
    name, cls, kind, batch = EXPECTED[family]
    assert len(layers) == 2 and name in layers
    layer = layers[name]
    assert isinstance(layer, AdaptedLayer) and type(layer).__name__ == cls and layer.kind == kind
    assert set(views) == set(layers)
    assert tuple(views[name].op.batch_shape) == batch and views[name].op.seq_len == ids.shape[1]
    for lay in layers.values():  # the check ran at the first capture and passed at float32 round-off
        assert lay.checked_error is not None and lay.checked_error < 1e-5
    assert torch.allclose(out, before, atol=1e-5)  # capturing does not change the model's output
    assert m.config._attn_implementation == impl  # and leaves its config as it was


def test_gqa_operator_per_query_head_and_state_size():
    m = model("llama")
    layers, views, _ = _capture(m, tokens(length=20))
    layer = layers["model.layers.0.self_attn"]
    size = layer.state_size(20)
    assert (size.total, size.per_operator, size.multiplicity) == (2 * 20 * 2 * 8, 10, 8)  # 2 L n_kv d_head
    view = views["model.layers.0.self_attn"]
    assert view.u.shape == (2, 4, 20, 8)
    # query heads 0 and 1 share key/value head 0: the same value stream
    assert torch.equal(view.u[:, 0], view.u[:, 1]) and not torch.equal(view.u[:, 1], view.u[:, 2])


def test_sliding_window_operator_is_banded_and_sized():
    m = model("mistral")
    layers, views, _ = _capture(m, tokens(length=24))
    T = views["model.layers.0.self_attn"].op.T
    assert float(T[..., 20, :13].abs().max()) == 0.0 and float(T[..., 20, 13:21].min()) > 0
    size = layers["model.layers.0.self_attn"].state_size(24)
    assert (size.total, size.per_operator) == (2 * 8 * 2 * 8, 7)


def test_mamba_state_sizes():
    layers = find_layers(model("mamba"))
    s = layers["backbone.layers.0.mixer"].state_size(32)
    assert (s.total, s.per_operator, s.multiplicity) == (64 * 8, 8, 1)
    layers = find_layers(model("mamba2"))
    s = layers["backbone.layers.0.mixer"].state_size(32)
    assert (s.total, s.per_operator, s.multiplicity) == (8 * 8 * 8, 8, 8)


def test_falcon_mamba_under_the_plain_mamba_recipe_is_caught():
    m = model("falcon_mamba")
    layers = find_layers(m)
    for lay in layers.values():
        lay.norms = False  # the trap: Mamba's recipe on FalconMamba's mixer
    with pytest.raises(
        ExactnessError, match=r"backbone.layers.0.mixer.*FalconMambaMixer.*max-relative error"
    ):
        with torch.no_grad(), capture_operators(layers):
            m(tokens(), use_cache=False)


def test_attention_without_the_mask_function_is_refused():
    from transformers.masking_utils import AttentionMaskInterface

    m = model("llama")
    hf_attention._register()
    AttentionMaskInterface.register(hf_attention.IMPLEMENTATION, lambda *a, **k: None)  # the trap: no mask
    try:
        with pytest.raises(CaptureError, match="not a causal operator"):
            _capture(m, tokens())
    finally:
        AttentionMaskInterface.register(hf_attention.IMPLEMENTATION, hf_attention._mask)


def test_dispatch_is_by_exact_class():
    m = model("mamba")
    mixer = m.backbone.layers[0].mixer
    Sub = type("MyMixer", (type(mixer),), {})
    mixer.__class__ = Sub
    assert adapt(mixer) is None
    assert "backbone.layers.0.mixer" not in find_layers(m)


@pytest.mark.parametrize("family", ["llama", "mamba", "mamba2"])
def test_padded_batches_are_refused(family):
    m = model(family)
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    layers = find_layers(m)
    with pytest.raises(CaptureError, match="padded"):
        with torch.no_grad(), capture_operators(layers):
            m(ids, attention_mask=mask, use_cache=False)


@pytest.mark.parametrize("family", ["llama", "mamba"])
def test_generation_steps_are_refused(family):
    m = model(family)
    layers = find_layers(m)
    with pytest.raises(CaptureError, match="generation"):
        with torch.no_grad(), capture_operators(layers):
            m.generate(tokens(batch=1, length=6), max_new_tokens=2, do_sample=False)


def test_packed_rows_are_refused():
    m = model("llama")
    ids = tokens(batch=1, length=12)
    pos = torch.cat([torch.arange(6), torch.arange(6)])[None]
    with pytest.raises(CaptureError, match="packed"):
        with torch.no_grad(), capture_operators(find_layers(m)):
            m(ids, position_ids=pos, use_cache=False)


def test_gradients_flow_through_captured_operators():
    for family in ("llama", "mamba2", "qwen3_next"):
        m = model(family).train()
        layers = find_layers(m)
        with capture_operators(layers) as views:
            m(tokens(length=12), use_cache=False)
        view = next(iter(views.values()))
        leaf = view.op.T if hasattr(view.op, "T") else view.op.a
        leaf.sum().backward()
        grads = [p.grad for p in m.parameters() if p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads), family


def test_nested_captures_each_get_the_views():
    m = model("llama")
    outer_layers, inner_layers = find_layers(m), find_layers(m)
    with torch.no_grad(), capture_operators(outer_layers) as outer, capture_operators(inner_layers) as inner:
        m(tokens(), use_cache=False)
    assert set(outer) == set(inner) == set(outer_layers)
    assert m.config._attn_implementation == "sdpa"


def test_gated_deltanet_operator_state_size_and_unknown_flags():
    m = model("qwen3_next")
    layers, views, _ = _capture(m, tokens(length=16))
    layer = layers["model.layers.0.linear_attn"]
    assert layers["model.layers.1.self_attn"].kind == "softmax_attention"  # the hybrid's attention layer
    op = views["model.layers.0.linear_attn"].op
    assert not op.diagonal and op.a.shape == (2, 4, 16, 8, 8)  # full A_t = exp(g)(I - beta k k^T), d_k = 8
    s = layer.state_size(16)
    assert (s.total, s.per_operator, s.multiplicity) == (4 * 8 * 8, 8, 8)
    q = torch.randn(1, 4, 2, 8)
    v = torch.randn(1, 4, 4, 8)
    g = beta = torch.zeros(1, 4, 4)
    with pytest.raises(CaptureError, match=r"unknown kernel flags \['new_flag'\]"):
        layer._view("x", (q, q, v), {"g": g, "beta": beta, "new_flag": True}, None)


def test_cross_attention_is_not_measured():
    import ess_train

    m = model("gpt2", add_cross_attention=True)  # GPT2Attention modules used as cross-attention too
    layers = find_layers(m)
    assert "transformer.h.0.attn" in layers and "transformer.h.0.crossattention" not in layers
    report = ess_train.analyze(m, tokens(length=16), positions=4)
    assert "cross-attention" in report.not_measured["transformer.h.0.crossattention"]


def test_training_mode_with_attention_dropout_is_captured_exactly():
    m = model("llama", attention_dropout=0.5).train()
    layers = find_layers(m)
    with capture_operators(layers) as views:
        m(tokens(length=12), use_cache=False)
    view = views["model.layers.0.self_attn"]
    assert float(view.op.T.sum(-1).std()) > 0  # dropout applied to P: rows no longer sum to 1
    assert layers["model.layers.0.self_attn"].checked_error < 1e-5  # P (after dropout) @ V is the output
