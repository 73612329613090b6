"""RecurrentGemma's (Griffin's) ``RecurrentGemmaRecurrentBlock``: conv1d then RG-LRU, as one exact operator.

The block computes ``v = linear_x(h)``, a short causal depthwise ``conv_1d`` of ``v`` (``k = conv1d_width``
taps, a bias, **no activation**), then the RG-LRU on the conv output ``w``: gates ``i_t, r_t = sigmoid(...)``
of ``w`` (block-diagonal per head), ``a_t = exp(-8 r_t softplus(Lambda))``, ``h_t = a_t h_{t-1} + g_t w_t``
with ``g_t = i_t sqrt(1 - a_t^2)`` (``g_0 = i_0``: the reset at position 0), and the output
``linear_out(h * gelu(linear_y(h)))``. Both the conv and the recurrence mix along time and nothing
nonlinear sits between them, so the map ``v -> h`` (gates given) is one causal operator per channel,
``T = T_lru diag(g) T_conv``: a :class:`~ess_train.ess.RecurrentOperator` with full transitions on
``k`` slots ``[h_t, v_t, ..., v_{t-k+2}]`` (``A_t`` row 0 ``[a_t, g_t w_1, ..., g_t w_{k-1}]``, a shift below;
``b_t = [g_t w_0, 1, 0, ...]``, ``c = e_0``). That is the block's cache: ``k - 1`` conv slots and one
recurrent state per channel. The conv bias's response (``T_lru (g bias)``, affine), the output gate and
``linear_out`` stay outside the operator.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ess_train.adapters.base import CaptureError
from ess_train.adapters.hf_mamba import SSMAdapter
from ess_train.ess import RecurrentOperator, compute_dtype
from ess_train.models.protocol import OperatorView, StateSize

__all__ = ["RecurrentGemmaBlockAdapter"]


class RecurrentGemmaBlockAdapter(SSMAdapter):
    """``RecurrentGemmaRecurrentBlock``: TSS ``lru_width * k``, per operator ``min(k, L // 2)``,
    multiplicity 1 (one operator per LRU channel)."""

    kind = "rg_lru"

    @property
    def kernel_size(self) -> int:
        return int(self.module.conv_1d.kernel_size[0])

    def state_size(self, seq_len: int) -> StateSize:
        k = self.kernel_size
        return StateSize(
            total=int(self.module.lru_width) * k, per_operator=min(k, seq_len // 2), multiplicity=1
        )

    def prepare(self, name: str, args: tuple, kwargs: dict[str, Any]) -> Tensor:
        x = args[0] if args else kwargs["input_states"]
        pos = args[1] if len(args) > 1 else kwargs.get("position_ids")
        cls = type(self.module).__name__
        if not isinstance(pos, Tensor) or pos.dim() != 2 or pos.shape[-1] != x.shape[1]:
            raise CaptureError(f"layer {name!r} ({cls}): called without position_ids of shape [batch, L]")
        if bool((pos[:, 0] != 0).any()):
            raise CaptureError(
                f"layer {name!r} ({cls}): the call does not start at position 0 and continues from a cached "
                "state (generation); ESS capture measures prefill forwards from a zero state: use_cache=False"
            )
        if bool((pos[:, 1:] == 0).any()):
            raise CaptureError(
                f"layer {name!r} ({cls}): position_ids restart inside a row (packed sequences), which resets "
                "the recurrence; measure one sequence per row"
            )
        mask = args[2] if len(args) > 2 else kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 4:  # the block gets the attention's 4D mask only
            diag = mask.diagonal(dim1=-2, dim2=-1)
            if not bool((diag if mask.dtype == torch.bool else diag == 0).all()):
                raise CaptureError(
                    f"layer {name!r} ({cls}): ESS capture refuses padded batches (the mask hides tokens from "
                    "themselves: padding); measure unpadded rows of equal length"
                )
        return x

    def build(self, x: Tensor) -> tuple[OperatorView, dict[str, Tensor]]:
        m, r = self.module, self.module.rg_lru
        Bsz, L, _ = x.shape
        D, k = int(m.lru_width), self.kernel_size
        dtype = compute_dtype(x.dtype)
        v = m.linear_x(x).transpose(1, 2)  # [B, D, L]: the operator's input
        w = m.conv_1d(v)[..., :L].transpose(1, 2)  # [B, L, D]: the RG-LRU's input (bias included)
        heads, width = r.num_attention_heads, r.block_width
        blocks = w.reshape(Bsz * L, heads, width).permute(1, 0, 2)

        def gate(weight: Tensor, bias: Tensor) -> Tensor:
            res = torch.baddbmm(bias[:, None, :], blocks, weight)
            return torch.sigmoid(res.transpose(0, 1).reshape(Bsz, L, D))

        log_a = -8.0 * gate(r.recurrent_gate_weight, r.recurrent_gate_bias) * F.softplus(r.recurrent_param)
        log_a = log_a.to(dtype)
        a = torch.exp(log_a)
        mult = torch.sqrt(1 - torch.exp(2 * log_a))
        first = torch.zeros(L, dtype=torch.bool, device=x.device)
        first[0] = True
        mult = torch.where(first[None, :, None], torch.ones_like(mult), mult)
        a = torch.where(first[None, :, None], torch.zeros_like(a), a)
        g = gate(r.input_gate_weight, r.input_gate_bias).to(dtype) * mult  # [B, L, D]
        a, g = a.transpose(1, 2), g.transpose(1, 2)  # [B, D, L]
        taps = m.conv_1d.weight[:, 0, :].flip(-1).to(dtype)  # [D, k]: taps[:, j] on lag j
        A = torch.zeros(Bsz, D, L, k, k, dtype=dtype, device=x.device)
        A[..., 0, 0] = a
        A[..., 0, 1:] = g[..., None] * taps[None, :, None, 1:]
        if k > 2:
            idx = torch.arange(2, k, device=x.device)
            A[..., idx, idx - 1] = 1.0
        b = torch.zeros(Bsz, D, L, k, dtype=dtype, device=x.device)
        b[..., 0] = g * taps[None, :, None, 0]
        if k > 1:
            b[..., 1] = 1.0
        c = torch.zeros_like(b)
        c[..., 0] = 1.0
        op = RecurrentOperator(A, b, c)
        return OperatorView(op=op, u=v.to(dtype), y=None), {"a": a, "g": g, "x": x}  # type: ignore[arg-type]

    def readout(self, y: Tensor, parts: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        m = self.module
        a, g = parts["a"], parts["g"]
        if m.conv_1d.bias is not None:  # the bias's response through the recurrence (affine: outside T)
            ones = torch.ones_like(g)[..., None]
            lru = RecurrentOperator(a[..., None], (g * m.conv_1d.bias.to(g.dtype)[:, None])[..., None], ones)
            y = y + lru.apply(torch.ones_like(g))
        gate = m.act_fn(m.linear_y(parts["x"]))
        return m.linear_out((y.transpose(1, 2) * gate.to(y.dtype)).to(dtype))
