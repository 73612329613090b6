"""DeltaNet (delta rule; Schlag et al. 2021, Yang et al. 2024) as an :class:`ESSMixer`, after fla's layer.

``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``y_t = scale * S_t^T q_t`` with L2-normalized
q, k and ``beta_t = sigmoid(b_proj(x_t))`` per head. Per head and value channel ``j`` the column ``S[:, j]``
follows a full-transition recurrence: :class:`DeltaRuleOperator` with ``A_t = I - beta_t k_t k_t^T``,
``b_t = beta_t k_t``, ``c_t = scale * q_t``, ``u = v``. Fast forward: the chunkwise delta rule (WY form, loop
over chunks only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ess_train.checks import check_bool, check_choice, check_positive_float, check_positive_int
from ess_train.ess import DeltaRuleOperator
from ess_train.models.mixers.parts import (
    RMSNorm,
    gated_head_readout,
    head_dims,
    matrix_state_size,
    split_heads,
)
from ess_train.models.ops import chunk_delta_rule
from ess_train.models.protocol import ESSMixer, OperatorView, StateSize

__all__ = ["DeltaNet"]


class DeltaNet(ESSMixer):
    """Multi-head DeltaNet (fla's layer without short convolutions or caches).

    Args:
        d_model: model width.
        num_heads: number of heads.
        expand_k, expand_v: key/value widths ``int(d_model * expand)`` (fla defaults 1.0, 1.0).
        qk_activation: ``"silu"`` (fla default) or ``"identity"``, applied before the L2 normalization.
        use_output_gate: ``swish(g_proj(x))`` gate after the per-head RMSNorm (fla ``use_gate``, default off).
        chunk_size: chunk length of the fast forward.
        norm_eps: epsilon of the per-head output RMSNorm.

    TSS: ``heads * d_k * d_v``; per operator ``min(d_k, L // 2)``; multiplicity ``d_v``.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int = 4,
        expand_k: float = 1.0,
        expand_v: float = 1.0,
        qk_activation: str = "silu",
        use_output_gate: bool = False,
        chunk_size: int = 64,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.head_k_dim = head_dims(d_model, num_heads, expand_k, "expand_k")
        self.head_v_dim = head_dims(d_model, num_heads, expand_v, "expand_v")
        self.d_model, self.num_heads = d_model, num_heads
        self.qk_activation = check_choice("qk_activation", qk_activation, ("silu", "identity"))
        self.use_output_gate = check_bool("use_output_gate", use_output_gate)
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        self.scale = self.head_k_dim**-0.5
        key_dim, value_dim = num_heads * self.head_k_dim, num_heads * self.head_v_dim
        self.q_proj = nn.Linear(d_model, key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, value_dim, bias=False)
        self.b_proj = nn.Linear(d_model, num_heads, bias=False)
        self.g_proj = nn.Linear(d_model, value_dim, bias=False) if use_output_gate else None
        self.o_norm = RMSNorm(self.head_v_dim, eps=check_positive_float("norm_eps", norm_eps))
        self.o_proj = nn.Linear(value_dim, d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform projections (gain ``2 ** -2.5``): ``beta`` starts near 1/2."""
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.b_proj, self.g_proj, self.o_proj):
            if lin is not None:
                nn.init.xavier_uniform_(lin.weight, gain=2**-2.5)
        self.o_norm.reset_parameters()

    def features(self, x: Tensor) -> dict[str, Tensor]:
        """Unit-norm q, k ``[B, H, L, d_k]``, v ``[B, H, L, d_v]``, beta ``[B, H, L]`` in (0, 1)."""
        q, k, v = (split_heads(p(x), self.num_heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.qk_activation == "silu":
            q, k = F.silu(q), F.silu(k)
        q, k = F.normalize(q, dim=-1, eps=1e-6), F.normalize(k, dim=-1, eps=1e-6)
        beta = torch.sigmoid(self.b_proj(x)).transpose(1, 2)  # [B, H, L]
        return {"q": q, "k": k, "v": v, "beta": beta}

    def operator(self, x: Tensor) -> OperatorView:
        f = self.features(x)
        c = f["q"] * self.scale
        y = chunk_delta_rule(c, f["k"], f["v"], f["beta"], chunk_size=self.chunk_size)
        return OperatorView(op=DeltaRuleOperator(f["k"], f["beta"], c), u=f["v"], y=y)

    def readout(self, view: OperatorView, x: Tensor) -> Tensor:
        return gated_head_readout(view.y, x, self.o_norm, self.g_proj, self.o_proj, self.num_heads)

    def state_size(self, seq_len: int) -> StateSize:
        return matrix_state_size(self.num_heads, self.head_k_dim, self.head_v_dim, seq_len)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_heads={self.num_heads}, "
            f"d_k={self.head_k_dim}, d_v={self.head_v_dim}"
        )
