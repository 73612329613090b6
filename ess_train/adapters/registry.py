"""Which modules are adapted, and the transformers versions supported.

Attention by mechanism: a transformers module that dispatches through the attention interface
(:func:`~ess_train.adapters.hf_attention.routes_through_interface`) is adapted whatever its class, and
the capture confirms it (a forward that did not call the interface, or an operator that does not
reproduce the layer's output, is refused by name). Every other mixer by its exact class
(``type(module).__module__`` and ``__qualname__``, :data:`ADAPTERS`): a subclass or a look-alike
(FalconMamba's mixer has Mamba's parameter names plus norms) never inherits an adapter, and a class not
listed is never guessed (where it mixes along time, ``analyze`` lists it as not measured: found by
:mod:`ess_train.analysis.mixing_probe`, not by its name). Nothing here imports transformers: a module of a
transformers class can only exist once transformers is imported.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from ess_train.adapters.base import AdaptedLayer, CaptureError
from ess_train.adapters.fla_layers import FLA_LAYERS, FLAAdapter
from ess_train.adapters.hf_attention import HFAttentionAdapter, routes_through_interface
from ess_train.adapters.hf_bloom import BloomAttentionAdapter
from ess_train.adapters.hf_gated_deltanet import GatedDeltaNetAdapter
from ess_train.adapters.hf_lfm2 import Lfm2ShortConvAdapter
from ess_train.adapters.hf_mamba import FalconMambaAdapter, JambaMambaAdapter, MambaAdapter
from ess_train.adapters.hf_mamba2 import FalconH1MixerAdapter, Mamba2Adapter
from ess_train.adapters.hf_recurrent_gemma import RecurrentGemmaBlockAdapter

__all__ = [
    "MIN_TRANSFORMERS",
    "TESTED_TRANSFORMERS",
    "ADAPTERS",
    "adapt",
    "register_attention_class",
    "require_transformers",
]

#: oldest transformers accepted (the attention and mask interfaces and the 5.x mixer signatures)
MIN_TRANSFORMERS = (5, 24)
#: versions the adapters' tests ran on
TESTED_TRANSFORMERS = ("5.24.0", "5.25.0")


_HF = "transformers.models"
#: "module.qualname" -> factory(module, check) -> AdaptedLayer
ADAPTERS: dict[str, Callable[[nn.Module, bool], AdaptedLayer]] = {
    # an attention that computes its own softmax (ALiBi) instead of calling the interface
    f"{_HF}.bloom.modeling_bloom.BloomAttention": lambda m, check: BloomAttentionAdapter(m, check),
    f"{_HF}.mamba.modeling_mamba.MambaMixer": lambda m, check: MambaAdapter(m, check),
    f"{_HF}.falcon_mamba.modeling_falcon_mamba.FalconMambaMixer": lambda m, check: FalconMambaAdapter(
        m, check
    ),
    f"{_HF}.mamba2.modeling_mamba2.Mamba2Mixer": lambda m, check: Mamba2Adapter(m, check),
    # the hybrids' own mixers (their attention layers are found by mechanism, as every attention)
    f"{_HF}.jamba.modeling_jamba.JambaMambaMixer": lambda m, check: JambaMambaAdapter(m, check),
    f"{_HF}.bamba.modeling_bamba.BambaMixer": lambda m, check: Mamba2Adapter(m, check),
    f"{_HF}.granitemoehybrid.modeling_granitemoehybrid.GraniteMoeHybridMambaLayer": lambda m, check: (
        Mamba2Adapter(m, check)
    ),
    f"{_HF}.zamba2.modeling_zamba2.Zamba2MambaMixer": lambda m, check: Mamba2Adapter(m, check),
    f"{_HF}.falcon_h1.modeling_falcon_h1.FalconH1Mixer": lambda m, check: FalconH1MixerAdapter(m, check),
    f"{_HF}.lfm2.modeling_lfm2.Lfm2ShortConv": lambda m, check: Lfm2ShortConvAdapter(m, check),
    f"{_HF}.recurrent_gemma.modeling_recurrent_gemma.RecurrentGemmaRecurrentBlock": lambda m, check: (
        RecurrentGemmaBlockAdapter(m, check)
    ),
    f"{_HF}.qwen3_next.modeling_qwen3_next.Qwen3NextGatedDeltaNet": lambda m, check: GatedDeltaNetAdapter(
        m, check
    ),
}

# flash-linear-attention 0.6 layers: their kernel calls recorded (fla is imported once such a module exists)
for _fla_class in FLA_LAYERS:
    ADAPTERS[_fla_class] = FLAAdapter

_typed: dict[tuple[type, str], type] = {}


def _key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_attention_class(cls: type) -> None:
    """Adapt an attention class that calls transformers' attention interface but is not found by
    :func:`~ess_train.adapters.hf_attention.routes_through_interface` (its forward names the interface
    elsewhere); the capture-time routing check and the exactness check at first capture still guard it."""
    ADAPTERS[_key(cls)] = HFAttentionAdapter


def require_transformers() -> str:
    """transformers' version, after refusing a missing or too old one with a clear message."""
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            "ESS of Hugging Face models needs transformers: pip install 'ess_train[hf]'"
        ) from exc
    version = transformers.__version__
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    if parts < MIN_TRANSFORMERS:
        need = ".".join(map(str, MIN_TRANSFORMERS))
        raise ImportError(
            f"transformers {version} is too old for ess_train's adapters (need >= {need}, tested "
            f"{', '.join(TESTED_TRANSFORMERS)}): pip install 'transformers>={need},<6'"
        )
    return version


def adapt(module: nn.Module, check: bool = True) -> AdaptedLayer | None:
    """The adapter of ``module``: by mechanism for attention, by exact class otherwise; ``None`` when
    neither applies (or the instance is not causal self-attention: GPT-2's cross-attention).

    The returned object's type is named after the module's class (``LlamaAttention``), so that reports
    and ESSMonitor's layer kinds show the model's own class names.
    """
    cls = type(module)
    factory = ADAPTERS.get(_key(cls))
    if factory is None and routes_through_interface(cls):
        factory = HFAttentionAdapter
    if factory is None:
        return None
    if cls.__module__.startswith("transformers."):
        require_transformers()
    try:
        adapter = factory(module, check)
    except CaptureError:  # e.g. GPT-2 cross-attention: not a causal operator, so not measured
        return None
    typed = _typed.get((type(adapter), cls.__name__))
    if typed is None:
        typed = _typed[(type(adapter), cls.__name__)] = type(cls.__name__, (type(adapter),), {})
    adapter.__class__ = typed
    return adapter
