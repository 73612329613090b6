"""Causal sliding-window softmax attention as an :class:`ESSMixer`.

Query ``t`` attends to keys ``s`` in ``(t - window, t]``. Operator: one :class:`DenseOperator` per head
(banded lower-triangular attention matrix); ``u`` = values.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ess_train.models.mixers.attention import SoftmaxAttention
from ess_train.models.protocol import StateSize

__all__ = ["SlidingWindowAttention"]


class SlidingWindowAttention(SoftmaxAttention):
    """Multi-head softmax attention restricted to the last ``window`` positions (the current one included).

    Args: as :class:`SoftmaxAttention`, plus ``window`` (positive int; ``window=1`` attends to itself only).

    TSS: the window's KV cache, ``2 * min(window, L) * d_model`` (same convention as full attention's
    ``2 * L * d_model``). Per operator: ``rank(H_i) <= min(window - 1, i, L - i)``, reported as its maximum
    over positions, ``min(window - 1, L // 2)``.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int = 1,
        window: int = 64,
        rotary: bool = False,
        rotary_base: float = 10000.0,
        bias: bool = False,
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(
                f"window must be an int >= 2 (window 1 attends to nothing in the past), got {window!r}"
            )
        super().__init__(
            d_model=d_model, num_heads=num_heads, rotary=rotary, rotary_base=rotary_base, bias=bias
        )
        self.window = window

    def _allowed(self, L: int, device: torch.device) -> Tensor:
        ones = torch.ones(L, L, dtype=torch.bool, device=device)
        return ones.tril() & ones.triu(-(self.window - 1))

    def state_size(self, seq_len: int) -> StateSize:
        return StateSize(
            total=2 * min(self.window, seq_len) * self.d_model,
            per_operator=min(self.window - 1, seq_len // 2),
            multiplicity=self.head_dim,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", window={self.window}"
