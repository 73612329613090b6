"""Tiny random Hugging Face models built from config objects (nothing downloaded), for the adapter tests."""

from __future__ import annotations

import torch

transformers = __import__("pytest").importorskip("transformers")

VOCAB = 64


def config(family: str, layers: int = 2, **overrides):
    """A tiny config of ``family`` (llama, llama_mha, mistral, gpt2, qwen2, qwen3, mamba, falcon_mamba,
    mamba2, qwen3_next); ``overrides`` go to the config's constructor."""
    tf = transformers
    attn = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    table = {
        "llama": lambda: tf.LlamaConfig(**attn),
        "llama_mha": lambda: tf.LlamaConfig(**{**attn, "num_key_value_heads": 4}),
        "mistral": lambda: tf.MistralConfig(**attn, sliding_window=8),
        "gpt2": lambda: tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=layers,
            n_head=4,
            n_positions=128,
            bos_token_id=0,
            eos_token_id=0,
        ),
        "qwen2": lambda: tf.Qwen2Config(**attn),
        "qwen3": lambda: tf.Qwen3Config(**attn, head_dim=8),
        "mamba": lambda: tf.MambaConfig(
            vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=layers
        ),
        "falcon_mamba": lambda: tf.FalconMambaConfig(
            vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=layers
        ),
        "mamba2": lambda: tf.Mamba2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            state_size=8,
            num_hidden_layers=layers,
            num_heads=8,
            head_dim=8,
            n_groups=2,
            chunk_size=16,
        ),
        "qwen3_next": lambda: tf.Qwen3NextConfig(
            **attn,
            head_dim=8,
            linear_num_value_heads=4,
            linear_num_key_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            linear_conv_kernel_dim=4,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            layer_types=["linear_attention", "full_attention"] * (layers // 2)
            + ["linear_attention"] * (layers % 2),
        ),
    }
    cfg = table[family]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def model(family: str, seed: int = 0, **kwargs):
    """A tiny random causal LM of ``family`` in eval mode."""
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config(family, **kwargs)).eval()


def tokens(batch: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)
