"""Mamba's scans: diagonal linear recurrences with explicit (custom autograd) backwards.

- :func:`selective_scan`: all states of ``h_t = exp(log_a_t) h_{t-1} + x_t`` (optionally contracted with
  ``c``), a chunked scan (``O(sqrt(L))`` vectorized steps, :func:`_chunk_scan`) whose backward is the
  adjoint scan (``_SelectiveScan``);
- :func:`mamba_scan`: Mamba's ``y = C . h`` from its factors ``(dt, A, B, C, u)`` in the chunked cumsum
  form, in cache-sized blocks, without ``[b, D, L, N]`` tensors in memory; its backward recomputes each
  block under autograd (``_MambaScan``);
- :func:`exp_nonpositive`: ``exp`` of log-decays, flushing subnormals to 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ess_train.checks import check_positive_int

__all__ = ["selective_scan", "mamba_scan", "exp_nonpositive"]


def exp_nonpositive(x: Tensor) -> Tensor:
    """``exp(x)`` for ``x <= 0``, flushing results below the normal range to 0 (no slow subnormal math).

    Exponents below -80 (float32; -700 in float64) give 0 instead of a value under ``2e-35``: far below
    the precision of anything they are added to, and 10x faster on CPUs where subnormals are slow.
    """
    floor = -700.0 if x.dtype == torch.float64 else -80.0
    return torch.exp(x.clamp_min(floor)).masked_fill(x < floor, 0.0)


def _auto_chunk(L: int) -> int:
    """A power of two near ``sqrt(L)`` in ``[8, 128]``: balances the loops of :func:`_chunk_scan`."""
    return int(min(128, max(8, 2 ** round(math.log2(max(L, 1)) / 2))))


def _chunk_scan(
    a: Tensor, x: Tensor, chunk: int, reverse: bool = False, decay: Tensor | None = None
) -> Tensor:
    """All states of a diagonal linear recurrence along dim ``-2`` of ``[..., L, N]`` tensors (no autograd).

    Forward: ``h_t = a_t h_{t-1} + x_t`` (``h_{-1} = 0``). Reverse (the adjoint):
    ``g_t = a_{t+1} g_{t+1} + x_t`` (``g_L = 0``). The sequence is cut into ``n`` chunks of ``Q``. With
    ``0 <= a <= 1`` (decays ``exp(dt A)`` of log-decays ``dt A <= 0``) every factor and product is
    ``<= 1``: nothing overflows, whatever the step sizes (products may underflow to 0, the exact limit).

    1. local boundary states of every chunk from a zero start, all chunks at once (``Q`` vectorized steps);
    2. the state carried into each chunk, ``carry_j = s_{j-1} + prod(a over chunk j-1) * carry_{j-1}``
       (``n`` small steps);
    3. the states inside every chunk from its carried state, all chunks at once (``Q`` vectorized steps).

    ``2 Q + n`` vectorized steps instead of ``L`` (``Q ~ sqrt(L)``); no ``[L, L]`` or ``[Q, Q, N]`` tensor.
    ``decay [..., n, N]``: each chunk's product of ``a`` (:func:`_chunk_decay`); computed when not given.
    """
    *lead, L, N = x.shape
    if L == 0:
        return x.clone()
    Q = max(1, min(chunk, L))
    pad = (-L) % Q
    if pad:  # padded steps hold x = 0 beyond the sequence: they add nothing in either direction
        a, x = F.pad(a, (0, 0, 0, pad)), F.pad(x, (0, 0, 0, pad))
    n = (L + pad) // Q
    ac, xc = a.reshape(*lead, n, Q, N), x.reshape(*lead, n, Q, N)
    if decay is None and n > 1:
        decay = ac.prod(-2)
    h = torch.empty_like(xc)
    if not reverse:
        if n > 1:
            s = xc[..., :-1, 0, :].clone()  # local end states of chunks 0..n-2
            for q in range(1, Q):
                s = torch.addcmul(xc[..., :-1, q, :], ac[..., :-1, q, :], s)
            carry = torch.zeros_like(xc[..., 0, :])  # [..., n, N]: state entering chunk j
            for j in range(1, n):
                torch.addcmul(
                    s[..., j - 1, :], decay[..., j - 1, :], carry[..., j - 1, :], out=carry[..., j, :]
                )
            torch.addcmul(xc[..., 0, :], ac[..., 0, :], carry, out=h[..., 0, :])
        else:
            h[..., 0, :] = xc[..., 0, :]
        for q in range(1, Q):
            torch.addcmul(xc[..., q, :], ac[..., q, :], h[..., q - 1, :], out=h[..., q, :])
    else:
        if n > 1:
            s = xc[..., 1:, Q - 1, :].clone()  # local start states of chunks 1..n-1
            for q in range(Q - 2, -1, -1):
                s = torch.addcmul(xc[..., 1:, q, :], ac[..., 1:, q + 1, :], s)
            s = s * ac[..., 1:, 0, :]  # ... carried one step back, into the previous chunk's end
            carry = torch.zeros_like(xc[..., 0, :])  # [..., n, N]: a_{next} g_{next} entering chunk j's end
            for j in range(n - 2, -1, -1):
                torch.addcmul(s[..., j, :], decay[..., j + 1, :], carry[..., j + 1, :], out=carry[..., j, :])
            torch.add(xc[..., Q - 1, :], carry, out=h[..., Q - 1, :])
        else:
            h[..., Q - 1, :] = xc[..., Q - 1, :]
        for q in range(Q - 2, -1, -1):
            torch.addcmul(xc[..., q, :], ac[..., q + 1, :], h[..., q + 1, :], out=h[..., q, :])
    h = h.reshape(*lead, n * Q, N)
    return h[..., :L, :] if pad else h


def _chunk_decay(log_a: Tensor, chunk: int) -> Tensor:
    """Per-chunk decays ``exp(sum of log_a over the chunk)``, ``[..., n, N]`` (log space, exponents <= 0)."""
    *lead, L, N = log_a.shape
    Q = max(1, min(chunk, L))
    pad = (-L) % Q
    if pad:
        log_a = F.pad(log_a, (0, 0, 0, pad))
    return exp_nonpositive(log_a.reshape(*lead, (L + pad) // Q, Q, N).sum(-2))


class _SelectiveScan(torch.autograd.Function):
    """``h = scan(exp(log_a), x)``, or with ``c`` ``y = sum_N c * h`` (no ``[..., L, N]`` output)."""

    @staticmethod
    def forward(ctx: Any, log_a: Tensor, x: Tensor, c: Tensor | None, chunk: int) -> Tensor:
        a = log_a.exp()
        decay = _chunk_decay(log_a, chunk) if x.shape[-2] > chunk else None
        h = _chunk_scan(a, x, chunk, decay=decay)
        ctx.save_for_backward(a, h, c, decay)
        ctx.chunk = chunk
        return h if c is None else (h * c).sum(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor | None, None]:
        a, h, c, decay = ctx.saved_tensors
        grad_c = None
        if c is None:
            gh = grad_out.contiguous()
        else:
            gh = grad_out[..., None] * c
            if ctx.needs_input_grad[2]:
                grad_c = (grad_out[..., None] * h).sum_to_size(c.shape)
        g = _chunk_scan(a, gh, ctx.chunk, reverse=True, decay=decay)  # dLoss/dx_t
        grad_log_a = g * a  # dLoss/dlog_a_t = g_t a_t h_{t-1}
        grad_log_a[..., 1:, :] *= h[..., :-1, :]
        grad_log_a[..., :1, :] = 0.0
        return grad_log_a, g, grad_c, None


def selective_scan(
    log_a: Tensor, x: Tensor, chunk_size: int | None = None, c: Tensor | None = None
) -> Tensor:
    """All states of ``h_t = exp(log_a_t) * h_{t-1} + x_t`` (``h_{-1} = 0``), ``[..., L, N] -> [..., L, N]``.

    ``log_a <= 0`` (log-decays). With ``c`` (broadcastable to ``x``), returns ``y_t = c_t . h_t``
    (``[..., L]``) instead. Chunked scan (:func:`_chunk_scan`) with an explicit backward (the adjoint
    scan): memory ``O(L N)`` per channel, no autograd graph over tokens. Differentiable once in ``log_a``,
    ``x`` and ``c``. ``chunk_size`` defaults to a power of two near ``sqrt(L)``.
    """
    if log_a.shape != x.shape:
        raise ValueError(
            f"log_a and x must have the same shape [..., L, N], got {tuple(log_a.shape)} and {tuple(x.shape)}"
        )
    chunk = _auto_chunk(x.shape[-2]) if chunk_size is None else check_positive_int("chunk_size", chunk_size)
    dtype = torch.promote_types(torch.promote_types(log_a.dtype, x.dtype), torch.float32)
    if c is not None:
        if torch.broadcast_shapes(c.shape, x.shape) != x.shape:
            raise ValueError(f"c {tuple(c.shape)} must broadcast to x {tuple(x.shape)}")
        c = c.to(dtype)
    return _SelectiveScan.apply(log_a.to(dtype), x.to(dtype), c, chunk)


def _factor_bound(dtype: torch.dtype) -> float:
    """Largest within-chunk ``|dt A|`` sum for :func:`_mamba_chunk_y` (``exp(40) ~ 2e17`` in float32)."""
    return 300.0 if dtype == torch.float64 else 40.0


def _mamba_chunk_y(dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, u: Tensor, C: int) -> Tensor:
    """``y_t = C_t . h_t``, ``h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t``, for one block (plain autograd ops).

    ``dt, u [b, d, L]``, ``A [d, N]``, ``Bm, Cm [b, L, N]``, ``L`` a multiple of ``C``. Within a chunk, with
    ``S_t = A * sum_{r <= t} dt_r`` (from the chunk start, ``<= 0``):
    ``h_t = exp(S_t) (h_start + sum_{s <= t} exp(-S_s) dt_s u_s B_s)``: elementwise ops and one cumsum for all
    chunks at once; ``|S| <= bound`` keeps ``exp(-S)`` finite (checked by the caller). The states entering
    the chunks follow from a short loop over chunks.
    """
    b, d, L = dt.shape
    N = A.shape[-1]
    n = L // C
    S = dt.reshape(b, d, n, C, 1).cumsum(-2) * A[:, None, None, :]  # [b, d, n, C, N], <= 0
    # factor exp(S_t - S_s) = exp(S_t - S_mid) exp(S_mid - S_s) through the chunk's middle row (both factors
    # at most exp(bound / 2)); S_mid cancels exactly, so it is detached (its gradient is exactly 0)
    S_mid = S[..., C // 2 : C // 2 + 1, :].detach()
    e = S - S_mid
    w = torch.exp(-e) * (dt * u).reshape(b, d, n, C, 1) * Bm.reshape(b, 1, n, C, N)
    cum = w.cumsum(-2)
    E = e.exp()
    if n > 1:
        local = E[..., -1, :] * cum[..., -1, :]  # each chunk's end state from a zero start
        decay = torch.exp(S[..., -1, :])  # [b, d, n, N]: the chunk's total decay
        h = torch.zeros_like(local[..., 0, :])
        starts = [h]
        for loc, dec in zip(local.unbind(-2)[:-1], decay.unbind(-2)[:-1]):
            h = torch.addcmul(loc, dec, h)
            starts.append(h)
        # h_t = exp(S_t) h_start + ...: exp(S_t) = E_t exp(S_mid), folded into the start states
        cum = cum + torch.stack(starts, dim=-2)[..., None, :] * torch.exp(S_mid)
    return (E * cum * Cm.reshape(b, 1, n, C, N)).sum(-1).reshape(b, d, L)


def _mamba_chunk_y_inplace(
    dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, u: Tensor, C: int, work: Tensor
) -> Tensor:
    """:func:`_mamba_chunk_y` without autograd, in place in ``work`` (at least ``2 b d L N`` numbers).

    Same arithmetic, fewer passes over ``[b, d, n, C, N]`` and no fresh temporaries: ``exp(-e)`` comes
    from one fused ``addcmul`` + ``exp_``, ``C_t exp(e_t)`` from one ``div``, the rest runs in place.
    """
    b, d, L = dt.shape
    N = A.shape[-1]
    n = L // C
    shape = (b, d, n, C, N)
    size = b * d * L * N
    W, E = work[:size].view(shape), work[size : 2 * size].view(shape)
    Ad = A[:, None, None, :]
    cs = dt.reshape(b, d, n, C, 1).cumsum(-2)  # [b, d, n, C, 1]
    S_mid = cs[..., C // 2 : C // 2 + 1, :] * Ad  # [b, d, n, 1, N]
    torch.addcmul(S_mid, cs, Ad, value=-1.0, out=W).exp_()  # exp(S_mid - S_t)
    torch.div(Cm.reshape(b, 1, n, C, N), W, out=E)  # C_t exp(S_t - S_mid)
    E_end = torch.reciprocal(W[..., -1, :]) if n > 1 else None
    cum = W.mul_((dt * u).reshape(b, d, n, C, 1)).mul_(Bm.reshape(b, 1, n, C, N)).cumsum_(-2)
    if n > 1:
        local = E_end * cum[..., -1, :]  # [b, d, n, N]
        decay = torch.exp(cs[..., -1, :] * A[:, None, :])  # [b, d, n, N]
        h = torch.zeros_like(local[..., 0, :])
        starts = [h]
        for loc, dec in zip(local.unbind(-2)[:-1], decay.unbind(-2)[:-1]):
            h = torch.addcmul(loc, dec, h)
            starts.append(h)
        cum.add_(torch.stack(starts, dim=-2)[..., None, :] * torch.exp(S_mid))
    return E.mul_(cum).sum(-1).reshape(b, d, L)


def _blocks(batch: int, D: int, L: int, N: int, target: int = 1 << 19) -> list[tuple[slice, slice]]:
    """(batch, channel) blocks whose ``[b, d, L, N]`` temporaries hold about ``target`` numbers (cache)."""
    d = max(1, min(D, target // max(1, L * N)))
    b = max(1, min(batch, target // max(1, d * L * N)))
    return [(slice(i, i + b), slice(j, j + d)) for i in range(0, batch, b) for j in range(0, D, d)]


class _MambaScan(torch.autograd.Function):
    """:func:`_mamba_chunk_y_inplace` block by block; the backward recomputes each block with
    :func:`_mamba_chunk_y` under autograd."""

    @staticmethod
    def forward(ctx: Any, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, u: Tensor, chunk: int) -> Tensor:
        ctx.save_for_backward(dt, A, Bm, Cm, u)
        ctx.chunk = chunk
        y = torch.empty_like(dt)
        (batch, D, L), N = dt.shape, A.shape[-1]
        blocks = _blocks(batch, D, L, N)
        bs0, ds0 = blocks[0]  # the largest block: one workspace for all
        work = dt.new_empty(2 * N * L * (min(bs0.stop, batch) - bs0.start) * (min(ds0.stop, D) - ds0.start))
        for bs, ds in blocks:
            y[bs, ds] = _mamba_chunk_y_inplace(dt[bs, ds], A[ds], Bm[bs], Cm[bs], u[bs, ds], chunk, work)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        dt, A, Bm, Cm, u = ctx.saved_tensors
        grads = [torch.zeros_like(t) for t in (dt, A, Bm, Cm, u)]
        for bs, ds in _blocks(dt.shape[0], dt.shape[1], dt.shape[2], A.shape[-1]):
            with torch.enable_grad():
                ins = [
                    t.detach().requires_grad_(True) for t in (dt[bs, ds], A[ds], Bm[bs], Cm[bs], u[bs, ds])
                ]
                y = _mamba_chunk_y(*ins, ctx.chunk)
                g = torch.autograd.grad(y, ins, gy[bs, ds])
            grads[0][bs, ds] = g[0]
            grads[1][ds] += g[1]
            grads[2][bs] += g[2]
            grads[3][bs] += g[3]
            grads[4][bs, ds] = g[4]
        return (*grads, None)


def mamba_scan(
    dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, u: Tensor, chunk_size: int | None = None
) -> Tensor:
    """Mamba's selective scan ``y [b, D, L]`` from its factors, without ``[b, D, L, N]`` tensors in memory.

    ``h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t`` (``h_{-1} = 0``), ``y_t = C_t . h_t`` per channel, with
    ``dt, u [b, D, L]`` (``dt >= 0``), ``A [D, N]`` (``<= 0``), ``Bm, Cm [b, L, N]``.

    The chunked cumsum form (:func:`_mamba_chunk_y`) in cache-sized (batch, channel) blocks; the
    forward runs in place in one workspace reused by all blocks (:func:`_mamba_chunk_y_inplace`), the
    backward recomputes each block under autograd (activation memory ``O(b D L)``). Chunks of at most
    ``chunk_size`` (default 64), halved until no chunk's total ``|dt A|`` exceeds :func:`_factor_bound`;
    with decays too strong even for chunks of 4 it falls back to the exact :func:`selective_scan`
    (materialized ``[b, D, L, N]``).
    """
    dtype = torch.promote_types(torch.promote_types(dt.dtype, A.dtype), torch.float32)
    dt, A, Bm, Cm, u = (t.to(dtype) for t in (dt, A, Bm, Cm, u))
    L = dt.shape[-1]
    if L == 0:
        return dt.clone()
    C = min(64 if chunk_size is None else chunk_size, L)
    rate = A.detach().abs().amax(-1)  # [D]
    bound = _factor_bound(dtype)
    while C >= 4 or C == L:
        pad = (-L) % C
        dtp = F.pad(dt.detach(), (0, pad)).reshape(*dt.shape[:-1], -1, C).sum(-1)  # [b, D, n]
        if bool((dtp.amax(dim=(0, 2)) * rate).max() <= bound):
            break
        C //= 2
    else:
        log_a = dt[..., None] * A[:, None, :]
        return selective_scan(log_a, (dt * u)[..., None] * Bm[:, None], chunk_size, c=Cm[:, None])
    pad = (-L) % C
    if pad:  # padded steps: dt = 0 and u = 0 add nothing
        dt, u = F.pad(dt, (0, pad)), F.pad(u, (0, pad))
        Bm, Cm = F.pad(Bm, (0, 0, 0, pad)), F.pad(Cm, (0, 0, 0, pad))
    y = _MambaScan.apply(dt, A, Bm, Cm, u, C)
    return y[..., :L] if pad else y
