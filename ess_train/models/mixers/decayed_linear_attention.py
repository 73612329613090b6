"""Decayed linear attention (RetNet-style retention) as an :class:`ESSMixer`.

``S_t = gamma_h S_{t-1} + k_t v_t^T``, ``y_t = scale * S_t^T q_t`` with a learned per-head decay
``gamma_h in (0, 1)``
(parameterized by its logit: ``log gamma = logsigmoid(decay_logit)`` stays in range). Operator per head: a
diagonal :class:`RecurrentOperator` with ``a = gamma_h`` (repeated over ``N = d_k``), ``b = k``,
``c = scale * q``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ess_train.checks import check_bool, check_open_unit, check_positive_float, check_positive_int
from ess_train.ess import RecurrentOperator
from ess_train.models.mixers.parts import (
    RMSNorm,
    gated_head_readout,
    head_dims,
    matrix_state_size,
    rotary_embedding,
    split_heads,
)
from ess_train.models.ops import chunk_decayed_linear_attention
from ess_train.models.protocol import ESSMixer, OperatorView, StateSize

__all__ = ["DecayedLinearAttention", "decay_spectrum"]


def decay_spectrum(num_heads: int, decay_min: float, decay_max: float) -> Tensor:
    """Decays ``gamma_h = 1 - 2 ** -e_h``, ``e_h`` evenly spaced from ``e(decay_min)`` to ``e(decay_max)``.

    (Half-lives spaced geometrically.) ``decay_min = 1 - 2**-5``, ``decay_max = 1 - 2**-(4 + H)`` is RetNet's
    ``1 - 2 ** (-5 - arange(H))``. Returned in float64.
    """
    e0, e1 = -math.log2(1.0 - decay_min), -math.log2(1.0 - decay_max)
    e = torch.linspace(e0, e1, num_heads, dtype=torch.float64)
    return 1.0 - torch.exp2(-e)


class DecayedLinearAttention(ESSMixer):
    """Multi-head linear attention with a fixed-per-head (learned) exponential decay (RetNet retention).

    Args:
        d_model: model width.
        num_heads: number of heads.
        expand_k, expand_v: key/value widths ``int(d_model * expand)``, split over heads (``d_k``, ``d_v``).
        decay_min, decay_max: decays of the first and last head (see :func:`decay_spectrum`); default RetNet's
            ``1 - 2 ** (-5 - arange(H))``. Their order does not matter (heads are interchangeable).
        rotary: rotary embedding on q, k (RetNet's xPos without the length extrapolation factor).
        use_output_gate: ``swish(g_proj(x))`` gate after the per-head RMSNorm, as RetNet.
        chunk_size: chunk length of the fast forward.
        norm_eps: epsilon of the per-head output RMSNorm.

    TSS: ``heads * d_k * d_v``; per operator ``min(d_k, L // 2)``; multiplicity ``d_v``.
    ``init_search_space()`` offers ``decay_min``/``decay_max`` candidates (first = current setting).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int = 4,
        expand_k: float = 1.0,
        expand_v: float = 1.0,
        decay_min: float | None = None,
        decay_max: float | None = None,
        rotary: bool = False,
        use_output_gate: bool = True,
        chunk_size: int = 64,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.head_k_dim = head_dims(d_model, num_heads, expand_k, "expand_k")
        self.head_v_dim = head_dims(d_model, num_heads, expand_v, "expand_v")
        self.d_model, self.num_heads = d_model, num_heads
        self.decay_min = check_open_unit("decay_min", 1 - 2**-5 if decay_min is None else decay_min)
        self.decay_max = check_open_unit(
            "decay_max", 1 - 2.0 ** -(4 + num_heads) if decay_max is None else decay_max
        )
        self.rotary = check_bool("rotary", rotary)
        if rotary and self.head_k_dim % 2:
            raise ValueError(f"rotary=True needs an even key head dim, got {self.head_k_dim}")
        self.use_output_gate = check_bool("use_output_gate", use_output_gate)
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        self.scale = self.head_k_dim**-0.5
        key_dim, value_dim = num_heads * self.head_k_dim, num_heads * self.head_v_dim
        self.q_proj = nn.Linear(d_model, key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, value_dim, bias=False)
        self.g_proj = nn.Linear(d_model, value_dim, bias=False) if use_output_gate else None
        self.o_proj = nn.Linear(value_dim, d_model, bias=False)
        self.o_norm = RMSNorm(self.head_v_dim, eps=check_positive_float("norm_eps", norm_eps))
        self.decay_logit = nn.Parameter(torch.empty(num_heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform projections (gain ``2 ** -2.5``), decays from the current spectrum setting."""
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.o_proj):
            if lin is not None:
                nn.init.xavier_uniform_(lin.weight, gain=2**-2.5)
        self.o_norm.reset_parameters()
        self._init_decays()

    @torch.no_grad()
    def _init_decays(self) -> None:
        gamma = decay_spectrum(self.num_heads, self.decay_min, self.decay_max)
        self.decay_logit.copy_(torch.log(gamma) - torch.log1p(-gamma))

    @property
    def decays(self) -> Tensor:
        """Per-head decays ``gamma_h`` (``[H]``)."""
        return torch.sigmoid(self.decay_logit)

    def init_search_space(self) -> dict[str, list[float]]:
        """Candidate decay spectra for the ESS-guided initializer; each list starts with the current value."""
        cands = {
            "decay_min": [self.decay_min, 0.5, 0.75, 0.9, 0.97],
            "decay_max": [self.decay_max, 0.99, 0.999, 0.9999],
        }
        return {name: list(dict.fromkeys(vals)) for name, vals in cands.items()}

    def apply_init(self, *, decay_min: float | None = None, decay_max: float | None = None) -> None:
        """Re-initialize the decays in place from ``decay_min``/``decay_max`` (either may be omitted)."""
        for name, value in (("decay_min", decay_min), ("decay_max", decay_max)):
            if value is not None:
                setattr(self, name, check_open_unit(name, value))
        self._init_decays()

    def features(self, x: Tensor) -> dict[str, Tensor]:
        """q, k ``[B, H, L, d_k]`` (rotated if ``rotary``), v ``[B, H, L, d_v]``, log-decays ``[H]``."""
        q = split_heads(self.q_proj(x), self.num_heads)
        k = split_heads(self.k_proj(x), self.num_heads)
        if self.rotary:
            q, k = rotary_embedding(q), rotary_embedding(k)
        v = split_heads(self.v_proj(x), self.num_heads)
        return {"q": q, "k": k, "v": v, "log_decay": F.logsigmoid(self.decay_logit).to(k.dtype)}

    def operator(self, x: Tensor) -> OperatorView:
        f = self.features(x)
        q, k, v = f["q"], f["k"], f["v"]
        c = q * self.scale
        y = chunk_decayed_linear_attention(c, k, v, f["log_decay"], chunk_size=self.chunk_size)
        a = f["log_decay"].exp()[None, :, None, None].expand(k.shape)  # a view: no [B, H, L, d_k] copy
        return OperatorView(op=RecurrentOperator(a, k, c, validate=False), u=v, y=y)

    def readout(self, view: OperatorView, x: Tensor) -> Tensor:
        return gated_head_readout(view.y, x, self.o_norm, self.g_proj, self.o_proj, self.num_heads)

    def state_size(self, seq_len: int) -> StateSize:
        return matrix_state_size(self.num_heads, self.head_k_dim, self.head_v_dim, seq_len)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_heads={self.num_heads}, "
            f"d_k={self.head_k_dim}, d_v={self.head_v_dim}, "
            f"decay_min={self.decay_min:.6g}, decay_max={self.decay_max:.6g}, rotary={self.rotary}"
        )
