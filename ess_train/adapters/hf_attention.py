"""Softmax attention of Hugging Face transformers, through its public attention-function interface.

Which modules: any transformers module whose forward dispatches through ``ALL_ATTENTION_FUNCTIONS`` on its
config's ``_attn_implementation`` and whose modeling module defines ``eager_attention_forward``
(:func:`routes_through_interface`: Llama, GPT-2, Gemma 1-3, Phi, Mixtral, GPT-NeoX, OPT, BLOOM, Falcon, the
hybrids' attention layers, ...), with no list of classes. That it really does is confirmed at capture time: a
module whose forward ran without calling the interface is refused by name, and the first-capture exactness
check (``P @ V`` against the layer's own output and against the implementation the model runs outside a
capture) refuses a layer whose captured operator does not reproduce it.

While a capture is open, the config of each captured attention module names the attention implementation
``"ess_capture"``, registered here in ``AttentionInterface`` *and* ``AttentionMaskInterface`` (without the
mask function the masking code hands a custom implementation no mask and the probabilities are silently
non-causal). ``ess_capture`` calls the modeling file's own ``eager_attention_forward`` with what the
interface received (the model's mask, scaling, softcapping, sinks, ALiBi in the mask), and records the
probabilities ``P [B, Hq, L, L]``: one :class:`~ess_train.ess.DenseOperator` per query head, acting on that
head's value stream. The sliding window, when there is one, is read from the mask the layer gets (the keys a
query may see), not from the config. Outside a capture nothing changes: the config is restored on exit.

Refused during capture (:class:`~ess_train.adapters.base.CaptureError`): padded batches, packed rows
(position ids that restart), KV caches with past tokens and generation steps; cross-attention modules are
not adapted (listed as not measured).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterator, MutableMapping
from typing import Any

import torch
from torch import Tensor, nn

from ess_train.adapters.base import (
    AdaptedLayer,
    CaptureError,
    check_exact,
    swapped_attribute,
    swapped_original,
)
from ess_train.ess import DenseOperator
from ess_train.models.protocol import OperatorView, StateSize

__all__ = [
    "IMPLEMENTATION",
    "HFAttentionAdapter",
    "kv_cache_state",
    "routes_through_interface",
    "window_of_mask",
]

IMPLEMENTATION = "ess_capture"

#: id(module) -> [(adapter, sink, name)] of the attention modules captured right now
_ACTIVE: dict[int, list[tuple[HFAttentionAdapter, MutableMapping[str, OperatorView], str]]] = {}
_registered = False


def _register() -> None:
    """Register ``ess_capture`` in transformers' attention and mask interfaces (once)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, _attention)
    AttentionMaskInterface.register(IMPLEMENTATION, _mask)
    _registered = True


def _mask(*args: Any, **kwargs: Any) -> Any:
    """The eager (additive float) mask, after refusing padded batches."""
    from transformers.masking_utils import eager_mask

    padding = kwargs.get("attention_mask")
    if isinstance(padding, Tensor) and padding.dim() == 2 and not bool(padding.bool().all()):
        raise CaptureError(
            "ESS capture refuses padded batches: the attention mask holds padding, so a row is not one "
            "causal operator over its L tokens; measure unpadded rows of equal length"
        )
    # (a KV cache or generation step is refused per captured layer, in _view: a cross-attention mask has
    # fewer keys than queries by design and must not stop the capture of the self-attention layers)
    return eager_mask(*args, **kwargs)


def _eager_of(module: nn.Module) -> Any:
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise CaptureError(
            f"{type(module).__name__}: its modeling module {type(module).__module__} defines no "
            "eager_attention_forward; this attention class cannot be captured"
        )
    return fn


_ROUTES: dict[type, bool] = {}


def routes_through_interface(cls: type) -> bool:
    """Whether ``cls`` is a transformers attention that dispatches through the attention interface: its
    forward (or an ancestor's, within transformers) reads ``ALL_ATTENTION_FUNCTIONS`` and its modeling module
    defines ``eager_attention_forward``. A static pre-selection; the capture confirms it per call."""
    got = _ROUTES.get(cls)
    if got is None:
        got = False
        if cls.__module__.startswith("transformers.models.") and hasattr(
            sys.modules.get(cls.__module__), "eager_attention_forward"
        ):
            for klass in cls.__mro__:
                forward = vars(klass).get("forward")
                if forward is None or not klass.__module__.startswith("transformers."):
                    continue
                try:
                    source = inspect.getsource(forward)
                except (OSError, TypeError):
                    continue
                got = "ALL_ATTENTION_FUNCTIONS" in source
                break
        _ROUTES[cls] = got
    return got


