"""Small layer pieces shared by the attention-family mixers (and the backbone's RMSNorm).

Head split/merge and their width check, the state size of matrix-state heads, an RMSNorm over the last
dim, the fla-style gated head readout, rotary position embedding. The chunked kernels live in
:mod:`ess_train.models.ops`, the argument checks in :mod:`ess_train.checks`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ess_train.checks import check_positive_float, check_positive_int
from ess_train.models.protocol import StateSize

__all__ = [
    "head_dims",
    "split_heads",
    "merge_heads",
    "gated_head_readout",
    "RMSNorm",
    "rotary_embedding",
    "matrix_state_size",
]


def matrix_state_size(num_heads: int, d_k: int, d_v: int, seq_len: int) -> StateSize:
    """State size of heads with a ``d_k x d_v`` matrix state (linear attention, GLA, DeltaNet, ...): TSS
    ``heads d_k d_v``; one operator per head and value channel, bounded by ``min(d_k, L // 2)``."""
    return StateSize(total=num_heads * d_k * d_v, per_operator=min(d_k, seq_len // 2), multiplicity=d_v)


def head_dims(d_model: Any, num_heads: Any, expand: Any = 1.0, expand_name: str = "expand") -> int:
    """Per-head dim of a projection of width ``int(d_model * expand)`` split over ``num_heads``."""
    check_positive_int("d_model", d_model)
    check_positive_int("num_heads", num_heads)
    check_positive_float(expand_name, expand)
    width = int(d_model * expand)
    if width <= 0 or width % num_heads:
        raise ValueError(
            f"int(d_model * {expand_name}) = {width} (d_model={d_model}, {expand_name}={expand}) must be a "
            f"positive multiple of num_heads={num_heads}"
        )
    return width // num_heads


# ----------------------------------------------------------------------------------------------------
# layout and small modules
def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """``[B, L, H * d] -> [B, H, L, d]``."""
    B, L, D = x.shape
    return x.view(B, L, num_heads, D // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """``[B, H, L, d] -> [B, L, H * d]``."""
    B, H, L, d = x.shape
    return x.transpose(1, 2).reshape(B, L, H * d)


class RMSNorm(nn.Module):
    """RMS normalization over the last dim with a learnable gain (``torch.nn.RMSNorm`` needs torch>=2.4)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(dtype)
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.to(dtype)).to(x.dtype)


def gated_head_readout(
    y: Tensor, x: Tensor, o_norm: nn.Module, g_proj: nn.Module | None, o_proj: nn.Module, num_heads: int
) -> Tensor:
    """fla-style readout of head-wise mixers: per-head norm, optional ``swish(g_proj(x))`` gate, projection.

    ``y: [B, H, L, d_v]`` (the operator's output), ``x: [B, L, d_model]`` (the layer input).
    """
    o = o_norm(y)
    if g_proj is not None:
        o = o * F.silu(split_heads(g_proj(x), num_heads))
    return o_proj(merge_heads(o))


def rotary_embedding(x: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary position embedding (GPT-NeoX half split) of ``x: [..., L, d]`` (``d`` even), position = index.

    ``rotary(q)_t . rotary(k)_s`` depends on ``t - s`` only.
    """
    L, d = x.shape[-2], x.shape[-1]
    dtype = torch.promote_types(x.dtype, torch.float32)
    inv_freq = base ** (-torch.arange(0, d, 2, device=x.device, dtype=dtype) / d)
    angle = torch.arange(L, device=x.device, dtype=dtype)[:, None] * inv_freq[None, :]  # [L, d/2]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., : d // 2].to(dtype), x[..., d // 2 :].to(dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)
