"""Grouped-query attention: a KV head's state is counted once in the layer's total ESS (the mean over the
query heads that read it), so the total never exceeds the TSS and the utilization stays in [0, 1]
(issue 22: 16 query heads on 1 KV head reported a total ESS above the TSS)."""

from __future__ import annotations

import pytest
import torch

from ess_train import analyze
from tests import hf_models

transformers = pytest.importorskip("transformers")


def _peaked(m, gain: float):
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(gain)
    return m


@pytest.mark.parametrize(("heads", "kv_heads"), [(16, 1), (4, 2), (4, 4)])
@pytest.mark.parametrize("gain", [1.0, 8.0])  # near-uniform (the default init) and peaked attention
def test_total_ess_never_exceeds_tss(heads: int, kv_heads: int, gain: float) -> None:
    m = hf_models.model(
        "llama",
        hidden_size=64,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
    )
    report = analyze(_peaked(m, gain), hf_models.tokens(batch=1, length=96), positions=None)
    for layer in report.layers.values():
        head_dim = layer.multiplicity
        assert layer.operators == heads and layer.tss == 2 * 96 * kv_heads * head_dim
        assert 0 < layer.total_ess <= layer.tss, layer.name
        assert 0 <= layer.utilization <= 1, layer.name
        # the total is the layer's mean ESS per operator, once per KV head and value channel
        mean_ess = sum(layer.entropy_ess) / len(layer.entropy_ess)
        assert layer.total_ess == pytest.approx(head_dim * kv_heads * mean_ess, rel=1e-5)
