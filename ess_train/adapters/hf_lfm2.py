"""LFM2's ``Lfm2ShortConv``: a gated causal depthwise convolution, its operator rebuilt from the parameters.

The mixer computes ``B, C, x = in_proj(h)`` (thirds, per channel) and ``y = C * conv(B * x)`` with a short
causal depthwise ``conv`` (``k = conv_L_cache`` taps, no activation), then ``out_proj(y)``. Per channel ``d``
the map from ``x`` to ``y`` is the gated convolution ``T[t, s] = C_t w_{t-s} B_s`` (``0 <= t - s < k``): a
:class:`~ess_train.ess.ShiftRegisterOperator` with gates ``g_in = B``, ``g_out = C`` (``k`` slots, the last
``k - 1`` carried between steps). The conv bias (``C * bias``, when ``conv_bias``) and ``out_proj`` stay
outside. A keyword-aware pre-hook rebuilds it from the mixer's input; the exactness check compares
``out_proj(T x + C bias)`` with the mixer's output.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ess_train.adapters.hf_mamba import SSMAdapter, refuse_ssm_call
from ess_train.ess import ShiftRegisterOperator, compute_dtype
from ess_train.models.protocol import OperatorView, StateSize

__all__ = ["Lfm2ShortConvAdapter"]


class Lfm2ShortConvAdapter(SSMAdapter):
    """``Lfm2ShortConv``: one gated FIR operator per channel; TSS ``hidden * (k - 1)``, per operator
    ``min(k - 1, L // 2)``, multiplicity 1."""

    kind = "gated_short_conv"

    @property
    def kernel_size(self) -> int:
        return int(self.module.conv.kernel_size[0])

    def state_size(self, seq_len: int) -> StateSize:
        k1 = self.kernel_size - 1
        channels = int(self.module.conv.out_channels)
        return StateSize(total=channels * k1, per_operator=min(k1, seq_len // 2), multiplicity=1)

    def prepare(self, name: str, args: tuple, kwargs: dict[str, Any]) -> Tensor:
        x = args[0] if args else kwargs["hidden_states"]
        refuse_ssm_call(name, self.module, x, kwargs, getter="get_conv_state")
        return x

    def build(self, x: Tensor) -> tuple[OperatorView, dict[str, Tensor]]:
        m = self.module
        Bsz, L, _ = x.shape
        dtype = compute_dtype(x.dtype)
        B, C, xs = m.in_proj(x).transpose(1, 2).chunk(3, dim=1)  # [batch, D, L] each
        taps = m.conv.weight[:, 0, :].flip(-1).to(dtype)  # [D, k]: taps[:, j] on lag j
        op = ShiftRegisterOperator(taps, Bsz, L, g_in=B.to(dtype), g_out=C.to(dtype))
        u = xs.to(dtype)
        return OperatorView(op=op, u=u, y=None), {"C": C}  # type: ignore[arg-type]

    def readout(self, y: Tensor, parts: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        m = self.module
        if m.conv.bias is not None:
            y = y + parts["C"].to(y.dtype) * m.conv.bias.to(y.dtype)[:, None]
        return m.out_proj(y.transpose(1, 2).to(dtype))
