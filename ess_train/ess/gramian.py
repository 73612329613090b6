"""Hankel singular values of a recurrent realization from its Gramians (``O(L N^3)``, no ``T``).

For ``h_t = A_t h_{t-1} + b_t u_t``, ``y_t = c_t . h_t`` the Hankel block factors as
``H_i = T[i:, :i] = O_i R_i`` with reachability Gramian ``P_i = R_i R_i^T`` and observability
Gramian ``Q_i = O_i^T O_i``:

    P_0 = 0,   P_i = A_{i-1} P_{i-1} A_{i-1}^T + b_{i-1} b_{i-1}^T
    Q_L = 0,   Q_i = A_i^T (c_i c_i^T + Q_{i+1}) A_i

and the non-zero singular values of ``H_i`` are ``sqrt(eig(P_i Q_i))``. They are computed in the
symmetric form ``eigvalsh(F_i^T Q_i F_i)`` with ``F_i F_i^T = P_i + diag(J_i)`` (Cholesky of ``P_i``
plus a tiny, detached, diagonal jitter ``J_i``). The jitter raises every eigenvalue by at most
``tau_J = ||diag(J)^1/2 Q diag(J)^1/2||_F`` (Weyl), so ``tau_J`` plus the eigensolver's round-off
``eps * ||eig||_2`` is subtracted and the result clamped at 0: directions that ``H_i`` does not
have come out exactly 0 (rank deficiency is exact, and their gradients are 0), the others are
biased by at most ``tau``, i.e. singular values below about ``sqrt(eps) * sigma_max`` are lost,
the resolution of any method that squares singular values.

Precision (issue 14). Squaring makes float32 sums useless for small singular values: in float32 the
resolution ``sqrt(eps32) ~ 3.5e-4`` cost entropy-ESS 1e-4 to 1e-2 relative error, 100-1000x a float32
SVD's. So every *sum* runs in ``acc`` (float64 for all operators, ``measures.GRAMIAN_ACCUMULATE``): the
Gramians, their chunk carries, the Cholesky, ``F^T Q F`` and ``eigvalsh`` (resolution ``sqrt(eps64) ~
1.5e-8 < eps32``), and the result is cast back. The *products* of diagonal transitions (the in-chunk and
in-segment weights ``prod a * b``, ``a * c``) stay in the operator's dtype: with no sums there is no
cancellation, only relative errors ``~ S eps32`` per term, which is a perturbation of the operator by
``n eps32`` componentwise: it moves each ``sigma`` by ``<= n eps32 sqrt(scale)`` *unsquared* (Weyl; the
model in ``tests/tolerances.py``), the same as rounding the inputs to float32. Measured (8 channels, L =
256, N = 16, the four ``a`` distributions of the issue and DeltaNet's ``I - beta k k^T``): entropy-ESS
within 1.1e-6 of float64 (was up to 1.5e-2; a float32 SVD: 4e-6 to 1e-5), tolerance-ESS at ``rtol =
1e-5`` equal at all positions (was 7% to 99%). Square-root (factored) propagation was not built: it
needs a QR per chunk carry and per position (``(S + N) x N`` factors) on top of the scan, and QR of the
rank-deficient early states has unstable gradients, while float64 sums met the targets with this
module's structure, and its finite gradients on degenerate operators, unchanged. Cost:
float64 matmuls are ~2x float32 on CPUs and data-centre GPUs, 32-64x on consumer GPUs, where
``GRAMIAN_ACCUMULATE = None`` restores the float32 sums (and their ``sqrt(eps32)`` resolution).

Gradients never go through eigenvectors (``eigvalsh`` backward is ``V diag(g) V^T``, finite for
repeated eigenvalues) nor through a square root at 0.

Both Gramian recursions are affine scans ``X_t = alpha_t X_{t-1} alpha_t^T + beta_t beta_t^T``
run as a two-level (square-root decomposition) scan over chunks of ``S <= sqrt(C)`` positions:
inside every chunk at once, the zero-carry states (diagonal ``alpha``: ``X_t = W_t^T W_t`` with
``W_t[s] = (prod_{s<r<=t} alpha_r) beta_s``, one batched matmul; full ``alpha``: a loop over the S
offsets with matmuls), then a loop over the ``C / S`` chunk carries, then one vectorized fix-up
``X_t += Phi_t X_carry Phi_t^T``. ``O(sqrt(L))`` Python steps, products only (``alpha`` may be 0).

For diagonal transitions and a few positions (a training-time estimate on 16 positions, say), only the
Gramians at the requested positions are built (:func:`segment_gramians`): the sequence is cut into
segments that start at those positions, each segment's zero-carry contribution is one batched matmul of
its inputs weighted by in-segment products of ``a``, and one carry step per segment links them. That is
``O(L N^2)`` work in ``O(P)`` small steps, with no ``[L, N, N]`` states (3-13x faster forward+backward
than the scan at 16 positions; ``benchmarks/bench_ess.py``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ess_train.ess.gramian_svals import singular_values_from_gramians

__all__ = [
    "gramian_hankel_singular_values",
    "affine_scan",
    "segment_gramians",
    "segment_starts",
    "singular_values_from_gramians",
]


def _outer(x: Tensor) -> Tensor:
    return x.unsqueeze(-1) * x.unsqueeze(-2)


def affine_scan(
    alpha: Tensor,
    beta: Tensor,
    carry: Tensor | None = None,
    *,
    diagonal: bool,
    reverse: bool = False,
    acc: torch.dtype | None = None,
) -> Tensor:
    """All states of ``X_t = alpha_t X_{t-1} alpha_t^T + beta_t beta_t^T`` (``X_{-1} = carry``).

    Args:
        alpha: ``[B, C, N]`` (diagonal ``alpha_t``) or ``[B, C, N, N]``.
        beta: ``[B, C, N]``.
        carry: ``[B, N, N]`` state before the first step (zero when ``None``).
        reverse: run from ``t = C-1`` down to ``0`` (``X_t = alpha_t X_{t+1} alpha_t^T + ...``,
            ``X_C = carry``).
        acc: the dtype the sums are accumulated in (default: ``beta``'s). For diagonal ``alpha`` the
            in-chunk products of ``alpha`` and ``beta`` (no cancellation: relative errors only, like
            rounding the inputs) stay in ``beta``'s dtype; every sum, and full ``alpha``, runs in ``acc``.

    Returns:
        ``[B, C, N, N]``, the state after each step.
    """
    acc = beta.dtype if acc is None else acc
    if reverse:
        alpha, beta = alpha.flip(1), beta.flip(1)
    if not diagonal:
        alpha, beta = alpha.to(acc), beta.to(acc)
    B, C, N = beta.shape
    if C == 0:
        return beta.new_zeros(B, 0, N, N, dtype=acc)
    scan = _diagonal_chunks if diagonal else _full_chunks
    S = max(1, math.isqrt(C - 1) + 1)  # ceil(sqrt(C))
    if diagonal:
        S = min(S, max(N, 16))  # the intra-chunk weights hold S * N numbers per position
    nC = -(-C // S)
    pad = nC * S - C
    if pad:
        alpha = torch.cat([alpha, alpha.new_zeros(B, pad, *alpha.shape[2:])], 1)
        beta = torch.cat([beta, beta.new_zeros(B, pad, N)], 1)
    alpha = alpha.reshape(B, nC, S, *alpha.shape[2:])
    beta = beta.reshape(B, nC, S, N)
    X, Phi = scan(alpha, beta, acc)  # local states (zero carry) [B, nC, S, N, N], transitions so far

    # carries between chunks (a loop over C / S chunks)
    cur = carry.to(acc) if carry is not None else X.new_zeros(B, N, N)
    carries = []
    for j in range(nC):
        carries.append(cur)
        if j + 1 < nC:
            p = Phi[:, j, -1]
            if diagonal:
                cur = torch.addcmul(X[:, j, -1], _outer(p), cur)
            else:
                cur = p @ cur @ p.mT + X[:, j, -1]
    Cin = torch.stack(carries, 1).unsqueeze(2)  # [B, nC, 1, N, N]

    # fix-up: X_t += Phi_t X_carry Phi_t^T (X is a fresh matmul output: safe to update in place)
    if diagonal:
        X = X.addcmul_(Phi.unsqueeze(-1) * Cin, Phi.unsqueeze(-2))
    else:
        X = X.add_(Phi @ Cin @ Phi.mT)
    X = X.reshape(B, nC * S, N, N)[:, :C]
    return X.flip(1) if reverse else X


def _diagonal_chunks(alpha: Tensor, beta: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """Zero-carry states inside chunks for diagonal ``alpha`` ``[B, nC, S, N]``, as one batched matmul.

    ``X_t = W_t^T W_t`` with rows ``W_t[s] = (prod_{s < r <= t} alpha_r) * beta_s`` (``s <= t``, 0
    after), built by a loop over the S offsets: ``W_t = alpha_t * W_{t-1}`` plus row ``t = beta_t``
    (products only, no division: ``alpha`` may hold zeros).
    """
    S = alpha.shape[2]
    w = torch.zeros_like(beta)  # [B, nC, S(s), N]
    ws = []
    for t in range(S):
        w = alpha[:, :, t : t + 1] * w if t else w.clone()
        w[:, :, t] = beta[:, :, t]
        ws.append(w)
    W = torch.stack(ws, 2).to(acc)  # [B, nC, S(t), S(s), N]
    return W.mT @ W, torch.cumprod(alpha, dim=2).to(acc)


def _full_chunks(alpha: Tensor, beta: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """Zero-carry states inside chunks for full ``alpha`` ``[B, nC, S, N, N]``: a loop over the S offsets."""
    B, nC, S, N = beta.shape
    xs: list[Tensor] = []
    phis: list[Tensor] = []
    x = phi = None
    for k in range(S):
        ak, bk = alpha[:, :, k], beta[:, :, k]
        if x is None:
            x, phi = _outer(bk), ak
        else:
            x = torch.baddbmm(_outer(bk).flatten(0, 1), (ak @ x).flatten(0, 1), ak.mT.flatten(0, 1)).view(
                B, nC, N, N
            )
            phi = ak @ phi
        xs.append(x)
        phis.append(phi)
    return torch.stack(xs, 2), torch.stack(phis, 2)


def segment_starts(pos_list: list[int], L: int) -> list[int]:
    """Starts of the segments :func:`segment_gramians` uses: 0, every requested position, and extra cuts
    so that no segment is longer than ``2 * ceil(L / len(pos_list))`` (bounded padding for clustered
    positions)."""
    longest = 2 * -(-L // max(1, len(pos_list)))
    cuts = sorted({0, *pos_list})
    starts: list[int] = []
    for lo, hi in zip(cuts, [*cuts[1:], L]):
        pieces = max(1, -(-(hi - lo) // longest))
        starts.extend(lo + (hi - lo) * k // pieces for k in range(pieces))
    return starts


def segment_gramians(
    a: Tensor, b: Tensor, c: Tensor, pos_list: list[int], acc: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Reachability and observability Gramians ``P_i``, ``Q_i`` at the positions ``pos_list`` (sorted,
    unique), for diagonal transitions: ``a``, ``b``, ``c`` ``[B, L, N]`` -> two ``[B, len(pos_list), N, N]``.

    With segments ``[s_k, s_{k+1})`` (:func:`segment_starts`), ``phi_k = prod_{r in segment k} a_r``:

        P_{s_{k+1}} = phi_k P_{s_k} phi_k + sum_{s in seg k} w_s w_s^T,
        Q_{s_k}     = phi_k Q_{s_{k+1}} phi_k + sum_{t in seg k} v_t v_t^T,
        w_s = b_s prod_{s < r < s_{k+1}} a_r,  v_t = c_t prod_{s_k <= r <= t} a_r

    (``P_0 = 0``, ``Q_L = 0``). The in-segment products are cumulative products over segments laid out
    as a padded ``[B, K, S, N]`` tensor (padding: ``a = 1``, ``b = c = 0``): products only, ``a`` may be 0.
    They stay in the inputs' dtype (relative errors only); the sums run in ``acc`` (default: ``b``'s dtype).
    """
    acc = b.dtype if acc is None else acc
    Bt, L, N = b.shape
    starts = segment_starts(pos_list, L)
    K = len(starts)
    dev = a.device
    st = torch.tensor(starts, device=dev)
    lens = torch.diff(st, append=torch.tensor([L], device=dev))
    S = int(lens.max())
    slot = torch.arange(S, device=dev)
    valid = (slot.view(1, -1) < lens.view(-1, 1)).view(1, K, S, 1)
    t = (st.view(-1, 1) + slot.view(1, -1)).clamp_max(L - 1).view(-1)  # [K * S] (padding: clamped)
    one, zero = a.new_ones(()), a.new_zeros(())
    a_seg = torch.where(valid, a[:, t].view(Bt, K, S, N), one)
    b_seg = torch.where(valid, b[:, t].view(Bt, K, S, N), zero)
    c_seg = torch.where(valid, c[:, t].view(Bt, K, S, N), zero)
    prefix = torch.cumprod(a_seg, 2)  # prod_{s_k <= r <= t}
    suffix = torch.cumprod(a_seg.flip(2), 2).flip(2)  # prod_{s <= r < s_{k+1}}
    after = torch.cat([suffix[:, :, 1:], torch.ones_like(suffix[:, :, :1])], 2)  # prod_{s < r < s_{k+1}}
    v = (prefix * c_seg).to(acc)
    w = (after * b_seg).to(acc)
    Y = (v.mT @ v).unbind(1)  # zero-carry Q at each segment start
    X = (w.mT @ w).unbind(1)  # zero-carry P at each segment end
    phi = prefix[:, :, -1].to(acc)
    decay = (phi.unsqueeze(-1) * phi.unsqueeze(-2)).unbind(1)
    Ps = [v.new_zeros(Bt, N, N)]
    for k in range(K - 1):
        Ps.append(torch.addcmul(X[k], decay[k], Ps[-1]))
    Qs = [Y[K - 1]]
    for k in range(K - 2, -1, -1):
        Qs.append(torch.addcmul(Y[k], decay[k], Qs[-1]))
    Qs.reverse()
    where = {s: k for k, s in enumerate(starts)}
    idx = [where[p] for p in pos_list]
    return torch.stack([Ps[k] for k in idx], 1), torch.stack([Qs[k] for k in idx], 1)


# The segment path is used (diagonal transitions) for up to max(SEGMENT_MIN_POSITIONS, L / 4) positions:
# measured break-even of the forward pass against the scan, from L = 64 to 4096 (forward+backward is
# faster at least up to there: 2-60x; ``benchmarks/bench_ess.py`` prints both).
SEGMENT_MIN_POSITIONS = 16
SEGMENT_FRACTION_OF_L = 4


def use_segments(n_pos: int, L: int) -> bool:
    """Whether :func:`segment_gramians` (diagonal transitions) beats the full scan for ``n_pos`` positions:
    its ``O(n_pos)`` sequential steps against the scan's ``O(sqrt(L))`` steps over ``[L, N, N]`` states."""
    return n_pos <= max(SEGMENT_MIN_POSITIONS, L // SEGMENT_FRACTION_OF_L)


def gramian_hankel_singular_values(
    a: Tensor,
    b: Tensor,
    c: Tensor,
    *,
    diagonal: bool,
    positions: Tensor,
    chunk_elements: int,
    acc: torch.dtype | None = None,
) -> Tensor:
    """Hankel singular values at sorted, unique ``positions`` (LongTensor on CPU).

    ``a``: ``[B, L, N]`` or ``[B, L, N, N]``; ``b``, ``c``: ``[B, L, N]`` (one dtype). Returns
    ``[B, len(positions), N]``. Intermediate ``[bb, C, N, N]`` tensors hold at most about
    ``chunk_elements`` elements: operators are processed ``bb`` at a time and, when one operator
    alone is too large, positions ``C`` at a time (the observability scan then runs twice: once to
    checkpoint ``Q`` at chunk boundaries, once chunk by chunk).
    """
    Bt, L, N = b.shape
    acc = b.dtype if acc is None else acc
    n_pos = positions.numel()
    if Bt == 0 or n_pos == 0 or L == 0:
        return b.new_zeros(Bt, n_pos, N)
    pos_list = positions.tolist()
    if diagonal and use_segments(n_pos, L):
        K = len(segment_starts(pos_list, L))
        # largest intermediate per operator: the padded [K, S, N] segments (S <= 2 L / n_pos) or K Gramians
        seg_op = max(K * (2 * -(-L // n_pos)) * N, K * N * N)
        if seg_op <= chunk_elements:
            bb = max(1, min(Bt, chunk_elements // seg_op))
            return torch.cat(
                [
                    singular_values_from_gramians(
                        *segment_gramians(a[b0 : b0 + bb], b[b0 : b0 + bb], c[b0 : b0 + bb], pos_list, acc)
                    )
                    for b0 in range(0, Bt, bb)
                ]
            ).to(b.dtype)
    per_pos = N * N if not diagonal else N * max(N, 16)  # the larger of X_t and the scan weights W_t
    per_op = L * per_pos
    if per_op <= chunk_elements:
        bb, C = max(1, min(Bt, chunk_elements // per_op)), L
    else:
        bb, C = 1, max(1, chunk_elements // per_pos)
    bounds = [(p0, min(p0 + C, L)) for p0 in range(0, L, C)]
    # requested positions per chunk, as (start, stop) into ``positions`` (sorted).
    sel = []
    for p0, p1 in bounds:
        lo = int(torch.searchsorted(positions, p0))
        hi = int(torch.searchsorted(positions, p1))
        sel.append((lo, hi))
    last_needed = max(j for j, (lo, hi) in enumerate(sel) if hi > lo)

    out = []
    for b0 in range(0, Bt, bb):
        A, Bv, Cv = a[b0 : b0 + bb], b[b0 : b0 + bb], c[b0 : b0 + bb]
        # forward (reachability) sequence, shifted: alpha_i = A_{i-1}, beta_i = b_{i-1}; P_0 = 0.
        af = torch.cat([torch.zeros_like(A[:, :1]), A[:, :-1]], 1)
        bf = torch.cat([torch.zeros_like(Bv[:, :1]), Bv[:, :-1]], 1)
        # backward (observability): Q_i = A_i^T Q_{i+1} A_i + (A_i^T c_i)(A_i^T c_i)^T.
        if diagonal:
            ar, br = A, A * Cv  # a product: stays in the inputs' dtype
        else:
            A, af, bf, Cv = (x.to(acc) for x in (A, af, bf, Cv))
            ar, br = A.mT, (A.mT @ Cv.unsqueeze(-1)).squeeze(-1)

        q_carry: list[Tensor | None] = [None] * len(bounds)
        if len(bounds) > 1:
            cur = None
            for j in range(len(bounds) - 1, 0, -1):
                p0, p1 = bounds[j]
                q_carry[j] = cur
                cur = affine_scan(ar[:, p0:p1], br[:, p0:p1], cur, diagonal=diagonal, reverse=True, acc=acc)[
                    :, 0
                ]
            q_carry[0] = cur

        p_carry = None
        pieces = []
        for j, (p0, p1) in enumerate(bounds[: last_needed + 1]):
            lo, hi = sel[j]
            Pc = affine_scan(af[:, p0:p1], bf[:, p0:p1], p_carry, diagonal=diagonal, acc=acc)
            p_carry = Pc[:, -1]
            if hi == lo:
                continue
            Qc = affine_scan(ar[:, p0:p1], br[:, p0:p1], q_carry[j], diagonal=diagonal, reverse=True, acc=acc)
            first, last = pos_list[lo] - p0, pos_list[hi - 1] - p0
            if last - first + 1 == hi - lo:  # a contiguous range: slice, no copy
                Pi, Qi = Pc[:, first : last + 1], Qc[:, first : last + 1]
            else:
                idx = positions[lo:hi].to(Pc.device) - p0
                Pi, Qi = Pc[:, idx], Qc[:, idx]
            pieces.append(singular_values_from_gramians(Pi, Qi))
        out.append(torch.cat(pieces, 1))
    return torch.cat(out, 0).to(b.dtype)
