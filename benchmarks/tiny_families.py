"""Tiny random configs of the attention families measured by mechanism (nothing downloaded): the families of
tests/adapters/test_adapters_attention_families.py and of ``bench_families.py``.

Each family's config has 2 layers, hidden 32, 4 query heads (2 KV heads where the family has grouped
queries) and the family's own attention variant (sliding windows, softcapping, partial rotary, ALiBi, QK
norms, parallel blocks); ``model(family)`` redraws the projection weights larger than the default init so
that attention is peaked (near-uniform attention would make the exactness checks weak).
"""

from __future__ import annotations

import torch
import transformers

VOCAB = 64
WINDOW = 8  # the sliding window of the windowed families (tokens a query sees, itself included)
TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _attn(**extra):
    return dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **TOKENS,
        **extra,
    )


def _configs():
    tf = transformers
    return {
        "gemma": lambda: tf.GemmaConfig(**_attn(head_dim=8)),
        "gemma2": lambda: tf.Gemma2Config(
            **_attn(
                head_dim=8, sliding_window=WINDOW, attn_logit_softcapping=20.0, final_logit_softcapping=None
            )
        ),
        "gemma3": lambda: tf.Gemma3TextConfig(
            **_attn(head_dim=8, sliding_window=WINDOW, sliding_window_pattern=2)
        ),
        "phi": lambda: tf.PhiConfig(**_attn(partial_rotary_factor=0.5)),
        "phi3": lambda: tf.Phi3Config(**_attn()),
        "mixtral": lambda: tf.MixtralConfig(**_attn(num_local_experts=2, num_experts_per_tok=1)),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(
            **_attn(
                num_experts=2,
                num_experts_per_tok=1,
                moe_intermediate_size=32,
                shared_expert_intermediate_size=32,
                use_sliding_window=True,
                sliding_window=WINDOW,
                layer_types=["sliding_attention", "full_attention"],
            )
        ),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(
            **_attn(head_dim=8, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32)
        ),
        "gpt_neox": lambda: tf.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            rotary_pct=0.5,
            **TOKENS,
        ),
        "gptj": lambda: tf.GPTJConfig(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256, rotary_dim=4, **TOKENS
        ),
        "opt": lambda: tf.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=32,
            **TOKENS,
        ),
        "bloom": lambda: tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, **TOKENS),
        "falcon": lambda: tf.FalconConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
            max_position_embeddings=256,
            **TOKENS,
        ),
        "starcoder2": lambda: tf.Starcoder2Config(**_attn(sliding_window=WINDOW)),
        "olmo2": lambda: tf.Olmo2Config(**_attn()),
        "cohere": lambda: tf.CohereConfig(**_attn()),
        "granite": lambda: tf.GraniteConfig(**_attn(attention_multiplier=0.2)),
        "stablelm": lambda: tf.StableLmConfig(**_attn(partial_rotary_factor=0.25)),
        "smollm3": lambda: tf.SmolLM3Config(**_attn()),
    }


FAMILIES = sorted(_configs())
#: the families whose config asks for a sliding window on (some of) their layers
WINDOWED = {"gemma2", "gemma3", "qwen2_moe", "starcoder2"}


def config(family: str, max_len: int | None = None):
    """The family's tiny config; ``max_len``: the longest sequence it allows (default 256)."""
    cfg = _configs()[family]()
    if max_len is not None:
        for key in ("max_position_embeddings", "n_positions"):
            if hasattr(cfg, key):
                setattr(cfg, key, max_len)
    return cfg


def model(
    family: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    implementation: str = "sdpa",
    max_len: int | None = None,
):
    """The family's tiny causal LM in eval mode, with peaked attention (projections redrawn at 3x the
    default scale, seeded); ``implementation``: the attention the model runs outside a capture (families
    without sdpa fall back to eager)."""
    torch.manual_seed(seed)
    cfg = config(family, max_len)
    try:
        m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=implementation)
    except ValueError:  # (Gemma 2, BLOOM: no sdpa path in this transformers)
        m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2 and "embed" not in name and "wte" not in name and "lm_head" not in name:
                p.normal_(0.0, 3.0 / p.shape[1] ** 0.5)
    return m.to(dtype).eval()


def tokens(batch: int = 2, length: int = 40, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)
