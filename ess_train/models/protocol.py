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
forward pre-hook that calls ``operator`` on the layer's input (positional or keyword).

Unmodified layers of other libraries (Hugging Face attention, Mamba, Mamba2, Qwen3-Next's GatedDeltaNet)
take part through stand-ins (``ess_train.adapters``, above this module) that :func:`find_ess_layers` is
given (``adapt=``): they play the protocol's part (``state_size``) and capture themselves
(``capture(sink, name)``, which :func:`capture_operators` calls).
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterable, Iterator, MutableMapping
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
    "call_site",
    "layer_name",
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
        states: how many states the operators share, where fewer than the operators (grouped-query
            attention: the KV heads, each read by a group of query heads); the total ESS then counts each
            shared state once, as the mean ESS of the operators that read it:
            ``multiplicity * states * mean over operators of ESS`` (so total ESS <= TSS; docs/ESS.md).
            ``None``: one state per operator.
    """

    total: int
    per_operator: int
    multiplicity: int = 1
    states: int | None = None


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
    adapt: Callable[[nn.Module], Any] | None = None,
) -> dict[str, Any]:
    """Every sub-module implementing the protocol, keyed by qualified name.

    ``adapt``: for a module that does not implement the protocol, its stand-in or ``None``
    (:func:`ess_train.adapters.adapt`, which :func:`ess_train.measure.find_layers` passes, gives the
    adapters of unmodified Hugging Face layers: they play the protocol's part and capture themselves).
    ``include``/``exclude`` are ``fnmatch`` patterns on the names (``"blocks.*.mixer"``). A layer nested
    inside another supported layer is skipped (the outer one owns its operator).
    """
    include = list(include) if include else None
    exclude = list(exclude or [])
    found: dict[str, Any] = {}
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in found if p):
            continue
        if include is not None and not any(fnmatch.fnmatchcase(name, pat) for pat in include):
            continue
        if any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
            continue
        if _supports_ess(module):
            found[name] = module
        elif adapt is not None:
            layer = adapt(module)
            if layer is not None:
                found[name] = layer
    return found


def _is_adapted(layer: Any) -> bool:
    return not isinstance(layer, nn.Module) and callable(getattr(layer, "capture", None))


def _first_input(args: tuple, kwargs: dict[str, Any]) -> Tensor:
    """The layer input of a call made positionally or with keywords (``layer(x=...)``)."""
    if args:
        return args[0]
    for key in ("x", "hidden_states", "inputs", "input"):
        if key in kwargs:
            return kwargs[key]
    if kwargs:
        return next(iter(kwargs.values()))
    raise TypeError("the layer was called with no input")


def call_site(name: str, call: int) -> str:
    """The key of layer ``name``'s ``call``-th call (1-based) in one capture: ``name`` for the first call,
    ``name#2``, ``name#3``, ... after it (a shared or tied module run at several depths, Zamba2's shared
    transformer block): each call site is measured and reported on its own."""
    return name if call == 1 else f"{name}#{call}"


def layer_name(key: str) -> str:
    """The layer a captured key belongs to (``call_site``'s inverse: module names never hold ``#``)."""
    return key.split("#", 1)[0]


class _CallSites(MutableMapping):
    """A sink wrapper that writes a layer's second and later calls in one capture under their own keys."""

    def __init__(self, sink: MutableMapping[str, OperatorView]) -> None:
        self.sink, self.calls = sink, {}

    def __setitem__(self, name: str, view: OperatorView) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        self.sink[call_site(name, self.calls[name])] = view

    def __getitem__(self, key: str) -> OperatorView:
        return self.sink[key]

    def __delitem__(self, key: str) -> None:
        del self.sink[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.sink)

    def __len__(self) -> int:
        return len(self.sink)


@contextlib.contextmanager
def capture_operators(
    layers: dict[str, Any], sink: MutableMapping[str, OperatorView] | None = None
) -> Iterator[MutableMapping[str, OperatorView]]:
    """Record each layer's :class:`OperatorView` during the forward passes run inside the block.

    Zoo mixers (:class:`ESSMixer`) hand over the view their forward built; other protocol layers are
    captured by a forward pre-hook that calls ``layer.operator(input)`` (the first positional argument, or
    the input keyword: ``x``, ``hidden_states``); adapted layers (``ess_train.adapters``) by their own
    ``capture(sink, name)``. Gradients flow through the
    captured views when the forward runs with grad enabled. A layer called more than once inside the block
    writes each call under its own key (:func:`call_site`: ``name``, ``name#2``, ...; :func:`layer_name`
    maps a key back). ``sink``: where views are written (default a new dict; the measurement loop passes
    one that reduces each view to its ESS as it arrives, so no layer's operator outlives its forward); the
    block yields ``sink``.
    """
    if sink is None:
        sink = {}
    target, sink = sink, _CallSites(sink)
    handles = []
    with contextlib.ExitStack() as stack:
        try:
            for name, layer in layers.items():
                if _is_adapted(layer):
                    stack.enter_context(layer.capture(sink, name))
                elif isinstance(layer, ESSMixer):
                    layer._capture_name = name
                    layer._capture_sinks.append(sink)
                else:

                    def hook(module: nn.Module, args: tuple, kwargs: dict, _name: str = name) -> None:
                        sink[_name] = module.operator(_first_input(args, kwargs))

                    handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
            yield target
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
