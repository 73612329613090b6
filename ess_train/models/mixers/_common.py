"""Shared helpers of the attention-family mixers.

- argument checks that raise ``ValueError`` naming the argument (Hydra passes plain keywords);
- head split/merge, an RMSNorm over the last dim, rotary position embedding;
- the fast forwards: :func:`chunk_linear_attention` (linear attention with optional per-channel
  data-dependent decay, computed in log space) and :func:`chunk_delta_rule` (the chunkwise delta rule).

Both kernels loop over chunks only (never over tokens) and upcast half precision to float32 inside.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ess_train.checks import (
    check_bool,
    check_choice,
    check_open_unit,
    check_positive_float,
    check_positive_int,
)

__all__ = [
    "check_positive_int",
    "check_positive_float",
    "check_bool",
    "check_choice",
    "check_open_unit",
    "head_dims",
    "split_heads",
    "merge_heads",
    "gated_head_readout",
    "RMSNorm",
    "rotary_embedding",
    "chunk_linear_attention",
    "chunk_decayed_linear_attention",
    "chunk_delta_rule",
    "sub_chunk_for",
]


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


# ----------------------------------------------------------------------------------------------------
# chunked kernels
def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _kernel_dtype(*xs: Tensor) -> torch.dtype:
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _pad_len(x: Tensor, pad: int) -> Tensor:
    """Zero-pad dim -2 (sequence) of ``[..., L, d]`` at the end."""
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def sub_chunk_for(chunk_size: int) -> int:
    """Sub-chunk length paired with ``chunk_size`` in :func:`chunk_linear_attention` (16 when it divides)."""
    return 16 if chunk_size % 16 == 0 else chunk_size


def chunk_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_gate: Tensor | None = None,
    *,
    chunk_size: int = 64,
    sub_chunk_size: int = 16,
) -> Tensor:
    """Causal (gated) linear attention, chunkwise.

    ``y_t = sum_{s <= t} (q_t * exp(G_t - G_s)) . k_s  v_s`` with ``G_t = sum_{r <= t} log_gate_r``, i.e. the
    recurrence ``S_t = diag(exp(log_gate_t)) S_{t-1} + k_t v_t^T``, ``y_t = S_t^T q_t``. Without
    ``log_gate`` there is no decay (plain linear attention).

    Args:
        q, k: ``[..., L, d_k]``; v: ``[..., L, d_v]``;
        log_gate: ``[..., L, d_k]`` with entries ``<= 0``, or None.
        chunk_size: tokens per chunk (a recurrent state is carried across chunks, a Python loop over chunks).
        sub_chunk_size: within a chunk, decays between different sub-chunks are factored through the
            start of the query's sub-chunk (both factors ``<= 1``); within a sub-chunk they are computed
            pairwise as ``exp(G_t - G_s)`` (subtraction before ``exp``): nothing overflows whatever the gates.

    Returns ``y: [..., L, d_v]`` in ``v``'s dtype.
    """
    L = q.shape[-2]
    lead = q.shape[:-2]
    dv = v.shape[-1]
    if L == 0:
        return v.new_zeros(v.shape)
    c = min(sub_chunk_size, chunk_size)
    if chunk_size % c:
        raise ValueError(f"chunk_size={chunk_size} must be a multiple of sub_chunk_size={sub_chunk_size}")
    C = min(chunk_size, _round_up(L, c))
    Lp = _round_up(L, C)
    n = Lp // C
    out_dtype = v.dtype
    tensors = (q, k, v) if log_gate is None else (q, k, v, log_gate)
    dtype = _kernel_dtype(*tensors)
    q, k, v = (_pad_len(x.to(dtype), Lp - L).reshape(*lead, n, C, x.shape[-1]) for x in (q, k, v))
    kt = k.transpose(-1, -2)

    if log_gate is None:
        y = (q @ kt).tril_() @ v
        kv = kt @ v  # [..., n, dk, dv]
        S = torch.cat([torch.zeros_like(kv[..., :1, :, :]), kv[..., :-1, :, :].cumsum(-3)], dim=-3)
        y = y + q @ S
    else:
        # padded gates are 0 (no decay): padded tokens have k = 0, so they add nothing
        g = _pad_len(log_gate.to(dtype), Lp - L)
        fast, G = _fast_chunk_for(g, C, c, _factor_bound(dtype))  # G: local cumsums, non-increasing
        if fast is not None and fast != C:  # smaller chunks keep the factored exponents bounded
            C, n = fast, Lp // fast
            q, k, v = (x.reshape(*lead, n, C, x.shape[-1]) for x in (q, k, v))
        G_end = G[..., -1:, :]  # [..., n, 1, dk]
        if fast is not None:
            # q * exp(G) = q_f * exp(G_mid), k * exp(G_end - G) = k_f * exp(G_end - G_mid): exponents <= 0
            q_f, k_f, G_mid = _factored(q, k, G)
            y = (q_f @ k_f.transpose(-1, -2)).tril_() @ v  # in place: 4x cheaper than masked_fill_
            q_in, k_out = q_f * torch.exp(G_mid), k_f * torch.exp(G_end - G_mid)
        else:
            y = _intra_chunk_gated(q, k, G, c) @ v
            q_in, k_out = q * torch.exp(G), k * torch.exp(G_end - G)
        if n > 1:
            kv = k_out.transpose(-1, -2) @ v  # [..., n, dk, dv]: each chunk's own contribution at its end
            decay = torch.exp(G_end).transpose(-1, -2)  # [..., n, dk, 1]
            S = torch.zeros_like(kv[..., 0, :, :])
            states = [S]
            for i in range(n - 1):
                S = torch.addcmul(kv[..., i, :, :], decay[..., i, :, :], S)
                states.append(S)
            y += q_in @ torch.stack(states, dim=-3)
    return y.reshape(*lead, Lp, dv)[..., :L, :].to(out_dtype)


def chunk_decayed_linear_attention(
    q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, *, chunk_size: int = 64
) -> Tensor:
    """Linear attention with a constant decay per head (RetNet retention), chunkwise, all matmuls.

    ``y_t = sum_{s <= t} gamma^(t - s) (q_t . k_s) v_s``, i.e. :func:`chunk_linear_attention` with
    ``log_gate = log gamma`` at every step and channel, without any ``[C, C, d_k]`` decay tensor: within a
    chunk ``y = ((q k^T) * D) v`` with ``D[t, s] = gamma^(t - s)`` (``s <= t``, a ``[C, C]`` matrix per head);
    the states entering the chunks are ``S_j = sum_{i < j} gamma^(C (j - 1 - i)) kv_i`` (an ``[n, n]`` matrix
    per head, one matmul). Every exponent is ``<= 0``: nothing overflows whatever the decay.

    Args:
        q, k: ``[..., L, d_k]``; v: ``[..., L, d_v]``;
        log_decay: ``log gamma <= 0``, shape broadcastable to ``q.shape[:-2]`` (e.g. ``[H]`` for ``[B, H]``).
        chunk_size: tokens per chunk.

    Returns ``y: [..., L, d_v]`` in ``v``'s dtype.
    """
    L = q.shape[-2]
    lead = q.shape[:-2]
    dk, dv = q.shape[-1], v.shape[-1]
    if L == 0:
        return v.new_zeros(v.shape)
    out_dtype = v.dtype
    dtype = _kernel_dtype(q, k, v, log_decay)
    C = min(chunk_size, L)
    Lp = _round_up(L, C)
    n = Lp // C
    q, k, v = (_pad_len(x.to(dtype), Lp - L).reshape(*lead, n, C, x.shape[-1]) for x in (q, k, v))
    lg = log_decay.to(dtype)
    lg = lg.reshape(*lg.shape, 1, 1)  # [..., 1, 1] against [..., C, C] (or [..., n, n])
    pos = torch.arange(C, device=q.device, dtype=dtype)
    diff = pos[:, None] - pos[None, :]  # t - s
    causal = diff >= 0
    D = torch.exp(lg * diff.clamp_min(0)) * causal  # [..., C, C]
    y = ((q @ k.transpose(-1, -2)) * D[..., None, :, :]) @ v
    if n > 1:
        # decay from each key to its chunk's end, and from each chunk start to each query
        to_end = torch.exp(lg[..., 0] * (C - 1 - pos))[..., None, :, None]  # [..., 1, C, 1]
        from_start = torch.exp(lg[..., 0] * (pos + 1))[..., None, :, None]  # [..., 1, C, 1]
        kv = (k * to_end).transpose(-1, -2) @ v  # [..., n, dk, dv]
        j = torch.arange(n, device=q.device, dtype=dtype)
        steps = j[:, None] - 1 - j[None, :]  # S_j collects kv_i, i < j, decayed C * (j - 1 - i) steps
        W = torch.exp(lg * C * steps.clamp_min(0)) * (steps >= 0)  # [..., n, n]
        S = (W @ kv.reshape(*kv.shape[:-2], dk * dv)).reshape(kv.shape)  # [..., n, dk, dv]
        y = y + (q * from_start) @ S
    return y.reshape(*lead, Lp, dv)[..., :L, :].to(out_dtype)


def _factor_bound(dtype: torch.dtype) -> float:
    """Largest ``|exponent|`` of one factor in the factored intra-chunk decays (float32: ``e^30 ~ 1e13``)."""
    return 300.0 if dtype == torch.float64 else 30.0


def _fast_chunk_for(g: Tensor, C: int, c: int, bound: float) -> tuple[int | None, Tensor]:
    """The largest chunk ``C' in {C, C/2, ...}`` (``C'`` a multiple of ``c``, dividing the padded length) for
    which :func:`_factored` is safe: ``|G_t - G_mid| <= bound`` in every chunk, and the local cumulative
    gates ``G: [..., Lp / C', C', dk]`` of that chunking. None (with ``G`` at the original ``C``): none is
    (very strong gates), use the pairwise path. ``g: [..., Lp, dk]`` log-gates (``Lp`` a multiple of ``C``).
    """
    *lead, Lp, dk = g.shape
    G_first = None
    while True:
        G = g.reshape(*lead, Lp // C, C, dk).cumsum(-2)
        G_first = G if G_first is None else G_first
        span = (G[..., :1, :] - G[..., C // 2 : C // 2 + 1, :]).abs().amax()
        span = torch.maximum(span, (G[..., C // 2 : C // 2 + 1, :] - G[..., -1:, :]).abs().amax())
        if bool(span <= bound):  # (one check over the whole batch: a single sync)
            return C, G
        half = C // 2
        if half < 8 or half % c or Lp % half:
            return None, G_first
        C = half


def _factored(q: Tensor, k: Tensor, G: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """fla's ``chunk_gla`` factoring of the intra-chunk decays: ``(q_f, k_f, G_mid)``.

    ``exp(G_t - G_s) = exp(G_t - G_mid) exp(G_mid - G_s)`` with ``G_mid`` the chunk's middle row, so that the
    intra-chunk scores ``sum_d q_td k_sd exp(G_td - G_sd)`` are ``tril(q_f @ k_f^T)`` with
    ``q_f = q * exp(G - G_mid)``, ``k_f = k * exp(G_mid - G)``: one matmul, no ``[C, C, d_k]`` tensor. Each
    factor is at most ``exp(span)`` (bounded by :func:`_fast_chunk_for`), their product for ``s <= t`` at
    most 1. ``G_mid`` cancels exactly, so it is detached (its gradient is exactly 0): no output depends, even
    numerically, on a later token's gate.
    """
    C = G.shape[-2]
    G_mid = G[..., C // 2 : C // 2 + 1, :].detach()
    e = G - G_mid
    return q * e.exp(), k * torch.exp(-e), G_mid


def _intra_chunk_gated(q: Tensor, k: Tensor, G: Tensor, c: int) -> Tensor:
    """Intra-chunk matrix ``A[t, s] = sum_d q_td k_sd exp(G_td - G_sd)`` for ``s <= t``, 0 above.

    ``q, k, G: [..., n, C, dk]`` with ``C`` a multiple of ``c``; returns ``[..., n, C, C]``.
    """
    *lead, C, dk = q.shape
    ns = C // c
    qs, ks, Gs = (x.reshape(*lead, ns, c, dk) for x in (q, k, G))
    # diagonal sub-blocks, pairwise: exp(G_t - G_s) with the difference taken before exp
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    diff = (Gs[..., :, None, :] - Gs[..., None, :, :]).masked_fill(~causal[..., None], float("-inf"))
    A_diag = (qs[..., :, None, :] * ks[..., None, :, :] * diff.exp()).sum(-1)  # [..., ns, c, c]
    if ns == 1:
        return A_diag.reshape(*lead, C, C)
    # off-diagonal: query sub-chunk i >= 1, keys s < i * c, through the reference G_ref = G[i * c - 1]
    G_ref = Gs[..., :-1, -1, :]  # [..., ns - 1, dk]
    q_off = qs[..., 1:, :, :] * torch.exp(Gs[..., 1:, :, :] - G_ref[..., None, :])  # [..., ns-1, c, dk]
    pos = torch.arange(C, device=q.device)
    valid = pos[None, :] < (torch.arange(1, ns, device=q.device)[:, None] * c)  # [ns - 1, C]
    expo = (G_ref[..., :, None, :] - G[..., None, :, :]).masked_fill(~valid[..., None], float("-inf"))
    k_off = k[..., None, :, :] * expo.exp()  # [..., ns - 1, C, dk]
    A_off = q_off @ k_off.transpose(-1, -2)  # [..., ns - 1, c, C]
    A = torch.cat([torch.zeros_like(A_off[..., :1, :, :]), A_off], dim=-3).reshape(*lead, ns, c, ns, c)
    eye = torch.eye(ns, dtype=A.dtype, device=A.device)
    A = A + A_diag[..., :, :, None, :] * eye[:, None, :, None]
    return A.reshape(*lead, C, C)


def chunk_delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, *, chunk_size: int = 64) -> Tensor:
    """Delta rule, chunkwise (WY/UT form).

    ``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``y_t = S_t^T q_t``.

    Within a chunk, ``U = M^{-1} (beta V)``, ``W = M^{-1} (beta K)`` with
    ``M = I + tril(diag(beta) K K^T, -1)`` (a unit lower-triangular solve); across chunks the state ``S`` is
    carried (a Python loop over chunks).

    Args: q, k ``[..., L, d_k]``; v ``[..., L, d_v]``; beta ``[..., L]``. Returns ``y: [..., L, d_v]``.
    """
    L = q.shape[-2]
    lead = q.shape[:-2]
    dk, dv = q.shape[-1], v.shape[-1]
    if L == 0:
        return v.new_zeros(v.shape)
    out_dtype = v.dtype
    dtype = _kernel_dtype(q, k, v, beta)
    C = min(chunk_size, L)
    Lp = _round_up(L, C)
    n = Lp // C
    # padded tokens: beta = 0, k = 0 -> identity transition, no input
    beta = F.pad(beta.to(dtype), (0, Lp - L)).reshape(*lead, n, C, 1)
    q, k, v = (_pad_len(x.to(dtype), Lp - L).reshape(*lead, n, C, x.shape[-1]) for x in (q, k, v))
    kb, vb = k * beta, v * beta
    kt = k.transpose(-1, -2)
    eye = torch.eye(C, dtype=dtype, device=q.device)
    M = (kb @ kt).tril_(-1) + eye
    W = torch.linalg.solve_triangular(M, kb, upper=False, unitriangular=True)
    U = torch.linalg.solve_triangular(M, vb, upper=False, unitriangular=True)
    A_qk = (q @ kt).tril_()
    S = q.new_zeros(*lead, dk, dv)
    outs = []
    for i in range(n):
        u_i = U[..., i, :, :] - W[..., i, :, :] @ S
        outs.append(q[..., i, :, :] @ S + A_qk[..., i, :, :] @ u_i)
        S = S + kt[..., i, :, :] @ u_i
    y = torch.stack(outs, dim=-3).reshape(*lead, Lp, dv)[..., :L, :]
    return y.to(out_dtype)
