"""Softmax attention of Hugging Face transformers, through its public attention-function interface.

While a capture is open, the config of each captured attention module names the attention implementation
``"ess_capture"``, registered here in ``AttentionInterface`` *and* ``AttentionMaskInterface`` (without the
mask function the masking code hands a custom implementation no mask and the probabilities are silently
non-causal). ``ess_capture`` calls the modeling file's own ``eager_attention_forward``, so RoPE, grouped
query heads, sliding windows and softcapping come out as the model computes them, and records the
probabilities ``P [B, Hq, L, L]``: one :class:`~ess_train.ess.DenseOperator` per query head, acting on that
head's value stream. Outside a capture nothing changes: the config is restored on exit.

Refused during capture (:class:`~ess_train.adapters.base.CaptureError`): padded batches, packed rows
(position ids that restart), KV caches with past tokens and generation steps, a sliding window other than
the one the adapter derived from the config.
"""

from __future__ import annotations

import contextlib
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

__all__ = ["IMPLEMENTATION", "HFAttentionAdapter"]

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
    """The eager (additive float) mask, after refusing padded batches and cached prefixes."""
    from transformers.masking_utils import eager_mask

    padding = kwargs.get("attention_mask")
    if isinstance(padding, Tensor) and padding.dim() == 2 and not bool(padding.bool().all()):
        raise CaptureError(
            "ESS capture refuses padded batches: the attention mask holds padding, so a row is not one "
            "causal operator over its L tokens; measure unpadded rows of equal length"
        )
    q_len, kv_len = kwargs.get("q_length"), kwargs.get("kv_length")
    if kwargs.get("q_offset", 0) or (q_len is not None and kv_len is not None and q_len != kv_len):
        raise CaptureError(
            f"ESS capture refuses KV caches and generation steps (queries {q_len}, keys {kv_len}, offset "
            f"{kwargs.get('q_offset', 0)}): capture a prefill forward with use_cache=False"
        )
    return eager_mask(*args, **kwargs)


def _eager_of(module: nn.Module) -> Any:
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise CaptureError(
            f"{type(module).__name__}: its modeling module {type(module).__module__} defines no "
            "eager_attention_forward; this attention class cannot be captured"
        )
    return fn


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


class HFAttentionAdapter(AdaptedLayer):
    """A transformers softmax-attention module (``LlamaAttention``, ``GPT2Attention``, ...).

    ``window``: the sliding window (tokens a query sees, itself included) or ``None``; derived by the
    registry from the module (``sliding_window``) or its config. State size: the KV cache
    ``2 * min(L, window) * n_kv_heads * head_dim``; per operator (query head) ``L // 2`` (full) or
    ``window - 1``; multiplicity ``head_dim`` (value channels per head).
    """

    def __init__(self, module: nn.Module, window: int | None = None, check: bool = True) -> None:
        super().__init__(module, check)
        if getattr(module, "is_cross_attention", False):
            raise CaptureError(f"{type(module).__name__} is cross-attention: not a causal operator")
        config = getattr(module, "config", None)
        if config is None:
            raise CaptureError(f"{type(module).__name__} has no .config: cannot route its attention")
        self.config = config
        self.window = int(window) if window else None
        heads = getattr(config, "num_attention_heads", None) or getattr(module, "num_heads", None)
        self.num_heads = int(heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(module, "head_dim", None) or config.hidden_size // self.num_heads)
        self.kind = "sliding_window_attention" if self.window else "softmax_attention"

    def state_size(self, seq_len: int) -> StateSize:
        span = seq_len if self.window is None else min(self.window, seq_len)
        per_op = seq_len // 2 if self.window is None else min(self.window - 1, seq_len // 2)
        return StateSize(
            total=2 * span * self.num_kv_heads * self.head_dim,
            per_operator=per_op,
            multiplicity=self.head_dim,
        )

    @contextlib.contextmanager
    def _capture(self, sink: MutableMapping[str, OperatorView], name: str) -> Iterator[None]:
        _register()
        key = id(self.module)
        entry = (self, sink, name)
        _ACTIVE.setdefault(key, []).append(entry)  # nested captures (two sinks) each get the view
        try:
            with _swapped(self.config):
                yield
        finally:
            entries = _ACTIVE.get(key, [])
            entries[:] = [e for e in entries if e is not entry]
            if not entries:
                _ACTIVE.pop(key, None)

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
        passed = kwargs.get("sliding_window")
        if (passed or None) != self.window:
            raise CaptureError(
                f"layer {name!r} ({cls}): the model passes sliding_window={passed} but the adapter derived "
                f"{self.window} from the config; refusing to guess the layer's state size"
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
                f"layer {name!r} ({type(self.module).__name__}): attention reaches beyond its sliding window "
                f"of {self.window} (weight {leak:.3g}); the window derived from the config is wrong"
            )
