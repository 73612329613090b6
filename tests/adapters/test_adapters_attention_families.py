"""Attention measured by mechanism: every transformers family whose attention goes through the attention
interface (and BLOOM's own ALiBi softmax) is measured by ``analyze`` with no registration, each layer's
entropy-ESS equal to the ESS of the model's own eager attention probabilities (``output_attentions``,
computed apart from the adapters, in float64); sliding windows read from the mask; each call site of a
module called twice reported on its own; cross-attention skipped; a forward that does not call the
interface refused by name.

Tolerance: both sides take the same float32 probabilities from the same eager computation; what differs is
the ESS arithmetic (float32 singular values from a float64 Gram matrix here, float64 SVDs in the reference):
a few float32 ulps of each singular value, amplified by at most the entropy's condition (log of the
number of values, ~3 here): 1e-5 relative holds with margin (3e-7 measured).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks import tiny_families as hf_families
from ess_train import analyze
from ess_train.adapters import CaptureError
from ess_train.ess import DenseOperator, entropy_ess
from tests import hf_hybrids

transformers = pytest.importorskip("transformers")
RTOL = 1e-5
HYBRID_ATTENTION = ["jamba", "bamba", "granitemoehybrid", "falcon_h1", "zamba2", "lfm2", "recurrent_gemma"]


def _reference_profiles(eager: nn.Module, ids: torch.Tensor, **kwargs) -> list[torch.Tensor]:
    """Entropy-ESS at every position, averaged over rows and heads, of each attention layer's eager
    probabilities (in call order), in float64."""
    with torch.no_grad():
        out = eager(ids, output_attentions=True, use_cache=False, **kwargs)
    return [entropy_ess(DenseOperator(p.double())).mean(dim=(0, 1)) for p in out.attentions]


def _window_of(probs: torch.Tensor) -> int | None:
    """Keys a query sees, from the probabilities' support (None: every earlier key)."""
    seen = (probs[0, 0] > 0).sum(-1)
    L = probs.shape[-1]
    return None if bool((seen == torch.arange(1, L + 1)).all()) else int(seen.max())


def _assert_matches(report, references: list[torch.Tensor]) -> None:
    assert len(report.layers) == len(references)
    for layer, ref in zip(report.layers.values(), references, strict=True):
        got = torch.tensor(layer.entropy_ess, dtype=torch.float64)
        torch.testing.assert_close(got, ref[layer.positions], rtol=RTOL, atol=1e-9, msg=layer.name)


@pytest.mark.parametrize("family", hf_families.FAMILIES)
def test_every_family_is_measured_exactly_with_no_registration(family: str) -> None:
    ids = hf_families.tokens(length=40)
    report = analyze(hf_families.model(family), ids, positions=None)  # every position
    assert report.layers and not report.not_measured, report.not_measured
    eager = hf_families.model(family, implementation="eager")
    with torch.no_grad():
        probs = eager(ids, output_attentions=True, use_cache=False).attentions
    _assert_matches(report, [entropy_ess(DenseOperator(p.double())).mean(dim=(0, 1)) for p in probs])
    for layer, p in zip(report.layers.values(), probs, strict=True):
        window = _window_of(p)
        assert layer.kind == ("sliding_window_attention" if window else "softmax_attention"), layer.name
        assert layer.per_operator == (20 if window is None else min(window - 1, 20)), layer.name
        assert layer.exactness_error is not None and layer.exactness_error < 1e-5
    if family in hf_families.WINDOWED:  # the family's window is really exercised (L = 40 > 8)
        assert any(r.kind == "sliding_window_attention" for r in report.layers.values())


def test_a_window_that_lives_only_in_the_mask_is_read_from_it() -> None:
    """Issue 22, case 4: Qwen2-MoE's sliding layer was reported as full attention (bound L/2, not w-1)."""
    m = hf_families.model("qwen2_moe")
    attention = m.model.layers[0].self_attn
    attention.sliding_window = None  # nothing on the module says so: only the mask has the window
    report = analyze(m, hf_families.tokens(length=40), positions=8)
    first = report.layers["model.layers.0.self_attn"]
    assert first.kind == "sliding_window_attention" and first.per_operator == hf_families.WINDOW - 1
    assert first.tss == 2 * hf_families.WINDOW * 2 * 8  # window x KV heads x head dim, keys and values
    assert report.layers["model.layers.1.self_attn"].kind == "softmax_attention"


