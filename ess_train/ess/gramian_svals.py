"""Hankel singular values from the Gramians ``P = R R^T``, ``Q = O^T O`` at each position (the last step of
:mod:`ess_train.ess.gramian`): a jittered Cholesky ``F F^T = P + J``, then ``eigvalsh(F^T Q F)`` with the
jitter's and the eigensolver's bound subtracted, and closed-form gradients of the eigenvalues. Run in
float64 for every operator (see ``gramian``'s module docstring, "Precision").
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "singular_values_from_gramians",
    "safe_sqrt",
    "CLOSED_FORM_GRADIENT",
    "JITTER_EPS",
    "JITTER_GROWTH",
]


# Gradients of the eigenvalues in closed form (:class:`_GramianEigvals`); False: autograd through the
# Cholesky factor and ``eigvalsh`` (the previous path; same values, ~2x the backward work of this step).
CLOSED_FORM_GRADIENT = True

# Cholesky jitter J = JITTER_EPS * eps * diag(P) (+ tiny) on the balanced P first; for the (rare)
# matrices where round-off still leaves P + J indefinite, JITTER_GROWTH times more, until it factors.
JITTER_EPS = 4.0
JITTER_GROWTH = 10.0


def _jitter_ladder(A: Tensor, J: Tensor, base: Tensor, bad: Tensor, eps_j: float) -> Tensor:
    """Raise the jitter ``J`` (already in ``A``) of the ``bad`` matrices until ``A`` factors (no grad)."""
    J0 = J
    while bool(bad.any()):
        eps_j = max(eps_j * JITTER_GROWTH, torch.finfo(A.dtype).eps)
        J = torch.where(bad.unsqueeze(-1), eps_j * base, J)
        if eps_j >= 1.0:  # jitter of the size of diag(P): positive definite whatever the round-off
            break
        _, info = torch.linalg.cholesky_ex(A[bad] + torch.diag_embed((J - J0)[bad]))
        bad = bad.clone()
        bad[bad.clone()] = info > 0
    return J


class _GramianEigvals(torch.autograd.Function):
    """Eigenvalues of ``M = F^T Q F`` (ascending) with ``F F^T = P + J`` (``F``, ``J``: constants), and
    their gradients in closed form, without differentiating the Cholesky factor or ``M``.

    ``lambda_k`` is an eigenvalue of ``(P + J) Q`` with right eigenvector ``x_k = F v_k`` and left
    eigenvector ``y_k = Q x_k`` (``y_k^T x_k = lambda_k``), so ``d lambda_k = y_k^T dP y_k / lambda_k +
    x_k^T dQ x_k``: ``dL/dP = Y diag(g / lambda) Y^T``, ``dL/dQ = X diag(g) X^T`` (symmetric, and
    basis-independent within a repeated eigenvalue when ``g`` is equal there, as ``eigh``'s
    ``V diag(g) V^T``). Finite: ``||y_k||^2 <= ||Q|| lambda_k``, and the caller passes ``g = 0`` where
    ``lambda_k`` is at most its round-off bound (clamped to 0). Half the backward work of autograd
    through ``cholesky`` and ``F^T Q F``, which matters in float64 (:data:`GRAMIAN_ACCUMULATE`).
    """

    @staticmethod
    def forward(ctx, P: Tensor, Q: Tensor, F: Tensor) -> Tensor:  # noqa: ANN001
        M = F.mT @ (Q @ F)
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return torch.linalg.eigvalsh(M)
        lam, V = torch.linalg.eigh(M)
        ctx.save_for_backward(F @ V, Q, lam)
        return lam

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # noqa: ANN001
        X, Q, lam = ctx.saved_tensors
        dP = dQ = None
        if ctx.needs_input_grad[0]:
            ok = (g != 0) & (lam > 0)
            w = torch.where(ok, g / torch.where(ok, lam, torch.ones_like(lam)), torch.zeros_like(lam))
            Y = Q @ X
            dP = (Y * w.unsqueeze(-2)) @ Y.mT
        if ctx.needs_input_grad[1]:
            dQ = (X * g.unsqueeze(-2)) @ X.mT
        return dP, dQ, None


def singular_values_from_gramians(P: Tensor, Q: Tensor) -> Tensor:
    """Non-zero singular values of ``O R`` from ``P = R R^T`` and ``Q = O^T O``: ``[..., N, N] -> [..., N]``.

    Sorted descending; exactly 0 where the product has no such direction (see module docstring).
    The jitter is per diagonal entry, ``J = JITTER_EPS * eps * diag(P)``, so the computation does not
    depend on how the states are scaled: for a state rescaling ``b -> D b``, ``c -> D^-1 c`` (same
    ``T``; ``P -> D P D``, ``Q -> D^-1 Q D^-1``) the factor becomes ``D F``, ``F^T Q F`` and the
    jitter bound ``J^1/2 Q J^1/2`` are unchanged. It is the same as balancing the Gramians first
    (``D = (diag Q / diag P)^1/4``) and factoring with a jitter proportional to the balanced
    diagonal, without the extra passes.
    """
    N = P.shape[-1]
    if P.numel() == 0:
        return P.new_zeros(P.shape[:-1])
    finfo = torch.finfo(P.dtype)
    eps_j = JITTER_EPS * finfo.eps
    with torch.no_grad():
        d = torch.diagonal(P, dim1=-2, dim2=-1).clamp_min(0)
        dmax = d.amax(-1, keepdim=True)
        empty = dmax.squeeze(-1) <= 0  # no past reaches the state: H_i = 0
        dQ = torch.diagonal(Q, dim1=-2, dim2=-1).clamp_min(0)
        trQ = dQ.sum(-1)
        # per-diagonal jitter (Cholesky's round-off is relative to each pivot's own diagonal: the
        # scaling-invariant choice). States that P barely reaches get a floor s_max^2 / (N dQ_k),
        # s_k = sqrt(dP_k dQ_k) (invariant under rescalings), i.e. J_k Q_kk <= eps_j s_max^2 / N:
        # no tiny pivots (finite Cholesky gradients) at the cost of at most doubling tau_J.
        rQ = dQ.sqrt()
        smax = (d.sqrt() * rQ).amax(-1, keepdim=True)
        floor = torch.where(rQ > 0, smax / torch.where(rQ > 0, rQ, torch.ones_like(rQ)), torch.zeros_like(rQ))
        floor = torch.where((smax > 0) & (rQ > 0), floor.square() / N, dmax / N)
        floor = torch.where(torch.isfinite(floor), floor, dmax / N)
        base = torch.maximum(d, floor) + finfo.tiny / max(eps_j, finfo.eps)
    with torch.no_grad():  # the factor is a constant for autograd: see _GramianEigvals
        A = P.detach().clone()
        if bool(empty.any()):  # factor I there instead (no denormal pivots); results are masked to 0
            A[empty] = torch.eye(N, dtype=P.dtype, device=P.device)
            base = torch.where(empty.unsqueeze(-1), torch.ones_like(base), base)
        J = eps_j * base
        A.diagonal(dim1=-2, dim2=-1).add_(J)
        F, info = torch.linalg.cholesky_ex(A)
        bad = info > 0
        if bool(bad.any()):
            J_new = _jitter_ladder(A, J, base, bad, eps_j)
            A.diagonal(dim1=-2, dim2=-1).add_(J_new - J)
            J = J_new
            F = F.clone()
            F[bad] = torch.linalg.cholesky_ex(A[bad])[0]
    if CLOSED_FORM_GRADIENT or not (torch.is_grad_enabled() and (P.requires_grad or Q.requires_grad)):
        lam = _GramianEigvals.apply(P, Q, F).flip(-1)
    else:  # autograd through the Cholesky factor and eigvalsh (the previous path, for benchmarks)
        A = P.clone()
        A[empty] = torch.eye(N, dtype=P.dtype, device=P.device)
        A.diagonal(dim1=-2, dim2=-1).add_(J)
        F = torch.linalg.cholesky_ex(A)[0]
        lam = torch.linalg.eigvalsh(F.mT @ (Q @ F)).flip(-1)
    with torch.no_grad():
        # Weyl: the jitter raises each eigenvalue by at most ||X||_2, X = J^1/2 Q J^1/2, bounded by
        # ||X||_F = sqrt(J^T (Q o Q) J), computed as tr(Q) max(J) sqrt(Jn^T (Qn o Qn) Jn) with
        # Qn = Q / tr Q, Jn = J / max J (no underflow); invariant under state rescalings (see above).
        # The eigensolver's round-off ~ eps ||M||.
        trQ_safe = torch.where(trQ > 0, trQ, torch.ones_like(trQ))
        Qn = Q / trQ_safe[..., None, None]
        Jmax = J.amax(-1)
        Jn = J / Jmax.unsqueeze(-1)
        tau_j = ((Qn * Qn) @ Jn.unsqueeze(-1)).squeeze(-1).mul(Jn).sum(-1).sqrt() * trQ * Jmax
        tau = tau_j + finfo.eps * _norm(lam, (-1,))
        tau = torch.where(~empty & (trQ > 0), tau, torch.inf)
    lam = (lam - tau.unsqueeze(-1)).clamp_min(0)
    return safe_sqrt(lam)


def _norm(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Euclidean norm over ``dims``, scaled so that tiny entries do not underflow when squared."""
    m = x.abs().amax(dims, keepdim=True)
    m = torch.where(m > 0, m, torch.ones_like(m))
    return (x / m).square().sum(dims).sqrt() * m.reshape(m.shape[: m.dim() - len(dims)])


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x >= 0`` with gradient 0 (instead of inf) where ``x == 0``."""
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x))
