"""Which layers of a model ESS is measured on: protocol layers and adapted layers of other libraries."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from ess_train.adapters import adapt
from ess_train.models.protocol import find_ess_layers

__all__ = ["find_layers"]


def find_layers(
    model: nn.Module, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None
) -> dict[str, Any]:
    """Every measurable layer of ``model`` by qualified name: modules implementing the protocol and, for
    unmodified Hugging Face layers of a known class, their adapters (``ess_train.adapters``).

    ``include``/``exclude``: ``fnmatch`` patterns on the names (``"model.layers.*.self_attn"``). The
    callbacks, :func:`ess_train.analyze` and the HF Trainer callback all find layers here.
    """
    return find_ess_layers(model, include=include, exclude=exclude, adapt=adapt)
