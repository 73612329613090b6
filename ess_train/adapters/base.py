"""What every adapter shares: the adapted-layer object, the capture errors and the exactness check.

An :class:`AdaptedLayer` stands for one unmodified module of someone else's model (a Hugging Face
``LlamaAttention``, a ``MambaMixer``) and plays the part of a protocol layer: ``state_size(seq_len)`` as
the protocol's, and ``capture(sink, name)``, a context manager during which every forward of the module
writes its :class:`~ess_train.models.protocol.OperatorView` into ``sink[name]``. At the first capture the
adapter rebuilds the module's mixing output from the captured operator and compares it with the module's
own (:func:`check_exact`); above a dtype-aware tolerance it raises :class:`ExactnessError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import torch
from torch import Tensor, nn

from ess_train.models.protocol import OperatorView, StateSize

__all__ = [
    "calling_layer",
    "swapped_attribute",
    "swapped_original",
    "AdaptedLayer",
    "CaptureError",
    "ExactnessError",
    "exactness_tolerance",
    "max_relative_error",
    "check_exact",
]


class CaptureError(ValueError):
    """A forward that cannot be measured exactly (padding, packed rows, a KV cache, unknown flags)."""


class ExactnessError(CaptureError):
    """The operator rebuilt from a capture does not reproduce the module's own output."""


def exactness_tolerance(dtype: torch.dtype) -> float:
    """Max-relative tolerance of the exactness check for a module computing in ``dtype``.

    Models cast to float32 inside (softmax, scans), so float64 is held to float32 round-off too.
    """
    if dtype in (torch.float16, torch.bfloat16):
        return 5e-2
    return 1e-4


def max_relative_error(got: Tensor, ref: Tensor) -> float:
    """``max |got - ref| / max |ref|`` in float64 (0 for an all-zero reference that is matched)."""
    got, ref = got.detach().double(), ref.detach().double()
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    err = float((got - ref).abs().max()) if ref.numel() else 0.0
    return err / scale if scale > 0 else err


def check_exact(name: str, module: nn.Module, got: Tensor, ref: Tensor, what: str) -> float:
    """Raise :class:`ExactnessError` (naming layer, class and error) when ``got`` is not ``ref``."""
    if got.shape != ref.shape:
        raise ExactnessError(
            f"layer {name!r} ({type(module).__name__}): rebuilt {what} has shape {tuple(got.shape)}, "
            f"the module's own {tuple(ref.shape)}"
        )
    err = max_relative_error(got, ref)
    tol = exactness_tolerance(ref.dtype)
    if not err <= tol:
        raise ExactnessError(
            f"layer {name!r} ({type(module).__name__}): the captured operator does not reproduce the "
            f"module's {what}: max-relative error {err:.3g} > tolerance {tol:g} ({ref.dtype}). The layer's "
            "modeling code differs from what the adapter knows (another transformers version or an "
            "unsupported config); it is not measured."
        )
    return err


class AdaptedLayer:
    """One unmodified module, measured through an adapter (see the module docstring).

    Attributes:
        module: the adapted module itself.
        kind: the layer kind in reports (``"softmax_attention"``, ``"sliding_window_attention"``,
            ``"mamba"``, ``"falcon_mamba"``, ``"jamba_mamba"``, ``"mamba2"``, ``"gated_short_conv"``,
            ``"rg_lru"``, ...).
        check: run the exactness check at the first capture (default ``True``).
        checked_error: the max-relative error found by the first check (``None`` before it ran).
    """

    kind = "adapted"

    def __init__(self, module: nn.Module, check: bool = True) -> None:
        self.module = module
        self.check = check
        self.checked_error: float | None = None

    # protocol-like surface -------------------------------------------------------------------------
    def state_size(self, seq_len: int) -> StateSize:  # pragma: no cover - abstract
        raise NotImplementedError

    def capture(
        self, sink: MutableMapping[str, OperatorView], name: str
    ) -> contextlib.AbstractContextManager:
        """Context manager: while it is open, each forward of the module writes its view to ``sink[name]``."""
        return self._capture(sink, name)

    @contextlib.contextmanager
    def _capture(
        self, sink: MutableMapping[str, OperatorView], name: str
    ) -> Iterator[None]:  # pragma: no cover
        raise NotImplementedError
        yield

    # conveniences so that callbacks treating layers as modules keep working -------------------------
    @property
    def class_name(self) -> str:
        return type(self.module).__name__

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.module.load_state_dict(*args, **kwargs)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return self.module.parameters(recurse)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.class_name}, kind={self.kind!r})"


@contextlib.contextmanager
def calling_layer(
    module: nn.Module, entry: Any, stack: list[Any], check_call: Callable[[tuple, dict[str, Any]], None]
) -> Iterator[None]:
    """While open, ``entry`` is on top of ``stack`` during each forward of ``module``, so that a recording
    kernel wrapper (shared by every layer of a module) knows which layer calls it. ``check_call(args,
    kwargs)`` runs first on each call and raises for calls that cannot be measured (padding, caches)."""

    def pre(mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        check_call(args, kwargs)
        stack.append(entry)

    def post(mod: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if stack and stack[-1] is entry:
            stack.pop()

    handles = [
        module.register_forward_pre_hook(pre, with_kwargs=True),
        module.register_forward_hook(post, with_kwargs=True, always_call=True),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        stack[:] = [e for e in stack if e is not entry]


# (id(obj), attribute) -> [original value, open swaps, obj (kept alive, so that its id stays its own)]
_SWAPS: dict[tuple[int, str], list[Any]] = {}


@contextlib.contextmanager
def swapped_attribute(obj: Any, attr: str, make: Callable[[Any], Any]) -> Iterator[None]:
    """While open, ``obj.attr`` is ``make(original)``: a recording kernel wrapper in a module, the capture's
    attention implementation in a config. Swaps of the same ``(obj, attr)`` (the captures of several layers
    that share it, nested captures) share one, and the original comes back when the last one closes."""
    key = (id(obj), attr)
    entry = _SWAPS.get(key)
    if entry is None:
        original = getattr(obj, attr)
        entry = _SWAPS[key] = [original, 0, obj]
        setattr(obj, attr, make(original))
    entry[1] += 1
    try:
        yield
    finally:
        entry[1] -= 1
        if entry[1] == 0:
            del _SWAPS[key]
            setattr(obj, attr, entry[0])


def swapped_original(obj: Any, attr: str, default: Any = None) -> Any:
    """The value ``obj.attr`` had before :func:`swapped_attribute` (``default`` when it is not swapped)."""
    entry = _SWAPS.get((id(obj), attr))
    return default if entry is None else entry[0]
