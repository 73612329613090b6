"""Models: the operator protocol, the mixer zoo (``mixers/``), the backbone and the name registry."""

from ess_train.models.backbone import SequenceModel, build_model
from ess_train.models.mixer_registry import build_mixer, get_mixer_class, mixer_names, register_mixer
from ess_train.models.protocol import (
    ESSMixer,
    OperatorView,
    StateSize,
    SupportsESS,
    capture_operators,
    find_ess_layers,
    operators_of,
)

__all__ = [
    "SequenceModel",
    "build_mixer",
    "build_model",
    "get_mixer_class",
    "mixer_names",
    "register_mixer",
    "OperatorView",
    "StateSize",
    "SupportsESS",
    "ESSMixer",
    "find_ess_layers",
    "capture_operators",
    "operators_of",
]
