"""Gated linear attention (GLA, Yang et al. 2024) as an :class:`ESSMixer`, after fla's GLA layer.

``S_t = diag(alpha_t) S_{t-1} + k_t v_t^T``, ``y_t = scale * S_t^T q_t`` with data-dependent gates
``log alpha_t = logsigmoid(gk_proj(x_t)) / gate_logit_normalizer`` (low-rank ``gk_proj``). Operator per
head: a diagonal :class:`RecurrentOperator` with ``a = alpha`` ``[B, H, L, d_k]``, ``b = k``,
``c = scale * q``.
Readout (fla): per-head RMSNorm, ``swish(g_proj(x))`` output gate, output projection.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ess_train.checks import check_bool, check_positive_float, check_positive_int
from ess_train.ess import RecurrentOperator
from ess_train.models.mixers.parts import (
    RMSNorm,
    gated_head_readout,
    head_dims,
    matrix_state_size,
    split_heads,
)
from ess_train.models.ops import chunk_linear_attention, sub_chunk_for
from ess_train.models.protocol import ESSMixer, OperatorView, StateSize
from ess_train.models.resets import RESET_LOG_GATE, current_resets

__all__ = ["GatedLinearAttention"]


class GatedLinearAttention(ESSMixer):
    """Multi-head gated linear attention (fla's layer without short convolutions, KV groups or caches).

    Args:
        d_model: model width.
        num_heads: number of heads.
        expand_k, expand_v: key/value widths ``int(d_model * expand)`` (fla defaults 0.5, 1.0).
        gate_low_rank_dim: rank of the gate projection ``d_model -> r -> key_dim``.
        gate_logit_normalizer: divides ``logsigmoid`` of the gate logits (fla default 16: gates near 1).
        clamp_min: optional lower clamp of the log-gates (``<= 0``), as fla.
        use_output_gate: ``swish(g_proj(x))`` gate after the per-head RMSNorm.
        chunk_size: chunk length of the fast forward (log-space chunked form: nothing overflows).
        norm_eps: epsilon of the per-head output RMSNorm.

    Resets: inside a ``SequenceModel(reset_token=...)`` the gates at the delimiter's positions are shut
    (log-gate ``RESET_LOG_GATE``): ``supports_resets``.

    TSS: ``heads * d_k * d_v``; per operator ``min(d_k, L // 2)``; multiplicity ``d_v``.
    ``init_search_space()``: ``gate_logit_normalizer`` candidates (first = current).
    """

    supports_resets = True

    def __init__(
        self,
        d_model: int,
        num_heads: int = 4,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
        clamp_min: float | None = None,
        use_output_gate: bool = True,
        chunk_size: int = 64,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.head_k_dim = head_dims(d_model, num_heads, expand_k, "expand_k")
        self.head_v_dim = head_dims(d_model, num_heads, expand_v, "expand_v")
        self.d_model, self.num_heads = d_model, num_heads
        check_positive_int("gate_low_rank_dim", gate_low_rank_dim)
        self.gate_logit_normalizer = check_positive_float("gate_logit_normalizer", gate_logit_normalizer)
        if clamp_min is not None and (
            isinstance(clamp_min, bool) or not isinstance(clamp_min, (int, float)) or not clamp_min < 0
        ):
            raise ValueError(
                f"clamp_min must be None or a negative number (a log-gate bound), got {clamp_min!r}"
            )
        self.clamp_min = clamp_min
        self.use_output_gate = check_bool("use_output_gate", use_output_gate)
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        self.scale = self.head_k_dim**-0.5
        key_dim, value_dim = num_heads * self.head_k_dim, num_heads * self.head_v_dim
        self.q_proj = nn.Linear(d_model, key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, value_dim, bias=False)
        self.g_proj = nn.Linear(d_model, value_dim, bias=False) if use_output_gate else None
        self.gk_proj = nn.Sequential(
            nn.Linear(d_model, gate_low_rank_dim, bias=False),
            nn.Linear(gate_low_rank_dim, key_dim, bias=True),
        )
        self.o_norm = RMSNorm(self.head_v_dim, eps=check_positive_float("norm_eps", norm_eps))
        self.o_proj = nn.Linear(value_dim, d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform (gain ``2 ** -2.5``) projections as fla's original GLA layer, zero gate bias."""
        for lin in (
            self.q_proj,
            self.k_proj,
            self.v_proj,
            self.g_proj,
            self.gk_proj[0],
            self.gk_proj[1],
            self.o_proj,
        ):
            if lin is not None:
                nn.init.xavier_uniform_(lin.weight, gain=2**-2.5)
        nn.init.zeros_(self.gk_proj[1].bias)
        self.o_norm.reset_parameters()

    def init_search_space(self) -> dict[str, list[float]]:
        """Candidates of the gate logit normalizer; the first is the current value."""
        return {
            "gate_logit_normalizer": list(
                dict.fromkeys([self.gate_logit_normalizer, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
            )
        }

    def apply_init(self, *, gate_logit_normalizer: float | None = None) -> None:
        """Set ``gate_logit_normalizer`` (used by every later forward)."""
        if gate_logit_normalizer is not None:
            self.gate_logit_normalizer = check_positive_float("gate_logit_normalizer", gate_logit_normalizer)

    def get_extra_state(self) -> dict[str, float]:
        """Checkpoint the normalizer: ``ESSInitializer`` may have changed it (it is no parameter)."""
        return {"gate_logit_normalizer": self.gate_logit_normalizer}

    def set_extra_state(self, state: dict[str, float]) -> None:
        self.apply_init(gate_logit_normalizer=state["gate_logit_normalizer"])

    def features(self, x: Tensor) -> dict[str, Tensor]:
        """q, k, log-gates ``gk`` (``<= 0``) ``[B, H, L, d_k]`` and v ``[B, H, L, d_v]``."""
        q, k, v, gk = (
            split_heads(p(x), self.num_heads) for p in (self.q_proj, self.k_proj, self.v_proj, self.gk_proj)
        )
        gk = F.logsigmoid(gk) / self.gate_logit_normalizer
        if self.clamp_min is not None:
            gk = gk.clamp_min(self.clamp_min)
        resets = current_resets()
        if resets is not None:
            gk = gk.masked_fill(resets[:, None, :, None].to(gk.device), RESET_LOG_GATE)
        return {"q": q, "k": k, "v": v, "gk": gk}

    def operator(self, x: Tensor) -> OperatorView:
        f = self.features(x)
        q, k, v, gk = f["q"], f["k"], f["v"], f["gk"]
        c = q * self.scale
        y = chunk_linear_attention(
            c, k, v, gk, chunk_size=self.chunk_size, sub_chunk_size=sub_chunk_for(self.chunk_size)
        )
        return OperatorView(op=RecurrentOperator(gk.exp(), k, c, validate=False), u=v, y=y)

    def readout(self, view: OperatorView, x: Tensor) -> Tensor:
        return gated_head_readout(view.y, x, self.o_norm, self.g_proj, self.o_proj, self.num_heads)

    def state_size(self, seq_len: int) -> StateSize:
        return matrix_state_size(self.num_heads, self.head_k_dim, self.head_v_dim, seq_len)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_heads={self.num_heads}, "
            f"d_k={self.head_k_dim}, d_v={self.head_v_dim}, "
            f"gate_logit_normalizer={self.gate_logit_normalizer:g}"
        )
