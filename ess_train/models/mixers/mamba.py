"""Mamba (selective SSM, S6; Gu and Dao 2023) as an :class:`ESSMixer`, after ``mamba_ssm``'s ``Mamba`` module.

``in_proj`` to ``(x, z)`` (width ``d_inner = expand * d_model`` each), a short causal depthwise conv + SiLU
giving ``u``, ``x_proj(u)`` to ``(dt, B, C)``, ``dt = softplus(dt_proj(dt) + bias)``, ``A = -exp(A_log)``.
Per channel ``c`` (state size ``N``): ``h_t = exp(dt_{t,c} A_c) h_{t-1} + dt_{t,c} B_t u_{t,c}``,
``y_{t,c} = C_t . h_t``. Readout: ``out_proj((y + D u) * silu(z))``.

Operator per channel (batch shape ``[batch, d_inner]``): a diagonal :class:`RecurrentOperator` with
``a = exp(dt A)``, ``b = dt B``, ``c = C`` (:class:`SelectiveSSMOperator` builds them when read), ``u`` = the
conv output; ``D u`` and the gate belong to the readout. TSS ``d_inner * N``.

Fast forward: :func:`selective_scan`, a chunked scan (``O(sqrt(L))`` vectorized steps, see
:func:`_chunk_scan`) with an explicit adjoint backward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ess_train.checks import check_choice, check_positive_float, check_positive_int
from ess_train.ess import RecurrentOperator
from ess_train.ess.operators import compute_dtype, select_batch
from ess_train.models.protocol import ESSMixer, OperatorView, StateSize

__all__ = [
    "Mamba",
    "SelectiveSSMOperator",
    "selective_scan",
    "selective_scan_reference",
    "mamba_scan",
    "A_INITS",
    "DT_RANGES",
    "init_a_log_",
    "init_dt_bias_",
    "check_dt_range",
    "exp_nonpositive",
]

# A initializations (magnitudes |A_n| of A = -exp(A_log)); the first is the default.
#   s4d_real      |A_n| = n + 1 (S4D-Real, Mamba's default): a spread of decay rates per channel
#   s4d_lin_real  |A_n| = 1/2 (the real part of S4D-Lin): every state decays alike
#   constant      |A_n| = 1
#   log_uniform   |A_n| log-uniform in [1, N], drawn per channel and state (a randomized S4D-Real)
A_INITS: tuple[str, ...] = ("s4d_real", "s4d_lin_real", "constant", "log_uniform")

# dt ranges searched by ``init_search_space`` after the layer's own: Mamba's default, then longer memory
# (smaller dt), shorter memory, and a wide range.
DT_RANGES: tuple[tuple[float, float], ...] = ((0.001, 0.1), (0.0001, 0.01), (0.01, 0.1), (0.001, 1.0))


# ----------------------------------------------------------------------------------------------------
# argument checks (ValueError naming the argument)
def check_dt_range(
    dt_min: Any, dt_max: Any, names: tuple[str, str] = ("dt_min", "dt_max")
) -> tuple[float, float]:
    """Validate ``0 < dt_min <= dt_max`` (errors name ``names``); returns floats."""
    lo, hi = check_positive_float(names[0], dt_min), check_positive_float(names[1], dt_max)
    if lo > hi:
        raise ValueError(f"{names[0]} must be <= {names[1]}, got {names[0]}={lo}, {names[1]}={hi}")
    return lo, hi


def _parse_dt_range(value: Any) -> tuple[float, float]:
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"dt_range must be a pair (dt_min, dt_max), got {value!r}")
    return check_dt_range(value[0], value[1], ("dt_range[0] (dt_min)", "dt_range[1] (dt_max)"))


# ----------------------------------------------------------------------------------------------------
# initializations shared with S4D
@torch.no_grad()
def init_a_log_(A_log: Tensor, a_init: str) -> Tensor:
    """Fill ``A_log [channels, N]`` in place: ``A = -exp(A_log)`` follows ``a_init`` (:data:`A_INITS`)."""
    check_choice("a_init", a_init, A_INITS)
    N = A_log.shape[-1]
    if a_init == "s4d_real":
        mags = torch.arange(1, N + 1, dtype=torch.float32, device=A_log.device).expand_as(A_log)
        A_log.copy_(torch.log(mags))
    elif a_init == "s4d_lin_real":
        A_log.fill_(math.log(0.5))
    elif a_init == "constant":
        A_log.fill_(0.0)
    else:  # log_uniform
        A_log.copy_(torch.rand_like(A_log) * math.log(max(N, 1)))
    return A_log


def log_uniform_dt(n: int, dt_min: float, dt_max: float, floor: float, device: Any = None) -> Tensor:
    """``n`` step sizes log-uniform in ``[dt_min, dt_max]``, clamped below at ``floor`` (float32)."""
    lo, hi = math.log(dt_min), math.log(dt_max)
    dt = torch.exp(torch.rand(n, device=device) * (hi - lo) + lo)
    return dt.clamp(min=floor)


@torch.no_grad()
def init_dt_bias_(bias: Tensor, dt_min: float, dt_max: float, floor: float = 1e-4) -> Tensor:
    """Mamba's dt bias, in place: ``softplus(bias)`` log-uniform in ``[dt_min, dt_max]``."""
    dt = log_uniform_dt(bias.numel(), dt_min, dt_max, floor, bias.device)
    bias.copy_((dt + torch.log(-torch.expm1(-dt))).reshape(bias.shape))  # softplus^{-1}(dt)
    return bias


