"""Exact ESS of models people already have: adapters for unmodified Hugging Face layers.

Each adapted module class gets an :class:`~ess_train.adapters.base.AdaptedLayer` that captures the layer's
exact operator without touching the model's code (see ``docs/ADAPTERS.md``):

- softmax attention (Llama, Mistral with sliding windows, GPT-2, Qwen2, Qwen3) through transformers'
  attention-function and mask interfaces (:mod:`~ess_train.adapters.hf_attention`);
- Mamba, FalconMamba and Jamba's mixer (:mod:`~ess_train.adapters.hf_mamba`), Mamba2 and its copies in
  Bamba, GraniteMoeHybrid, Zamba2 and Falcon-H1 (:mod:`~ess_train.adapters.hf_mamba2`), LFM2's gated short
  convolution (:mod:`~ess_train.adapters.hf_lfm2`) and RecurrentGemma's conv + RG-LRU block
  (:mod:`~ess_train.adapters.hf_recurrent_gemma`), rebuilt from the mixer's parameters by a forward pre-hook;
- Qwen3-Next's GatedDeltaNet (:mod:`~ess_train.adapters.hf_gated_deltanet`), its torch kernel call recorded;
- flash-linear-attention 0.6's ``GatedLinearAttention``, ``DeltaNet`` and ``GatedDeltaNet``
  (:mod:`~ess_train.adapters.fla_layers`), their kernel calls recorded.

``find_ess_layers`` and ``capture_operators`` (``ess_train.models.protocol``) use them by themselves, so
ESSMonitor and ESSRegularizer measure these layers with no change to user code. This package imports torch,
the engine and the protocol only; transformers is imported when an adapted layer is first captured.
"""

from ess_train.adapters.base import (
    AdaptedLayer,
    CaptureError,
    ExactnessError,
    check_exact,
    exactness_tolerance,
    max_relative_error,
)
from ess_train.adapters.fla_layers import TESTED_FLA, FLAAdapter, require_fla
from ess_train.adapters.registry import (
    ADAPTERS,
    MIN_TRANSFORMERS,
    TESTED_TRANSFORMERS,
    adapt,
    register_attention_class,
    require_transformers,
)

__all__ = [
    "ADAPTERS",
    "AdaptedLayer",
    "CaptureError",
    "ExactnessError",
    "FLAAdapter",
    "MIN_TRANSFORMERS",
    "TESTED_FLA",
    "TESTED_TRANSFORMERS",
    "adapt",
    "check_exact",
    "exactness_tolerance",
    "max_relative_error",
    "register_attention_class",
    "require_fla",
    "require_transformers",
]
