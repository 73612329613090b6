"""The operator protocol: how a layer hands its causal operator ``T(x)`` to the ESS engine.

Any ``nn.Module`` takes part by implementing two methods:

- ``operator(x) -> OperatorView``: from the layer's input ``x`` (``[batch, L, d_model]``), the
  operator ``op`` (an ``ess_train.ess`` operator with leading dims ``[batch, heads or channels]``),
  the stream ``u`` it acts on and ``y = op.apply(u)`` as the layer computes it;
- ``state_size(seq_len) -> StateSize``: the layer's theoretical state size (TSS) and how its
  per-operator ESS adds up to the layer's total.

Zoo mixers subclass :class:`ESSMixer`, whose ``forward`` goes through ``operator`` so that the
view built for the forward pass can be captured with no extra computation (see
:func:`capture_operators`). A user layer that only implements the two methods is captured by a
forward pre-hook that calls ``operator`` on the layer's input.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from ess_train.ess import DenseOperator, RecurrentOperator

__all__ = [
    "OperatorView",
    "StateSize",
    "SupportsESS",
    "ESSMixer",
    "find_ess_layers",
    "capture_operators",
    "operators_of",
]


@dataclass
class OperatorView:
    """What a layer's operator does on one input.

    Attributes:
        op: ``DenseOperator`` or ``RecurrentOperator`` with batch shape ``[batch, G]`` (G heads or channels).
        u: the stream ``op`` acts on, ``[batch, G, L]`` or ``[batch, G, L, P]``.
        y: ``op.apply(u)`` as the layer's fast forward computes it (same shape as ``u``).
        extras: anything the layer's readout needs besides ``y`` (output gates, skip inputs).
    """

    op: DenseOperator | RecurrentOperator
    u: Tensor
    y: Tensor
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StateSize:
    """Theoretical state size of a layer.

    Attributes:
        total: the layer's total TSS (numbers its recurrence carries between steps), e.g. Mamba
            ``d_inner * N``, GLA ``heads * d_k * d_v``, attention ``2 * L * d_model`` (KV cache).
        per_operator: the bound on ``rank(H_i)`` of one operator (what ESS of one operator is compared to).
        multiplicity: how many value channels share one operator: the layer's total ESS is
            ``multiplicity * sum over operators of ESS``.
    """

    total: int
    per_operator: int
    multiplicity: int = 1


@runtime_checkable
class SupportsESS(Protocol):
    """Structural type of a layer that takes part in ESS monitoring."""

    def operator(self, x: Tensor) -> OperatorView: ...

    def state_size(self, seq_len: int) -> StateSize: ...


class ESSMixer(nn.Module):
    """Base class of zoo mixers: ``forward(x) = readout(operator(x), x)``.

    Subclasses implement ``operator``, ``readout`` and ``state_size``. Because the forward pass goes
    through ``operator``, :func:`capture_operators` records the very view (and autograd graph) the
    forward used.
    """

    def __init__(self) -> None:
        super().__init__()
        self._capture_sinks: list[dict[str, OperatorView]] = []
        self._capture_name: str = ""

    def operator(self, x: Tensor) -> OperatorView:  # pragma: no cover - abstract
        raise NotImplementedError

    def readout(self, view: OperatorView, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_size(self, seq_len: int) -> StateSize:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        view = self.operator(x)
        for sink in self._capture_sinks:
            sink[self._capture_name] = view
        return self.readout(view, x)


def _supports_ess(module: nn.Module) -> bool:
    return callable(getattr(module, "operator", None)) and callable(getattr(module, "state_size", None))


def find_ess_layers(
    model: nn.Module,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
) -> dict[str, nn.Module]:
    """Every sub-module implementing the protocol, keyed by qualified name.

    ``include``/``exclude`` are ``fnmatch`` patterns on the names (``"blocks.*.mixer"``). A layer nested
    inside another supported layer is skipped (the outer one owns its operator).
    """
    include = list(include) if include else None
    exclude = list(exclude or [])
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not _supports_ess(module):
            continue
        if any(name.startswith(p + ".") for p in found if p):
            continue
        if include is not None and not any(fnmatch.fnmatchcase(name, pat) for pat in include):
            continue
        if any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
            continue
        found[name] = module
    return found


@contextlib.contextmanager
def capture_operators(layers: dict[str, nn.Module]) -> Iterator[dict[str, OperatorView]]:
    """Record each layer's :class:`OperatorView` during the forward passes run inside the block.

    Zoo mixers (:class:`ESSMixer`) hand over the view their forward built; other protocol layers are
    captured by a forward pre-hook that calls ``layer.operator(input)``. Gradients flow through the
    captured views when the forward runs with grad enabled. The last forward wins for each layer.
    """
    sink: dict[str, OperatorView] = {}
    handles = []
    try:
        for name, layer in layers.items():
            if isinstance(layer, ESSMixer):
                layer._capture_name = name
                layer._capture_sinks.append(sink)
            else:

                def hook(module: nn.Module, args: tuple, _name: str = name) -> None:
                    sink[_name] = module.operator(args[0])

                handles.append(layer.register_forward_pre_hook(hook))
        yield sink
    finally:
        for handle in handles:
            handle.remove()
        for layer in layers.values():
            if isinstance(layer, ESSMixer):
                layer._capture_sinks[:] = [s for s in layer._capture_sinks if s is not sink]


def operators_of(model: nn.Module, x: Tensor, **find_kwargs: Any) -> dict[str, OperatorView]:
    """Run ``model(x)`` once and return every supported layer's operator view."""
    layers = find_ess_layers(model, **find_kwargs)
    with capture_operators(layers) as views:
        model(x)
    return dict(views)