def window_of_mask(mask: Any, seq_len: int) -> int | None:
    """The sliding window a 4D additive mask applies (keys a query sees, itself included), or ``None`` when
    every query sees all earlier keys (also when ``mask`` is not a ``[B, H, L, L]`` tensor)."""
    if not isinstance(mask, Tensor) or mask.dim() != 4 or mask.shape[-1] != seq_len or seq_len < 2:
        return None
    block = mask[0, 0, -seq_len:, :].detach()
    if block.dtype == torch.bool:
        seen = block
    else:
        seen = block > torch.finfo(block.dtype).min / 2
    counts = seen.sum(-1)
    widest = int(counts.max())
    full = torch.arange(1, seq_len + 1, device=counts.device)
    return None if bool((counts >= full).all()) else widest


def _attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Any,
    *args: Any,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """``ess_capture``: the module's own eager attention, recording ``P`` for captured modules."""
    out, probs = _eager_of(module)(module, query, key, value, attention_mask, *args, **kwargs)
    for adapter, sink, name in _ACTIVE.get(id(module), ()):
        adapter._routed += 1
        adapter.window = window_of_mask(attention_mask, query.shape[-2])
        view = adapter._view(name, query, key, value, out, probs, kwargs)
        if adapter.check and adapter.checked_error is None:
            adapter._check(name, view, (module, query, key, value, attention_mask, *args), kwargs)
        sink[name] = view
    return out, probs


def _implementation_attr(config: Any) -> str:
    """Where ``config`` keeps its attention implementation (this config's own: sub-configs keep theirs)."""
    return (
        "_attn_implementation_internal"
        if "_attn_implementation_internal" in vars(config)
        else "_attn_implementation"
    )


def _swapped(config: Any) -> contextlib.AbstractContextManager:
    """``config`` names ``ess_capture`` while the block runs (shared by nested captures, restored on exit)."""
    return swapped_attribute(config, _implementation_attr(config), lambda _: IMPLEMENTATION)


def kv_cache_state(
    seq_len: int, window: int | None, kv_heads: int, head_dim: int, query_heads: int | None = None
) -> StateSize:
    """Softmax attention's state: the KV cache ``2 * min(L, window) * kv_heads * head_dim``; per operator
    (query head) ``L // 2`` (full) or ``min(window - 1, L // 2)``; multiplicity ``head_dim``; with grouped
    queries (``query_heads > kv_heads``) ``kv_heads`` states, each read by ``query_heads / kv_heads``
    query heads."""
    span = seq_len if window is None else min(window, seq_len)
    per_op = seq_len // 2 if window is None else min(window - 1, seq_len // 2)
    states = kv_heads if query_heads is not None and query_heads > kv_heads else None
    return StateSize(
        total=2 * span * kv_heads * head_dim, per_operator=per_op, multiplicity=head_dim, states=states
    )


def _configured_window(module: nn.Module, config: Any) -> int | None:
    """The window the module or its config names (a first guess: the capture reads it from the mask)."""
    if hasattr(module, "sliding_window"):
        window = module.sliding_window
    else:
        window = getattr(config, "sliding_window", None)
    return int(window) if isinstance(window, int) and window > 0 else None


