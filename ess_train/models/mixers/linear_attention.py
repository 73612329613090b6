"""Causal multi-head linear attention (identity, elu+1 or 2nd-order Taylor features) as an :class:`ESSMixer`.

``y_t = phi(q_t)^T S_t / z_t`` with ``S_t = sum_{s <= t} phi(k_s) v_s^T`` and, when ``normalize``, the
denominator ``z_t = phi(q_t) . sum_{s <= t} phi(k_s) + eps`` (else ``z_t = 1 / scale``). Given ``x`` this is
linear in ``v``: per head a :class:`RecurrentOperator` with ``a = 1``, ``b_s = phi(k_s)``,
``c_t = phi(q_t) / z_t`` (``z_t`` is part of the featurization), state size ``N = d'``
(feature dim after the map).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ess_train.checks import check_bool, check_choice, check_positive_float, check_positive_int
from ess_train.ess import RecurrentOperator
from ess_train.models.mixers.parts import RMSNorm, head_dims, matrix_state_size, merge_heads, split_heads
from ess_train.models.ops import chunk_linear_attention
from ess_train.models.protocol import ESSMixer, OperatorView, StateSize

__all__ = ["LinearAttention", "FEATURE_MAPS", "taylor_features"]

FEATURE_MAPS = ("identity", "elu", "taylor")


def taylor_features(x: Tensor) -> Tensor:
    """Second-order Taylor features of ``exp(q . k / sqrt(f))`` (Based), symmetric part only.

    ``phi(q) . phi(k) = 1 + s + s^2 / 2`` with ``s = q . k / sqrt(f)``;
    ``x: [..., f] -> [..., 1 + f + f (f + 1) / 2]`` (the ``x (x) x`` block keeps the ``i <= j`` entries,
    weighted so the kernel is exact: the cheapest exact form).
    """
    f = x.shape[-1]
    i, j = torch.triu_indices(f, f, device=x.device)
    # weights in x's dtype (python-scalar where() would round 1/sqrt(2) to float32 first)
    w = torch.where(i == j, x.new_tensor(2**-0.5), x.new_tensor(1.0)) / math.sqrt(f)
    return torch.cat([torch.ones_like(x[..., :1]), x / f**0.25, x[..., i] * x[..., j] * w], dim=-1)


def feature_dim_after(feature_map: str, f: int) -> int:
    """State size ``N`` of one head for a feature map applied to ``f``-dim queries/keys."""
    return 1 + f + f * (f + 1) // 2 if feature_map == "taylor" else f


class LinearAttention(ESSMixer):
    """Causal multi-head linear attention.

    Args:
        d_model: model width; values and output use ``d_model // num_heads`` per head.
        num_heads: number of heads; must divide ``d_model``.
        feature_map: ``"identity"``, ``"elu"`` (elu + 1) or ``"taylor"`` (Based's 2nd-order Taylor of exp).
        feature_dim: per-head query/key width before the feature map (default ``d_model // num_heads``;
            Based uses 16).
        normalize: divide by the running denominator ``phi(q_t) . sum phi(k_s)``; needs a positive feature map
            (``elu`` or ``taylor``). Without it, identity/elu outputs are scaled by ``1 / sqrt(feature_dim)``.
        eps: added to the denominator.
        chunk_size: chunk length of the fast forward.
        norm_eps: epsilon of the per-head output RMSNorm.

    TSS: ``heads * d' * d_v`` (``d'`` = feature dim after the map); with ``normalize`` the recurrence also
    carries the running key sum (``heads * d'`` numbers) that only rescales ``c_t``; it is not counted.
    Per operator: ``min(d', L // 2)``; multiplicity ``d_v``.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int = 1,
        feature_map: str = "elu",
        feature_dim: int | None = None,
        normalize: bool = True,
        eps: float = 1e-6,
        chunk_size: int = 64,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.head_dim = head_dims(d_model, num_heads)
        self.d_model, self.num_heads = d_model, num_heads
        self.feature_map = check_choice("feature_map", feature_map, FEATURE_MAPS)
        self.feature_dim = (
            self.head_dim if feature_dim is None else check_positive_int("feature_dim", feature_dim)
        )
        self.normalize = check_bool("normalize", normalize)
        if normalize and feature_map == "identity":
            raise ValueError(
                "normalize=True needs a positive feature map (feature_map='elu' or 'taylor'); "
                "feature_map='identity' can make the denominator vanish"
            )
        self.eps = check_positive_float("eps", eps)
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        self.state_dim = feature_dim_after(feature_map, self.feature_dim)
        self.scale = 1.0 if feature_map == "taylor" else self.feature_dim**-0.5
        qk_width = num_heads * self.feature_dim
        self.q_proj = nn.Linear(d_model, qk_width, bias=False)
        self.k_proj = nn.Linear(d_model, qk_width, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_norm = RMSNorm(self.head_dim, eps=check_positive_float("norm_eps", norm_eps))
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform projections with gain ``2 ** -2.5`` (fla's linear-attention init), unit norm."""
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.xavier_uniform_(lin.weight, gain=2**-2.5)
        self.o_norm.reset_parameters()

    def _phi(self, x: Tensor) -> Tensor:
        if self.feature_map == "elu":
            return torch.nn.functional.elu(x) + 1.0
        if self.feature_map == "taylor":
            return taylor_features(x)
        return x

    def features(self, x: Tensor) -> dict[str, Tensor]:
        """Feature-mapped queries/keys ``[B, H, L, d']`` and values ``[B, H, L, d_v]``."""
        q = self._phi(split_heads(self.q_proj(x), self.num_heads))
        k = self._phi(split_heads(self.k_proj(x), self.num_heads))
        return {"q": q, "k": k, "v": split_heads(self.v_proj(x), self.num_heads)}

    def operator(self, x: Tensor) -> OperatorView:
        f = self.features(x)
        q, k, v = f["q"], f["k"], f["v"]
        if self.normalize:
            ones = torch.ones_like(v[..., :1])
            out = chunk_linear_attention(q, k, torch.cat([v, ones], dim=-1), chunk_size=self.chunk_size)
            z = out[..., -1:] + self.eps
            y, c = out[..., :-1] / z, q / z
        else:
            c = q * self.scale
            y = chunk_linear_attention(c, k, v, chunk_size=self.chunk_size)
        a = torch.ones((), dtype=k.dtype, device=k.device).expand(k.shape)
        return OperatorView(op=RecurrentOperator(a, k, c, validate=False), u=v, y=y)

    def readout(self, view: OperatorView, x: Tensor) -> Tensor:
        return self.o_proj(merge_heads(self.o_norm(view.y)))

    def state_size(self, seq_len: int) -> StateSize:
        N = self.state_dim
        return matrix_state_size(self.num_heads, N, self.head_dim, seq_len)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_heads={self.num_heads}, feature_map={self.feature_map!r}, "
            f"feature_dim={self.feature_dim}, state_dim={self.state_dim}, normalize={self.normalize}"
        )
