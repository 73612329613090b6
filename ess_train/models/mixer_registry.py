"""Mixers by name: ``build_mixer("mamba", d_model=64)``.

Names and aliases: :data:`ess_train.models.mixers.MIXER_PATHS` / ``MIXER_ALIASES``; modules are imported
on first use. Unknown names raise ``ValueError`` listing the valid ones; unknown keyword arguments raise
``ValueError`` naming the key (:func:`ess_train.checks.check_keywords`). :func:`register_mixer` adds user
mixers (a class or ``"module:Class"``). ``build_model`` (a ``SequenceModel`` from keyword arguments) lives
in :mod:`ess_train.models.backbone`, which imports this module (never the other way round).
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from ess_train.checks import accepted_keywords, check_keywords
from ess_train.models.mixers import MIXER_ALIASES, MIXER_PATHS

__all__ = [
    "mixer_names",
    "resolve_mixer_name",
    "get_mixer_class",
    "mixer_parameters",
    "check_mixer_kwargs",
    "register_mixer",
    "build_mixer",
]

_REGISTRY: dict[str, str | type[nn.Module]] = dict(MIXER_PATHS)
_ALIASES: dict[str, str] = dict(MIXER_ALIASES)


def mixer_names(include_aliases: bool = False) -> list[str]:
    """Registered mixer names (and aliases when asked)."""
    return list(_REGISTRY) + (list(_ALIASES) if include_aliases else [])


def resolve_mixer_name(name: str) -> str:
    """Canonical registry name of ``name`` (an alias or a name); ``ValueError`` listing the valid names."""
    if not isinstance(name, str):
        raise ValueError(f"mixer name must be a string, got {name!r}")
    canon = _ALIASES.get(name, name)
    if canon not in _REGISTRY:
        aliases = ", ".join(f"{a}->{n}" for a, n in _ALIASES.items())
        raise ValueError(f"unknown mixer {name!r}; valid names: {', '.join(_REGISTRY)} (aliases: {aliases})")
    return canon


def get_mixer_class(name: str) -> type[nn.Module]:
    """The class registered under ``name`` (imports its module on first use)."""
    canon = resolve_mixer_name(name)
    entry = _REGISTRY[canon]
    if isinstance(entry, str):
        module, _, cls_name = entry.partition(":")
        try:
            cls = getattr(importlib.import_module(module), cls_name)
        except (ImportError, AttributeError) as e:
            raise ImportError(
                f"mixer {canon!r} is registered as {entry!r} but could not be imported: {e}"
            ) from e
        _REGISTRY[canon] = cls
        return cls
    return entry


def mixer_parameters(name: str) -> tuple[set[str], bool]:
    """Keyword arguments the mixer's constructor accepts, and whether it takes ``**kwargs``."""
    names, var_kw = accepted_keywords(get_mixer_class(name))
    return set(names), var_kw


def register_mixer(name: str, cls: str | type[nn.Module], *, overwrite: bool = False) -> None:
    """Register a mixer class (or ``"module:Class"``) under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not overwrite and (name in _REGISTRY or name in _ALIASES):
        raise ValueError(f"mixer {name!r} is already registered (pass overwrite=True to replace it)")
    if isinstance(cls, str) and ":" not in cls:
        raise ValueError(f"cls must be a class or 'module:Class', got {cls!r}")
    _ALIASES.pop(name, None)
    _REGISTRY[name] = cls


def check_mixer_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """``ValueError`` naming any key the mixer ``name`` does not accept."""
    check_keywords(kwargs, get_mixer_class(name), where=f"for mixer {resolve_mixer_name(name)!r}")


def build_mixer(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate the mixer ``name`` with ``kwargs`` (``d_model`` among them)."""
    check_mixer_kwargs(name, kwargs)
    return get_mixer_class(name)(**kwargs)
