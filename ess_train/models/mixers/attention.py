"""Causal multi-head softmax attention (optional rotary embedding) as an :class:`ESSMixer`.

Operator: one :class:`DenseOperator` per head, the attention matrix
``T[t, s] = softmax_s(q_t . k_s / sqrt(d))`` (no recurrence exists); ``u`` = values ``[B, H, L, d_head]``
(value channels share the head's operator).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ess_train.checks import check_bool, check_positive_float
from ess_train.ess import DenseOperator
from ess_train.models.mixers.parts import head_dims, merge_heads, rotary_embedding, split_heads
from ess_train.models.protocol import ESSMixer, OperatorView, StateSize

__all__ = ["SoftmaxAttention"]


class SoftmaxAttention(ESSMixer):
    """Causal multi-head softmax attention.

    Args:
        d_model: model width (``num_heads * head_dim``).
        num_heads: number of heads; must divide ``d_model``.
        rotary: apply rotary position embedding to queries and keys (needs an even head dim).
        rotary_base: RoPE frequency base.
        bias: biases in the q/k/v/output projections.

    TSS (``state_size``): the KV cache, ``2 * L * d_model`` numbers (grows with L). Per operator the rank
    of ``H_i`` is at most ``min(i, L - i)``; ``per_operator`` reports its maximum over positions, ``L // 2``.
    ``multiplicity`` = head dim (value channels per head).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int = 1,
        rotary: bool = False,
        rotary_base: float = 10000.0,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.head_dim = head_dims(d_model, num_heads)
        self.d_model, self.num_heads = d_model, num_heads
        self.rotary = check_bool("rotary", rotary)
        self.rotary_base = check_positive_float("rotary_base", rotary_base)
        check_bool("bias", bias)
        if rotary and self.head_dim % 2:
            raise ValueError(f"rotary=True needs an even head dim, got d_model / num_heads = {self.head_dim}")
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform projections, zero biases."""
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def features(self, x: Tensor) -> dict[str, Tensor]:
        """Per-token queries (rotated), keys (rotated), values: each ``[B, H, L, head_dim]``."""
        q, k, v = (split_heads(p(x), self.num_heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.rotary:
            q, k = rotary_embedding(q, self.rotary_base), rotary_embedding(k, self.rotary_base)
        return {"q": q, "k": k, "v": v}

    def _allowed(self, L: int, device: torch.device) -> Tensor:
        """Boolean ``[L, L]`` mask of the keys ``s`` query ``t`` attends to (``s <= t``)."""
        return torch.ones(L, L, dtype=torch.bool, device=device).tril()

    def operator(self, x: Tensor) -> OperatorView:
        f = self.features(x)
        q, k, v = f["q"], f["k"], f["v"]
        scores = (q @ k.transpose(-1, -2)) * self.scale
        scores = scores.masked_fill(~self._allowed(x.shape[1], x.device), float("-inf"))
        T = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype)
        # causal by construction (masked softmax); validation would cost a device sync per forward
        return OperatorView(op=DenseOperator(T, validate=False), u=v, y=T @ v)

    def readout(self, view: OperatorView, x: Tensor) -> Tensor:
        return self.o_proj(merge_heads(view.y))

    def state_size(self, seq_len: int) -> StateSize:
        return StateSize(
            total=2 * seq_len * self.d_model, per_operator=seq_len // 2, multiplicity=self.head_dim
        )

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_heads={self.num_heads}, rotary={self.rotary}"
