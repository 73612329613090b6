"""The mixer zoo: one :class:`~ess_train.models.protocol.ESSMixer` per module, imported lazily.

``MIXER_PATHS`` maps each registry name to ``"module:Class"``; ``MIXER_ALIASES`` maps short names to
registry names. Classes are importable from here by name (``from ess_train.models.mixers import Mamba``),
which imports only the module that defines them. Build mixers by name with
:func:`ess_train.models.mixer_registry.build_mixer`. The mixers' kernels (chunked scans, custom autograd)
live in :mod:`ess_train.models.ops`; the initializations shared by Mamba and S4D in :mod:`.ssm_init`.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["MIXER_PATHS", "MIXER_ALIASES", "CLASS_MODULES"]

_PKG = "ess_train.models.mixers"

MIXER_PATHS: dict[str, str] = {
    "attention": f"{_PKG}.attention:SoftmaxAttention",
    "sliding_window_attention": f"{_PKG}.sliding_window_attention:SlidingWindowAttention",
    "linear_attention": f"{_PKG}.linear_attention:LinearAttention",
    "decayed_linear_attention": f"{_PKG}.decayed_linear_attention:DecayedLinearAttention",
    "gla": f"{_PKG}.gla:GatedLinearAttention",
    "deltanet": f"{_PKG}.deltanet:DeltaNet",
    "mamba": f"{_PKG}.mamba:Mamba",
    "s4d": f"{_PKG}.s4d:S4D",
    "short_conv": f"{_PKG}.short_conv:ShortConv",
    "hyena": f"{_PKG}.hyena:Hyena",
}

MIXER_ALIASES: dict[str, str] = {
    "softmax_attention": "attention",
    "swa": "sliding_window_attention",
    "wla": "decayed_linear_attention",
    "retnet": "decayed_linear_attention",
    "s6": "mamba",
}

# class name -> module, for ``from ess_train.models.mixers import <Class>``
CLASS_MODULES: dict[str, str] = {path.split(":")[1]: path.split(":")[0] for path in MIXER_PATHS.values()}


def __getattr__(name: str) -> Any:
    module = CLASS_MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *CLASS_MODULES])
