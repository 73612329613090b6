"""Hugging Face Mamba2-style mixers: the operator rebuilt from the module's parameters.

``Mamba2Mixer`` and the hybrids' copies of it (``BambaMixer``, ``GraniteMoeHybridMambaLayer``,
``Zamba2MambaMixer``, ``FalconH1Mixer``). As for Mamba (:mod:`ess_train.adapters.hf_mamba`), a keyword-aware
pre-hook recomputes from the mixer's input ``gate, xBC, dt = in_proj(x)``, ``x, B, C = act(conv1d(xBC))`` and
``dt = clamp(softplus(dt + dt_bias), time_step_limit)``. Each head ``h`` has one scalar decay
``a_t = exp(dt_t A_h)`` (``A = -exp(A_log)``) shared by its ``N`` states, ``b = dt B_g``, ``c = C_g`` of its
group ``g``: one diagonal :class:`~ess_train.ess.RecurrentOperator` per head, acting on the head's
``head_dim`` channels. The skip ``D x``, the gated RMS norm and ``out_proj`` stay outside the operator.

What differs between the copies is parametrized, never copied: :meth:`Mamba2Adapter.project` (Falcon-H1's
muP multipliers on the input and on the projection) and :meth:`Mamba2Adapter.gated_norm` (Falcon-H1's
optional norm). The operator is built in the engine's compute dtype of the module (float64 stays float64,
so that its tolerance-ESS uses the float64 threshold; everything else in float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ess_train.adapters.base import CaptureError
from ess_train.adapters.hf_mamba import SSMAdapter
from ess_train.ess import RecurrentOperator, compute_dtype
from ess_train.models.protocol import OperatorView, StateSize

__all__ = ["Mamba2Adapter", "FalconH1MixerAdapter"]


class Mamba2Adapter(SSMAdapter):
    """``Mamba2Mixer`` and its copies: state size total ``num_heads * head_dim * N``, per operator (head)
    ``min(N, L // 2)``, multiplicity ``head_dim``."""

    kind = "mamba2"

    def state_size(self, seq_len: int) -> StateSize:
        m = self.module
        N = int(m.ssm_state_size)
        return StateSize(
            total=int(m.num_heads) * int(m.head_dim) * N,
            per_operator=min(N, seq_len // 2),
            multiplicity=int(m.head_dim),
        )

    def project(self, x: Tensor) -> Tensor:
        """``in_proj`` of the mixer's input: ``gate | xBC | dt`` on the last dim."""
        return self.module.in_proj(x)

    def gated_norm(self, out: Tensor, gate: Tensor) -> Tensor:
        """The gate and norm between the scan (with its skip) and ``out_proj``."""
        return self.module.norm(out, gate)

    def build(self, x: Tensor) -> tuple[OperatorView, dict[str, Tensor]]:
        m = self.module
        Bsz, L, _ = x.shape
        H, P, G, N, inner = m.num_heads, m.head_dim, m.n_groups, m.ssm_state_size, m.intermediate_size
        dtype = compute_dtype(x.dtype)
        proj = self.project(x)
        if proj.shape[-1] != inner + m.conv_dim + H:
            raise CaptureError(
                f"{type(m).__name__}: in_proj gives {proj.shape[-1]} features, the adapter knows the layout "
                f"gate + xBC + dt = {inner + m.conv_dim + H} (an MLP part or another version); not measured"
            )
        gate, xBC, dt = proj.split([inner, m.conv_dim, H], dim=-1)
        xBC = m.act(m.conv1d(xBC.transpose(1, 2).to(m.conv1d.weight.dtype))[..., :L]).to(x.dtype)
        xs, B, C = torch.split(xBC.transpose(1, 2), [inner, G * N, G * N], dim=-1)
        lo, hi = m.time_step_limit
        dt = torch.clamp(F.softplus(dt + m.dt_bias.to(dt.dtype)), min=lo, max=hi).to(dtype)  # [B, L, H]
        A = -torch.exp(m.A_log.to(dtype))  # [H]
        a = torch.exp(A * dt).transpose(1, 2)[..., None].expand(Bsz, H, L, N)
        rep = H // G
        B = B.reshape(Bsz, L, G, N).to(dtype).repeat_interleave(rep, dim=2)  # [B, L, H, N]
        C = C.reshape(Bsz, L, G, N).to(dtype).repeat_interleave(rep, dim=2)
        b = (dt[..., None] * B).transpose(1, 2)  # [B, H, L, N]
        c = C.transpose(1, 2)
        u = xs.reshape(Bsz, L, H, P).to(dtype).transpose(1, 2)  # [B, H, L, P]
        op = RecurrentOperator(a, b, c)
        return OperatorView(op=op, u=u, y=None), {"u": u, "gate": gate}  # type: ignore[arg-type]

    def readout(self, y: Tensor, parts: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        m = self.module
        u = parts["u"]
        out = y + m.D.to(u.dtype)[None, :, None, None] * u  # [B, H, L, P]
        Bsz, H, L, P = out.shape
        out = out.transpose(1, 2).reshape(Bsz, L, H * P)
        out = self.gated_norm(out, parts["gate"])
        return m.out_proj(out.to(dtype))


class FalconH1MixerAdapter(Mamba2Adapter):
    """``FalconH1Mixer``: Mamba2 after the muP multipliers (``ssm_in_multiplier`` on the input, ``mup_vector``
    on the projection), with the gated norm optional (``mamba_rms_norm``; ``silu(gate)`` without it)."""

    def project(self, x: Tensor) -> Tensor:
        m = self.module
        return m.in_proj(x * m.ssm_in_multiplier) * m.mup_vector

    def gated_norm(self, out: Tensor, gate: Tensor) -> Tensor:
        m = self.module
        return m.norm(out, gate) if m.mamba_rms_norm else out * F.silu(gate)
