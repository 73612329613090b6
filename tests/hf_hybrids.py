"""Tiny random hybrid causal LMs (Jamba, Bamba, GraniteMoeHybrid, Falcon-H1, Zamba2, LFM2, RecurrentGemma) and
reference operators of their mixers built from the modeling files' own scan inputs (spied kernel calls),
independently of ``ess_train.adapters``.

Each reference is a dense ``T [batch, operators, L, L]`` in float64, written from the kernel's own
arguments (``mamba2_chunk_scan``, ``mamba_selective_scan``, ``causal_conv1d_fn``,
``RecurrentGemmaRglru._rnn_scan``) and checked against what the kernel returned, so that it is the
operator the model computes.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

transformers = __import__("pytest").importorskip("transformers")

VOCAB = 64
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, max_position_embeddings=128)
_ATTN = dict(intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
_M2 = dict(mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=8, mamba_chunk_size=8)


def config(family: str):
    """A tiny config of ``family`` (two to four layers; Mamba2 chunks of 8 tokens)."""
    tf = transformers
    table = {
        "jamba": lambda: tf.JambaConfig(
            **_COMMON,
            **_ATTN,
            num_hidden_layers=2,
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            num_experts=2,
            num_experts_per_tok=1,
            mamba_d_state=8,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_dt_rank=4,
        ),
        "bamba": lambda: tf.BambaConfig(
            **_COMMON, **_ATTN, **_M2, num_hidden_layers=2, attn_layer_indices=[1]
        ),
        "granitemoehybrid": lambda: tf.GraniteMoeHybridConfig(
            **_COMMON,
            **_ATTN,
            **_M2,
            num_hidden_layers=2,
            layer_types=["mamba", "attention"],
            num_local_experts=2,
            num_experts_per_tok=1,
        ),
        "falcon_h1": lambda: tf.FalconH1Config(
            **_COMMON,
            **_ATTN,
            **_M2,
            num_hidden_layers=2,
            mamba_d_ssm=64,
            ssm_multipliers=[0.5, 2.0, 0.7, 1.5, 0.8],
            ssm_in_multiplier=0.6,
        ),
        "falcon_h1_norm": lambda: tf.FalconH1Config(
            **_COMMON,
            **_ATTN,
            **_M2,
            num_hidden_layers=2,
            mamba_d_ssm=64,
            mamba_rms_norm=True,
        ),
        "zamba2": lambda: tf.Zamba2Config(
            **_COMMON,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            mamba_headdim=8,
            n_mamba_heads=8,
            mamba_ngroups=2,
            mamba_d_state=8,
            chunk_size=8,
            layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],
        ),
        "lfm2": lambda: tf.Lfm2Config(
            **_COMMON,
            **_ATTN,
            num_hidden_layers=2,
            layer_types=["conv", "full_attention"],
            conv_L_cache=3,
            conv_bias=True,
        ),
        "recurrent_gemma": lambda: tf.RecurrentGemmaConfig(
            **_COMMON,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            lru_width=32,
            attention_window_size=16,
            conv1d_width=4,
            block_types=["recurrent", "recurrent", "attention"],
        ),
    }
    return table[family]()


#: family -> (modeling module, mixer class, kind)
MIXERS = {
    "jamba": ("jamba", "JambaMambaMixer", "jamba_mamba"),
    "bamba": ("bamba", "BambaMixer", "mamba2"),
    "granitemoehybrid": ("granitemoehybrid", "GraniteMoeHybridMambaLayer", "mamba2"),
    "falcon_h1": ("falcon_h1", "FalconH1Mixer", "mamba2"),
    "falcon_h1_norm": ("falcon_h1", "FalconH1Mixer", "mamba2"),
    "zamba2": ("zamba2", "Zamba2MambaMixer", "mamba2"),
    "lfm2": ("lfm2", "Lfm2ShortConv", "gated_short_conv"),
    "recurrent_gemma": ("recurrent_gemma", "RecurrentGemmaRecurrentBlock", "rg_lru"),
}


def modeling(family: str):
    name = MIXERS[family][0]
    return importlib.import_module(f"transformers.models.{name}.modeling_{name}")


def mixers(m: nn.Module, family: str) -> dict[str, nn.Module]:
    cls = MIXERS[family][1]
    return {n: mod for n, mod in m.named_modules() if type(mod).__name__ == cls}


def model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny random LM of ``family`` in eval mode, its mixers' weights redrawn at unit scale (``D`` at
    0.1): with the models' default init the scan's share of a mixer's output is ~1e-4 of the skip's, and
    an exactness check would not see a wrong operator."""
    torch.manual_seed(seed)
    m = transformers.AutoModelForCausalLM.from_config(config(family)).eval().to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mixer in mixers(m, family).values():
            for name, p in mixer.named_parameters():
                if "norm" in name:
                    continue
                scale = 0.1 if name == "D" else (1.0 / p.shape[-1] ** 0.5 if p.dim() > 1 else 1.0)
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)
    return m


