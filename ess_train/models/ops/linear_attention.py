"""Chunked (gated) linear attention kernels: plain, per-channel data-dependent decay (GLA), constant decay.

:func:`chunk_linear_attention` (linear attention with optional per-channel data-dependent decay, computed
in log space) and :func:`chunk_decayed_linear_attention` (one constant decay per head, RetNet retention).
Both loop over chunks only (never over tokens), upcast half precision to float32 inside and use plain
autograd (no custom backward).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ess_train.models.ops.utils import chunk_plan, kernel_dtype, pad_len, round_up

__all__ = ["chunk_linear_attention", "chunk_decayed_linear_attention", "sub_chunk_for"]


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
    C = min(chunk_size, round_up(L, c))
    Lp = round_up(L, C)
    n = Lp // C
    out_dtype = v.dtype
    tensors = (q, k, v) if log_gate is None else (q, k, v, log_gate)
    dtype = kernel_dtype(*tensors)
    q, k, v = (pad_len(x.to(dtype), Lp - L).reshape(*lead, n, C, x.shape[-1]) for x in (q, k, v))
    kt = k.transpose(-1, -2)

    if log_gate is None:
        y = (q @ kt).tril_() @ v
        kv = kt @ v  # [..., n, dk, dv]
        S = torch.cat([torch.zeros_like(kv[..., :1, :, :]), kv[..., :-1, :, :].cumsum(-3)], dim=-3)
        y = y + q @ S
    else:
        # padded gates are 0 (no decay): padded tokens have k = 0, so they add nothing
        g = pad_len(log_gate.to(dtype), Lp - L)
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
    out_dtype, dtype = v.dtype, kernel_dtype(q, k, v, log_decay)
    C, Lp, n = chunk_plan(L, chunk_size)
    q, k, v = (pad_len(x.to(dtype), Lp - L).reshape(*lead, n, C, x.shape[-1]) for x in (q, k, v))
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