class HFAttentionAdapter(AdaptedLayer):
    """A transformers softmax-attention module (``LlamaAttention``, ``GPT2Attention``, ...).

    ``window``: the sliding window (tokens a query sees, itself included) or ``None``: read from the mask
    at each capture; before the first one, the module's or its config's ``sliding_window`` (what the
    monitor's first TSS uses). State size: the KV cache ``2 * min(L, window) * n_kv_heads * head_dim``; per
    operator (query head) ``L // 2`` (full) or ``window - 1``; multiplicity ``head_dim`` (value channels
    per head).
    """

    def __init__(self, module: nn.Module, check: bool = True) -> None:
        super().__init__(module, check)
        if getattr(module, "is_cross_attention", False):
            raise CaptureError(f"{type(module).__name__} is cross-attention: not a causal operator")
        config = getattr(module, "config", None)
        if config is None:
            raise CaptureError(f"{type(module).__name__} has no .config: cannot route its attention")
        self.config = config
        self.window = _configured_window(module, config)
        self._routed = 0  # calls of the attention interface for this module (confirms the routing)
        heads = getattr(config, "num_attention_heads", None) or getattr(module, "num_heads", None)
        self.num_heads = int(heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(module, "head_dim", None) or config.hidden_size // self.num_heads)

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "sliding_window_attention" if self.window else "softmax_attention"

    def state_size(self, seq_len: int) -> StateSize:
        return kv_cache_state(seq_len, self.window, self.num_kv_heads, self.head_dim, self.num_heads)

    @contextlib.contextmanager
    def _capture(self, sink: MutableMapping[str, OperatorView], name: str) -> Iterator[None]:
        _register()
        key = id(self.module)
        entry = (self, sink, name)
        _ACTIVE.setdefault(key, []).append(entry)  # nested captures (two sinks) each get the view
        handles = [
            self.module.register_forward_pre_hook(self._before),
            self.module.register_forward_hook(lambda m, args, out: self._after(name, m)),
        ]
        try:
            with _swapped(self.config):
                yield
        finally:
            for h in handles:
                h.remove()
            entries = _ACTIVE.get(key, [])
            entries[:] = [e for e in entries if e is not entry]
            if not entries:
                _ACTIVE.pop(key, None)

    def _before(self, module: nn.Module, args: tuple) -> None:
        self._calls_before = self._routed

    def _after(self, name: str, module: nn.Module) -> None:
        if self._routed == getattr(self, "_calls_before", self._routed - 1):
            raise CaptureError(
                f"layer {name!r} ({type(module).__name__}): its forward did not call transformers' attention "
                "interface, so its attention cannot be captured; it is not measured (report it, or measure "
                "a layer that implements ess_train's protocol)"
            )

    # ----------------------------------------------------------------------------------------- capture
    def _refuse(self, name: str, query: Tensor, key: Tensor, kwargs: dict[str, Any]) -> None:
        cls = type(self.module).__name__
        if key.shape[-2] != query.shape[-2]:
            raise CaptureError(
                f"layer {name!r} ({cls}): {query.shape[-2]} queries against {key.shape[-2]} keys (a KV cache "
                "or a generation step); ESS capture measures prefill forwards only: pass use_cache=False"
            )
        if any(k in kwargs for k in ("cu_seq_lens_q", "cu_seqlens_q", "seq_idx")):
            raise CaptureError(f"layer {name!r} ({cls}): packed sequences (cu_seq_lens) cannot be captured")
        pos = kwargs.get("position_ids")
        if isinstance(pos, Tensor) and pos.shape[-1] > 1 and not bool((pos.diff(dim=-1) == 1).all()):
            raise CaptureError(
                f"layer {name!r} ({cls}): position ids restart inside a row (packed sequences); "
                "ESS capture needs one sequence per row"
            )

    def _view(
        self,
        name: str,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        out: Tensor,
        probs: Tensor | None,
        kwargs: dict[str, Any],
    ) -> OperatorView:
        cls = type(self.module).__name__
        self._refuse(name, query, key, kwargs)
        if probs is None:
            raise CaptureError(f"layer {name!r} ({cls}): eager attention returned no probabilities")
        groups = query.shape[1] // value.shape[1]
        u = value.repeat_interleave(groups, dim=1) if groups > 1 else value  # [B, Hq, L, D] (repeat_kv)
        y = out.transpose(1, 2)  # [B, Hq, L, D]
        try:
            op = DenseOperator(probs, validate=self.check and self.checked_error is None)
        except ValueError as exc:
            raise CaptureError(
                f"layer {name!r} ({cls}): the attention probabilities are not a causal operator ({exc}); the "
                "model did not apply a causal mask through the mask interface"
            ) from exc
        return OperatorView(op=op, u=u, y=y)

    def _check(self, name: str, view: OperatorView, call: tuple, kwargs: dict[str, Any]) -> None:
        """First capture: ``P @ V`` against eager's output and against the implementation the model runs
        outside a capture (sdpa), on the same inputs; the sliding window against ``P``'s support."""
        self._check_window(name, view.op.T)
        rebuilt = view.op.apply(view.u)
        err = check_exact(name, self.module, rebuilt, view.y, "attention output (P @ V)")
        saved = swapped_original(self.config, "_attn_implementation_internal")
        saved = swapped_original(self.config, "_attn_implementation", saved)  # (where _swapped put it)
        if saved == "sdpa" and not self.module.training:  # (training: dropout would differ between the two)
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            ref = sdpa_attention_forward(*call, **kwargs)[0].transpose(1, 2)
            err = max(err, check_exact(name, self.module, rebuilt, ref, "sdpa attention output"))
        self.checked_error = err

    def _check_window(self, name: str, probs: Tensor) -> None:
        if self.window is None or probs.shape[-1] <= self.window:
            return
        L = probs.shape[-1]
        outside = torch.ones(L, L, dtype=torch.bool, device=probs.device).tril(-self.window)
        leak = float(probs.detach().abs().masked_select(outside).max())
        if leak > 0:
            raise CaptureError(
                f"layer {name!r} ({type(self.module).__name__}): attention reaches beyond the sliding window "
                f"of {self.window} its mask applies (weight {leak:.3g})"
            )