def tokens(batch: int = 2, length: int = 20, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def _causal_decay(logs: Tensor) -> Tensor:
    """``exp(sum_{r=s+1}^{t} logs[..., r])`` for ``s <= t``, 0 above: ``[..., L] -> [..., L, L]``."""
    cum = torch.cumsum(logs, dim=-1)
    diff = cum[..., :, None] - cum[..., None, :]
    L = logs.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool, device=logs.device).tril()
    return torch.where(causal, diff, torch.full_like(diff, -torch.inf)).exp()


def _rel(got: Tensor, ref: Tensor) -> float:
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


#: the kernels' positional parameters (the hub wrappers hide their signatures)
_PARAMS = {
    "mamba2_chunk_scan": ("hidden_states", "dt", "A", "B", "C", "chunk_size", "D", "dt_bias"),
    "mamba_selective_scan": ("hidden_states", "dt", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus"),
    "causal_conv1d_fn": ("hidden_states", "weight", "bias"),
}


def _mamba2_reference(kw: dict, out: Tensor) -> Tensor:
    x, dt, A, B, C = (kw[k].double() for k in ("hidden_states", "dt", "A", "B", "C"))
    if kw.get("dt_bias") is not None:
        dt = dt + kw["dt_bias"].double()
    if kw.get("dt_softplus"):
        dt = F.softplus(dt)
    lo, hi = kw.get("dt_limit", (0.0, float("inf")))
    dt = dt.clamp(lo, hi)  # [B, L, H]
    H, G = x.shape[2], B.shape[2]
    B, C = (y.repeat_interleave(H // G, dim=2) for y in (B, C))  # [B, L, H, N]
    decay = _causal_decay((A * dt).transpose(1, 2))  # [B, H, L, L]
    T = torch.einsum("bthn,bshn->bhts", C, B) * dt.transpose(1, 2)[:, :, None, :] * decay
    y = torch.einsum("bhts,bshp->bthp", T, x) + kw["D"].double()[:, None] * x
    assert _rel(y, out) < 1e-5, "the reference does not reproduce mamba2_chunk_scan"
    return T


def _mamba_reference(kw: dict, out: Tensor) -> Tensor:
    u, dt, A, B, C = (kw[k].double() for k in ("hidden_states", "dt", "A", "B", "C"))  # B, C [b, N, L]
    dt = F.softplus(dt + kw["delta_bias"].double()[:, None])  # [b, D, L]
    cum = torch.cumsum(dt[..., None] * A[None, :, None, :], dim=2)  # [b, D, L, N]
    diff = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # [b, D, t, s, N]
    L = u.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()[None, None, :, :, None]
    decay = torch.where(causal, diff, torch.full_like(diff, -torch.inf)).exp()
    T = torch.einsum("bnt,bdtsn,bns->bdts", C, decay, B) * dt[:, :, None, :]
    y = (torch.einsum("bdts,bds->bdt", T, u) + kw["D"].double()[:, None] * u) * F.silu(kw["z"].double())
    assert _rel(y, out) < 1e-5, "the reference does not reproduce mamba_selective_scan"
    return T


def _gated_conv_reference(Bg: Tensor, Cg: Tensor, weight: Tensor) -> Tensor:
    """``T[b, d, t, s] = C[b, d, t] w[d, k - 1 - (t - s)] B[b, d, s]`` for ``0 <= t - s < k``."""
    L, k = Bg.shape[-1], weight.shape[-1]
    lag = torch.arange(L)[:, None] - torch.arange(L)[None, :]
    band = weight.double()[:, (k - 1 - lag).clamp(0, k - 1)] * ((lag >= 0) & (lag < k))  # [D, L, L]
    return Cg.double()[..., :, None] * band * Bg.double()[..., None, :]


@contextlib.contextmanager
def reference_operators(m: nn.Module, family: str) -> Iterator[dict[str, Tensor]]:
    """While open, each mixer call of ``m`` puts its reference ``T`` (float64) under the mixer's name."""
    refs: dict[str, Tensor] = {}
    current: list[str] = []
    mod = modeling(family)
    kind = MIXERS[family][2]
    handles = []
    with contextlib.ExitStack() as stack:
        for name, mixer in mixers(m, family).items():
            handles.append(mixer.register_forward_pre_hook(lambda *_, n=name: current.append(n)))
            if kind == "gated_short_conv":
                handles.append(mixer.in_proj.register_forward_hook(_stash(refs, name, "BCx")))
            if kind == "rg_lru":
                handles.append(mixer.conv_1d.register_forward_pre_hook(_stash_in(refs, name, "v")))
                handles.append(mixer.rg_lru.register_forward_pre_hook(_stash_in(refs, name, "w")))
                stack.enter_context(_spied_scan(mixer, refs, name))
        if kind in ("mamba2", "jamba_mamba", "gated_short_conv"):
            fn = {"mamba2": "mamba2_chunk_scan", "jamba_mamba": "mamba_selective_scan"}.get(
                kind, "causal_conv1d_fn"
            )
            original = getattr(mod, fn)
            params = _PARAMS[fn]

            def spy(*args, **kwargs):
                out = original(*args, **kwargs)
                bound = {**dict(zip(params, args)), **kwargs}
                name = current[-1]
                if kind == "mamba2":
                    refs[name] = _mamba2_reference(bound, out)
                elif kind == "jamba_mamba":
                    refs[name] = _mamba_reference(bound, out)
                else:
                    Bg, Cg, x = refs.pop(f"{name}.BCx").transpose(1, 2).chunk(3, dim=1)
                    T = _gated_conv_reference(Bg, Cg, bound["weight"])
                    bias = bound["bias"]
                    y = torch.einsum("bdts,bds->bdt", T, x.double())
                    assert _rel(y, Cg * (out - bias[:, None])) < 1e-5, "reference is not the LFM2 conv"
                    refs[name] = T
                return out

            stack.enter_context(_swapped(mod, fn, spy))
        try:
            yield refs
        finally:
            for h in handles:
                h.remove()


def _stash(refs: dict, name: str, key: str):
    return lambda module, args, out: refs.__setitem__(f"{name}.{key}", out.detach())


def _stash_in(refs: dict, name: str, key: str):
    return lambda module, args: refs.__setitem__(f"{name}.{key}", args[0].detach())


@contextlib.contextmanager
def _swapped(obj, attr: str, value) -> Iterator[None]:
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


@contextlib.contextmanager
def _spied_scan(block: nn.Module, refs: dict, name: str) -> Iterator[None]:
    """RecurrentGemma: ``T = T_lru diag(g) T_conv`` from ``_rnn_scan``'s inputs, the conv's input ``v``, the
    RG-LRU's input ``w`` (``g = normalized_x / w``) and the conv's weights."""
    lru = block.rg_lru
    original = lru._rnn_scan

    def spy(hidden_states, recurrent_gate, reset, recurrent_states=None, **kw):
        out = original(hidden_states, recurrent_gate, reset, recurrent_states, **kw)
        v, w = refs.pop(f"{name}.v").double(), refs.pop(f"{name}.w").double()  # [B, D, L], [B, L, D]
        a = (recurrent_gate * ~reset).double().transpose(1, 2)  # [B, D, L]
        logs = torch.log(a.clamp_min(1e-300))
        logs[..., 0] = 0.0  # a_0 multiplies the (absent) state before position 0 only
        T_lru = _causal_decay(logs)
        g = (hidden_states.double() / w).transpose(1, 2)
        k = block.conv_1d.kernel_size[0]
        T_conv = _gated_conv_reference(torch.ones_like(v), torch.ones_like(v), block.conv_1d.weight[:, 0, :])
        T = (T_lru * g[..., None, :]) @ T_conv  # T_lru diag(g) T_conv
        bias = block.conv_1d.bias.double()[None, :, None] * g
        y = torch.einsum("bdts,bds->bdt", T, v) + torch.einsum("bdts,bds->bdt", T_lru, bias)
        assert k == block.conv1d_width and _rel(y, out[0].transpose(1, 2)) < 1e-5, (
            "reference is not the RG-LRU"
        )
        refs[name] = T
        return out

    lru._rnn_scan = spy
    try:
        yield
    finally:
        del lru._rnn_scan
