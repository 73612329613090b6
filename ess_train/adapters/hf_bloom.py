"""BLOOM's attention, whose forward computes its own ALiBi softmax (it does not call transformers'
attention interface) and returns the probabilities.

The operator is those probabilities ``P [B, H, L, L]`` (ALiBi and the causal mask applied, as the module
computes them): one :class:`~ess_train.ess.DenseOperator` per head, acting on that head's values, which are
recomputed from the module's own ``query_key_value`` projection of its input. The first-capture check
rebuilds the module's output, ``dense(merge(P @ V)) + residual``, and compares it with the module's. Refused:
KV caches and generation steps, padded or windowed masks (a row is then not one causal operator over its L
tokens), and the tensor-parallel ``slow_but_exact`` path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, MutableMapping
from typing import Any

import torch
from torch import Tensor, nn

from ess_train.adapters.base import AdaptedLayer, CaptureError, check_exact
from ess_train.adapters.hf_attention import kv_cache_state
from ess_train.ess import DenseOperator
from ess_train.models.protocol import OperatorView, StateSize

__all__ = ["BloomAttentionAdapter"]


class BloomAttentionAdapter(AdaptedLayer):
    """``BloomAttention``: full causal attention with ALiBi; state size as any softmax attention's."""

    kind = "softmax_attention"

    def __init__(self, module: nn.Module, check: bool = True) -> None:
        super().__init__(module, check)
        if getattr(module, "pretraining_tp", 1) > 1 and getattr(module, "slow_but_exact", False):
            raise CaptureError("BloomAttention with pretraining_tp > 1 and slow_but_exact: not supported")
        self.num_heads, self.head_dim = int(module.num_heads), int(module.head_dim)

    def state_size(self, seq_len: int) -> StateSize:
        return kv_cache_state(seq_len, None, self.num_heads, self.head_dim)

    @contextlib.contextmanager
    def _capture(self, sink: MutableMapping[str, OperatorView], name: str) -> Iterator[None]:
        def record(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            sink[name] = self._view(name, args, kwargs, output)

        handle = self.module.register_forward_hook(record, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def _view(self, name: str, args: tuple, kwargs: dict[str, Any], output: Any) -> OperatorView:
        hidden = args[0] if args else kwargs["hidden_states"]
        residual = args[1] if len(args) > 1 else kwargs["residual"]
        out, probs = output[0], output[1]
        L = hidden.shape[1]
        if probs is None or probs.shape[-1] != L or probs.shape[-2] != L:
            raise CaptureError(
                f"layer {name!r} (BloomAttention): {L} queries against "
                f"{None if probs is None else probs.shape[-1]} keys (a KV cache or a generation step); ESS "
                "capture measures prefill forwards only: pass use_cache=False"
            )
        self._refuse_mask(name, kwargs.get("attention_mask"), L)
        _, _, value = self.module._reshape(self.module.query_key_value(hidden))  # [B, H, L, D]
        y = probs.to(value.dtype) @ value
        view = OperatorView(
            op=DenseOperator(probs, validate=self.check and self.checked_error is None), u=value, y=y
        )
        if self.check and self.checked_error is None and not self.module.training:
            B, H, _, D = y.shape
            rebuilt = self.module.dense(y.transpose(1, 2).reshape(B, L, H * D)) + residual
            self.checked_error = check_exact(name, self.module, rebuilt, out, "attention output")
        return view

    @staticmethod
    def _refuse_mask(name: str, mask: Any, L: int) -> None:
        if not isinstance(mask, Tensor) or mask.dim() != 4:
            return
        block = mask[..., -L:, :].detach()
        seen = block if block.dtype == torch.bool else block > torch.finfo(block.dtype).min / 2
        causal = torch.ones(L, L, dtype=torch.bool, device=seen.device).tril()
        if not bool((seen == causal).all()):
            raise CaptureError(
                f"layer {name!r} (BloomAttention): the mask is not plain causal (padding or a window): ESS "
                "capture needs one unpadded sequence per row"
            )