@pytest.mark.parametrize("family", HYBRID_ATTENTION)
def test_the_hybrids_attention_layers_are_exact_against_their_eager_probabilities(family: str) -> None:
    """The hybrids' attention (Zamba2's shared block at each call site, Falcon-H1's in every layer,
    RecurrentGemma's local attention) against the same model's eager ``output_attentions``, in call order."""
    ids = hf_hybrids.tokens(length=20)
    report = analyze(hf_hybrids.model(family), ids, positions=6)
    attention = [r for r in report.layers.values() if r.kind.endswith("attention")]
    assert attention and not report.not_measured
    assert all(r.exactness_error is not None and r.exactness_error < 1e-5 for r in attention)
    eager = hf_hybrids.model(family)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        probs = [p for p in eager(ids, output_attentions=True, use_cache=False).attentions if p is not None]
    assert len(attention) == len(probs)
    for layer, p in zip(attention, probs, strict=True):
        ref = entropy_ess(DenseOperator(p.double())).mean(dim=(0, 1))
        got = torch.tensor(layer.entropy_ess, dtype=torch.float64)
        torch.testing.assert_close(got, ref[layer.positions], rtol=RTOL, atol=1e-9, msg=layer.name)


def test_each_call_site_of_a_module_called_twice_is_its_own_entry() -> None:
    """Issue 22, case 3: a module called twice in one forward gave one entry (the last call's ESS under the
    first call's name). Here one Llama decoder layer runs at depths 0 and 1."""
    m = hf_families.model("smollm3")
    shared = m.model.layers[0]
    m.model.layers = nn.ModuleList([shared, shared])
    m.config.num_hidden_layers = 2
    ids = hf_families.tokens(length=24)
    report = analyze(m, ids, positions=None)
    name = "model.layers.0.self_attn"
    assert list(report.layers) == [name, f"{name}#2"]
    eager = hf_families.model("smollm3", implementation="eager")
    eager.model.layers = nn.ModuleList([eager.model.layers[0], eager.model.layers[0]])
    _assert_matches(report, _reference_profiles(eager, ids))
    first, second = (report.layers[k].avg_entropy_ess for k in (name, f"{name}#2"))
    assert first != second  # the two depths see different inputs


def test_zamba2s_shared_block_is_reported_per_call_site() -> None:
    cfg = hf_hybrids.config("zamba2")
    cfg.num_mem_blocks = 1  # one shared transformer block, called at every hybrid layer
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    report = analyze(m, hf_hybrids.tokens(length=20), positions=6)
    sites = [n for n in report.layers if n.split("#")[0].endswith("self_attn")]
    hybrid_layers = sum(1 for t in cfg.layers_block_type if t == "hybrid")
    assert len(sites) == hybrid_layers >= 2 and len(set(sites)) == len(sites)
    assert len({round(report.layers[n].avg_entropy_ess, 9) for n in sites}) == len(sites)


def test_gpt2_with_cross_attention_measures_its_self_attention() -> None:
    """Cross-attention used to abort the capture with a KV-cache message; it is skipped (listed)."""
    cfg = transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, add_cross_attention=True
    )
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    encoder = torch.randn(1, 7, 32)
    ids = hf_families.tokens(batch=1, length=24)
    report = analyze(m, ids, positions=6, forward_fn=lambda mm, x: mm(x, encoder_hidden_states=encoder))
    assert list(report.layers) == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert set(report.not_measured) == {"transformer.h.0.crossattention", "transformer.h.1.crossattention"}


def test_a_forward_that_does_not_call_the_interface_is_refused_by_name() -> None:
    from ess_train.adapters import register_attention_class
    from ess_train.adapters.registry import ADAPTERS, _key

    class PlainAttention(transformers.models.llama.modeling_llama.LlamaAttention):
        def forward(self, hidden_states, *args, **kwargs):  # attention computed by hand, no interface
            v = self.v_proj(hidden_states)
            weights = torch.ones(v.shape[1], v.shape[1]).tril()
            weights = weights / weights.sum(-1, keepdim=True)
            mixed = weights @ v  # [B, L, kv_heads * head_dim], repeated over the query groups
            return self.o_proj(mixed.repeat(1, 1, self.num_key_value_groups)), None

    m = hf_families.model("smollm3")
    layer = m.model.layers[0]
    plain = PlainAttention(m.config, layer_idx=0)
    layer.self_attn = plain
    register_attention_class(PlainAttention)
    try:
        with pytest.raises(CaptureError, match=r"model\.layers\.0\.self_attn.*did not call"):
            analyze(m, hf_families.tokens(length=16), positions=4)
    finally:
        ADAPTERS.pop(_key(PlainAttention))
