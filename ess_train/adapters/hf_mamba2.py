"""Hugging Face ``Mamba2Mixer``: the operator rebuilt from the module's parameters.

As for Mamba (:mod:`ess_train.adapters.hf_mamba`), a keyword-aware pre-hook recomputes from the mixer's
input ``gate, xBC, dt = in_proj(x)``, ``x, B, C = act(conv1d(xBC))`` and
``dt = clamp(softplus(dt + dt_bias), time_step_limit)``. Each head ``h`` has one scalar decay
``a_t = exp(dt_t A_h)`` (``A = -exp(A_log)``) shared by its ``N`` states, ``b = dt B_g``, ``c = C_g`` of its
group ``g``: one diagonal :class:`~ess_train.ess.RecurrentOperator` per head, acting on the head's
``head_dim`` channels. The skip ``D x``, the gated RMS norm and ``out_proj`` stay outside the operator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ess_train.adapters.base import CaptureError
from ess_train.adapters.hf_mamba import SSMAdapter
from ess_train.ess import RecurrentOperator
from ess_train.models.protocol import OperatorView, StateSize

__all__ = ["Mamba2Adapter"]


class Mamba2Adapter(SSMAdapter):
    """``Mamba2Mixer``: state size total ``num_heads * head_dim * N``, per operator (head) ``min(N, L // 2)``,
    multiplicity ``head_dim``."""

    kind = "mamba2"

    def state_size(self, seq_len: int) -> StateSize:
        m = self.module
        N = int(m.ssm_state_size)
        return StateSize(
            total=int(m.num_heads) * int(m.head_dim) * N,
            per_operator=min(N, seq_len // 2),
            multiplicity=int(m.head_dim),
        )

    def build(self, x: Tensor) -> tuple[OperatorView, dict[str, Tensor]]:
        m = self.module
        Bsz, L, _ = x.shape
        H, P, G, N, inner = m.num_heads, m.head_dim, m.n_groups, m.ssm_state_size, m.intermediate_size
        proj = m.in_proj(x)
        if proj.shape[-1] != inner + m.conv_dim + H:
            raise CaptureError(
                f"{type(m).__name__}: in_proj gives {proj.shape[-1]} features, the adapter knows the layout "
                f"gate + xBC + dt = {inner + m.conv_dim + H} (an MLP part or another version); not measured"
            )
        gate, xBC, dt = proj.split([inner, m.conv_dim, H], dim=-1)
        xBC = m.act(m.conv1d(xBC.transpose(1, 2).to(m.conv1d.weight.dtype))[..., :L]).to(x.dtype)
        xs, B, C = torch.split(xBC.transpose(1, 2), [inner, G * N, G * N], dim=-1)
        lo, hi = m.time_step_limit
        dt = torch.clamp(F.softplus(dt + m.dt_bias.to(dt.dtype)), min=lo, max=hi).float()  # [B, L, H]
        A = -torch.exp(m.A_log.float())  # [H]
        a = torch.exp(A * dt).transpose(1, 2)[..., None].expand(Bsz, H, L, N)
        rep = H // G
        B = B.reshape(Bsz, L, G, N).float().repeat_interleave(rep, dim=2)  # [B, L, H, N]
        C = C.reshape(Bsz, L, G, N).float().repeat_interleave(rep, dim=2)
        b = (dt[..., None] * B).transpose(1, 2)  # [B, H, L, N]
        c = C.transpose(1, 2)
        u = xs.reshape(Bsz, L, H, P).float().transpose(1, 2)  # [B, H, L, P]
        op = RecurrentOperator(a, b, c)
        return OperatorView(op=op, u=u, y=None), {"u": u, "gate": gate}  # type: ignore[arg-type]

    def readout(self, y: Tensor, parts: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        m = self.module
        u = parts["u"]
        out = y + m.D.float()[None, :, None, None] * u  # [B, H, L, P]
        Bsz, H, L, P = out.shape
        out = out.transpose(1, 2).reshape(Bsz, L, H * P)
        out = m.norm(out, parts["gate"])
        return m.out_proj(out.to(dtype))