# ----------------------------------------------------------------------------------------------------
# the scan
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


def selective_scan_reference(log_a: Tensor, x: Tensor) -> Tensor:
    """Token-by-token :func:`selective_scan` (a Python loop over ``L``; the reference)."""
    a = log_a.exp()
    h = torch.zeros_like(x[..., 0, :])
    states = []
    for a_t, x_t in zip(a.unbind(-2), x.unbind(-2)):
        h = a_t * h + x_t
        states.append(h)
    return torch.stack(states, dim=-2) if states else x.clone()


# ----------------------------------------------------------------------------------------------------
# Mamba's fast forward: the chunked cumsum form, in cache-sized blocks
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


# ----------------------------------------------------------------------------------------------------
class SelectiveSSMOperator(RecurrentOperator):
    """Mamba's per-channel operator, built when read: ``a = exp(dt A)``, ``b = dt B``, ``c = C``.

    Args: ``dt [batch, D, L]``, ``A [D, N]`` (negative), ``B, C [batch, L, N]`` (shared by the channels).
    ``a``/``b`` (``[batch, D, L, N]``) are materialized on each access; ``c`` is an expanded view.
    """

    def __init__(self, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> None:
        if dt.dim() != 3 or A.dim() != 2 or B.dim() != 3 or B.shape != C.shape:
            raise ValueError(
                f"expected dt [batch, D, L], A [D, N], B and C [batch, L, N]; got dt {tuple(dt.shape)}, "
                f"A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}"
            )
        if A.shape[0] != dt.shape[1] or B.shape[:2] != (dt.shape[0], dt.shape[2]) or A.shape[1] != B.shape[2]:
            raise ValueError(
                f"inconsistent shapes: dt {tuple(dt.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}"
            )
        self.dt, self.A, self.B, self.C = dt, A, B, C
        self.diagonal = True

    @property
    def a(self) -> Tensor:  # type: ignore[override]
        return torch.exp(self.dt[..., None] * self.A[:, None, :])

    @property
    def b(self) -> Tensor:  # type: ignore[override]
        return self.dt[..., None] * self.B[:, None, :, :]

    @property
    def c(self) -> Tensor:  # type: ignore[override]
        batch, D, L = self.dt.shape
        return self.C[:, None, :, :].expand(batch, D, L, self.A.shape[1])

    def subset(self, rows: int | None = None, index: Tensor | None = None) -> SelectiveSSMOperator:
        """Cut the factors (``dt`` rows and channels, ``A`` channels, ``B``/``C`` rows): nothing of size
        ``[batch, D, L, N]`` is built."""
        dt = select_batch(self.dt, self.batch_shape, 1, rows, index)
        A = self.A if index is None else self.A.index_select(0, index.to(self.A.device))
        B, C = (x if rows is None else x[:rows] for x in (self.B, self.C))
        return SelectiveSSMOperator(dt, A, B, C)

    @property
    def seq_len(self) -> int:
        return self.dt.shape[-1]

    @property
    def state_dim(self) -> int:
        return self.A.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        return self.dt.shape[:-1]

    @property
    def dtype(self) -> torch.dtype:
        return torch.promote_types(torch.promote_types(self.dt.dtype, self.A.dtype), self.B.dtype)

    @property
    def device(self) -> torch.device:
        return self.dt.device


class Mamba(ESSMixer):
    """Mamba block's mixer (S6 selective SSM), pure PyTorch.

    Args:
        d_model: model width.
        d_state: SSM state size ``N`` per channel (16).
        d_conv: short conv kernel size (4).
        expand: ``d_inner = int(expand * d_model)`` (2).
        dt_rank: rank of the dt projection; ``"auto"`` = ``ceil(d_model / 16)``.
        dt_min, dt_max: ``softplus(dt_bias)`` is drawn log-uniform in ``[dt_min, dt_max]`` (0.001, 0.1).
        dt_init: ``"random"`` (uniform +-dt_rank^-0.5 * dt_scale) or ``"constant"`` dt_proj weight.
        dt_scale: scale of the dt_proj weight init.
        dt_init_floor: lower clamp of the initial dt (1e-4).
        a_init: A initialization, one of :data:`A_INITS` (default ``"s4d_real"``: ``A = -(1..N)``).
        conv_bias: bias of the short conv.
        bias: biases of in_proj/out_proj.
        chunk_size: chunk of the scan (None: a power of two near ``sqrt(L)``).

    TSS ``d_inner * N``; per operator ``min(N, L // 2)``; multiplicity 1.
    ``dt_proj.bias`` is flagged ``_no_reinit`` (and ``A_log``, ``D`` ``_no_weight_decay``) as in mamba_ssm;
    :class:`~ess_train.models.backbone.SequenceModel` never re-initializes mixers.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        a_init: str = "s4d_real",
        conv_bias: bool = True,
        bias: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.d_state = check_positive_int("d_state", d_state)
        self.d_conv = check_positive_int("d_conv", d_conv)
        self.expand = check_positive_float("expand", expand)
        self.d_inner = int(self.expand * d_model)
        if self.d_inner < 1:
            raise ValueError(f"expand * d_model must be >= 1, got expand={expand}, d_model={d_model}")
        if dt_rank == "auto":
            self.dt_rank = math.ceil(d_model / 16)
        else:
            self.dt_rank = check_positive_int("dt_rank", dt_rank)
        self.dt_min, self.dt_max = check_dt_range(dt_min, dt_max)
        self.dt_init = check_choice("dt_init", dt_init, ("random", "constant"))
        self.dt_scale = check_positive_float("dt_scale", dt_scale)
        self.dt_init_floor = check_positive_float("dt_init_floor", dt_init_floor)
        self.a_init = check_choice("a_init", a_init, A_INITS)
        self.chunk_size = None if chunk_size is None else check_positive_int("chunk_size", chunk_size)
        for name, flag in (("conv_bias", conv_bias), ("bias", bias)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")

        D, N = self.d_inner, self.d_state
        self.in_proj = nn.Linear(d_model, 2 * D, bias=bias)
        self.conv1d = nn.Conv1d(D, D, d_conv, groups=D, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(D, self.dt_rank + 2 * N, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, D, bias=True)
        self.A_log = nn.Parameter(torch.empty(D, N))
        self.D = nn.Parameter(torch.ones(D))
        self.out_proj = nn.Linear(D, d_model, bias=bias)
        # flags read by model-wide initializers / optimizers (mamba_ssm conventions)
        self.dt_proj.bias._no_reinit = True  # type: ignore[attr-defined]
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D._no_weight_decay = True  # type: ignore[attr-defined]
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        """mamba_ssm's init: PyTorch-default Linear/Conv, dt_proj special init, S4D-Real A, D = 1."""
        for m in (self.in_proj, self.conv1d, self.x_proj, self.out_proj):
            m.reset_parameters()
        std = self.dt_rank**-0.5 * self.dt_scale
        with torch.no_grad():
            if self.dt_init == "constant":
                self.dt_proj.weight.fill_(std)
            else:
                self.dt_proj.weight.uniform_(-std, std)
            self.D.fill_(1.0)
        init_dt_bias_(self.dt_proj.bias, self.dt_min, self.dt_max, self.dt_init_floor)
        init_a_log_(self.A_log, self.a_init)

    def init_search_space(self) -> dict[str, list]:
        """``dt_range`` and ``a_init`` candidates; the first of each is the layer's constructor setting."""
        own = (self.dt_min, self.dt_max)
        return {
            "dt_range": list(dict.fromkeys([own, *DT_RANGES])),
            "a_init": list(dict.fromkeys([self.a_init, *A_INITS])),
        }

    def apply_init(self, **setting: Any) -> None:
        """Re-draw ``dt_proj.bias`` (``dt_range=(dt_min, dt_max)``) and/or ``A_log`` (``a_init``) in place."""
        unknown = set(setting) - {"dt_range", "a_init"}
        if unknown:
            raise ValueError(f"unknown init setting(s) {sorted(unknown)}; expected dt_range and/or a_init")
        if "dt_range" in setting:
            lo, hi = _parse_dt_range(setting["dt_range"])
            init_dt_bias_(self.dt_proj.bias, lo, hi, self.dt_init_floor)
        if "a_init" in setting:
            init_a_log_(self.A_log, check_choice("a_init", setting["a_init"], A_INITS))

    # ------------------------------------------------------------------------------------------ forward
    def _features(self, x: Tensor) -> dict[str, Tensor]:
        """u ``[B, D, L]``, z ``[B, L, D]``, dt ``[B, D, L]``, A ``[D, N]``, B and C ``[B, L, N]``."""
        L = x.shape[1]
        cd = compute_dtype(x.dtype)
        xi, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self.conv1d(xi.transpose(1, 2))[..., :L])
        dt_in, Bm, Cm = self.x_proj(u.transpose(1, 2)).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1
        )
        dt = F.softplus(F.linear(dt_in, self.dt_proj.weight).to(cd) + self.dt_proj.bias.to(cd)).transpose(
            1, 2
        )
        A = -torch.exp(self.A_log.to(cd))
        return {"u": u, "z": z, "dt": dt, "A": A, "B": Bm.to(cd), "C": Cm.to(cd)}

    def operator(self, x: Tensor) -> OperatorView:
        f = self._features(x)
        u, dt, A, Bm, Cm = f["u"], f["dt"], f["A"], f["B"], f["C"]
        y = mamba_scan(dt, A, Bm, Cm, u, self.chunk_size)  # [B, D, L]
        return OperatorView(op=SelectiveSSMOperator(dt, A, Bm, Cm), u=u, y=y, extras={"z": f["z"]})

    def readout(self, view: OperatorView, x: Tensor) -> Tensor:
        y = view.y + self.D.to(view.y.dtype)[:, None] * view.u
        y = y.transpose(1, 2) * F.silu(view.extras["z"])
        return self.out_proj(y.to(x.dtype))

    def state_size(self, seq_len: int) -> StateSize:
        return StateSize(
            total=self.d_inner * self.d_state, per_operator=min(self.d_state, seq_len // 2), multiplicity=1
        )

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}, "
            f"dt_rank={self.dt_rank}, dt=[{self.dt_min:g}, {self.dt_max:g}], a_init={self.a_init}"
        )
