"""Test tolerances derived from the computation's own round-off, not from what one CPU happened to give.

Error model (Higham, *Accuracy and Stability of Numerical Algorithms*, ch. 3): every floating-point
operation has a relative error of at most ``eps / 2``, so a sum, dot product or matmul of ``n`` terms of
magnitude at most ``s`` is off by at most ``~ n * eps * s`` *whatever the order of summation*. Different
CPUs, vector widths (AVX-512, AVX2, NEON, scalar), BLAS/LAPACK (MKL, OpenBLAS, Accelerate) and thread
counts only change that order, so a bound of this form holds on all of them, while a number measured
on one machine (``atol=1e-14``) does not. Hence the one rule here:

    tol(dtype, scale, n, c) = c * n * eps(dtype) * scale

``n``: the length of the longest chain of roundings (terms of a sum, steps of a recurrence), ``scale``:
the magnitude of what is summed (not of the result: cancellation is what the bound is for), ``c``: a
small safety factor for the few roundings per term (a product and a sum, a final division, ...).
Worst-case bounds are linear in ``n``; actual errors grow like ``sqrt(n)``, so ``c = C`` (4) leaves
ample room on any machine while a real bug (a wrong index, a dropped term, a float32 intermediate in a
float64 path) still exceeds the bound by orders of magnitude.

The models specific to the ESS engine (``docs/ESS.md``):

- dense path, :func:`svd_error`: LAPACK's SVD is backward stable, each singular value of ``H_i`` is off
  by at most ``c * max(rows, cols) * eps * sigma_max(H_i)`` (Weyl). Float32 blocks go through their
  smaller Gram matrix in float64 instead (``m = max(rows, cols)`` exact products per entry): ``sigma`` is
  off by at most ``sqrt(m eps64 rank) sigma_max`` plus the input rounding ``eps32 sqrt(rank) sigma_max``,
  both below the same bound at float32 (``rank <= m`` and ``eps32^2 / eps64 = 64``).
- Gramian path, :func:`gramian_eig_error`: ``sigma^2`` are eigenvalues of ``F^T Q F`` with ``P = F F^T``;
  ``P_i``, ``Q_i`` are sums of up to ``L`` outer products, then a Cholesky, two products and ``eigvalsh``
  of ``N x N`` matrices, all *in float64* (the engine accumulates in float64 whatever the operator's
  dtype): an *absolute* error ``c * (L + N) * eps64 * scale_i`` on ``sigma^2`` (the jitter correction is
  of that size too), with the per-position, rescaling-invariant size of the Gramians ``scale_i =
  (sum_k sqrt(P_i[k, k] Q_i[k, k]))^2 >= sigma_max(H_i)^2`` (:func:`gramian_scale`). A singular value is
  therefore off by ``delta / max(sigma, sqrt(delta))`` (:func:`sigma_error_from_eig`): relative ``~ (L +
  N) eps64`` for the large ones, at most ``sqrt(delta) ~ 1e-8 sqrt(scale_i)`` for the tiny ones.
  For a float32 operator (:func:`gramian_sigma_error`) add what float32 itself costs: the in-chunk
  products of ``a`` and ``b`` / ``c`` (diagonal transitions: no sums, kept in float32) have relative
  errors ``<= n eps32`` on each term (``n <= L``: the longest product), i.e. they are the exact terms of a
  perturbed operator with ``|dT[t, s]| <= n eps32 sum_k |c_tk| |phi_k| |b_sk|``, so (Weyl, *not* squared)
  each ``sigma`` moves by at most ``||dH_i||_F <= n eps32 sum_k sqrt(P_i[k, k] Q_i[k, k]) = n eps32
  sqrt(scale_i)``; rounding the inputs to float32 and the result back to float32 are of that form too.
- entropy-ESS, :func:`entropy_ess_error`: propagated from per-singular-value errors term by term
  through ``-p log p`` (the exact extreme change over each term's interval: valid with zero and tiny
  singular values, where the derivative is not), plus its own evaluation.

Set ``ESS_TOLERANCE_LOG=<file>`` to append, for every :func:`assert_within` check, the worst
``error / bound`` ratio to that file (one JSON line per check): the margins on a new machine.
"""

from __future__ import annotations

import json
import math
import os

import torch
from torch import Tensor

__all__ = [
    "C",
    "eps",
    "tol",
    "svd_error",
    "gramian_scale",
    "gramian_eig_error",
    "gramian_sigma_error",
    "sigma_error_from_eig",
    "entropy_ess_error",
    "near_threshold",
    "assert_within",
]

C = 4.0  # default safety factor


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of ``dtype`` (2.2e-16 for float64, 1.2e-7 for float32)."""
    return torch.finfo(dtype).eps


def tol(dtype: torch.dtype, scale=1.0, n: float = 1, c: float = C):
    """``c * n * eps(dtype) * scale``: the round-off of ``n`` chained operations on values of size ``scale``
    (a float, or a tensor for elementwise scales)."""
    return c * n * eps(dtype) * scale


def svd_error(dtype: torch.dtype, sigma_max: Tensor | float, rows: int, cols: int, c: float = C):
    """Absolute error of each singular value of a ``rows x cols`` matrix (backward-stable SVD)."""
    return c * max(rows, cols, 1) * eps(dtype) * sigma_max


def gramian_scale(op) -> Tensor:
    """The size of what the Gramian path sums at each position: ``(sum_k sqrt(P_i[k, k] Q_i[k, k]))^2``,
    ``[..., L, 1]``, from a plain float64 run of the recursions of ``docs/ESS.md`` (``op``: a
    ``RecurrentOperator``).

    Invariant to state rescalings (as the engine is), and a bound on the round-off's effect: rescaled
    so that ``P'[k, k] = Q'[k, k] = s_k = sqrt(P[k, k] Q[k, k])``, a sum of ``n`` terms has componentwise
    errors ``|dP'[j, k]| <= n eps sqrt(s_j s_k)`` (Cauchy-Schwarz on the terms), of 2-norm ``<= n eps
    sum(s)``, and ``||Q'|| <= tr Q' = sum(s)``: ``|d sigma^2| <= n eps sum(s)^2``. At least
    ``sigma_max(H_i)^2``.
    """
    a, b, c = (x.detach().double() for x in (op.a, op.b, op.c))
    L = op.seq_len

    def A(i: int) -> Tensor:
        return torch.diag_embed(a[..., i, :]) if op.diagonal else a[..., i, :, :]

    P = b.new_zeros(*b.shape[:-2], b.shape[-1], b.shape[-1])
    Ps, Qs = [], []
    for i in range(L):  # P_i = A_{i-1} P_{i-1} A_{i-1}^T + b_{i-1} b_{i-1}^T, P_0 = 0
        Ps.append(torch.diagonal(P, dim1=-2, dim2=-1))
        P = A(i) @ P @ A(i).mT + b[..., i, :, None] * b[..., i, None, :]
    Q = torch.zeros_like(P)
    for i in range(L - 1, -1, -1):  # Q_i = A_i^T (c_i c_i^T + Q_{i+1}) A_i, Q_L = 0
        Q = A(i).mT @ (c[..., i, :, None] * c[..., i, None, :] + Q) @ A(i)
        Qs.append(torch.diagonal(Q, dim1=-2, dim2=-1))
    dP, dQ = torch.stack(Ps, -2), torch.stack(Qs[::-1], -2)
    return (dP.clamp_min(0) * dQ.clamp_min(0)).sqrt().sum(-1, keepdim=True) ** 2


def gramian_eig_error(dtype: torch.dtype, scale: Tensor | float, L: int, N: int, c: float = C):
    """Absolute error of the Gramian path's ``sigma^2`` from its sums and eigenproblem (see the module
    docstring), run in ``dtype`` (the engine: float64 for every operator); ``scale``:
    :func:`gramian_scale`."""
    return c * (L + N) * eps(dtype) * scale


def gramian_sigma_error(
    dtype: torch.dtype, sigma: Tensor, scale: Tensor, L: int, N: int, k: int = 1, c: float = C
) -> Tensor:
    """Absolute error of each Gramian-path ``sigma`` for an operator of ``dtype`` (``k`` runs): the float64
    sums and eigenproblem (:func:`gramian_eig_error`, through :func:`sigma_error_from_eig`) plus the
    operator's own dtype: products of up to ``L`` factors, input and output rounding, ``(L + 2)
    eps(dtype) sqrt(scale)`` (module docstring). ``sigma``: reference values ``[..., P, K]``; ``scale``:
    ``[..., P, 1]``."""
    f64 = sigma_error_from_eig(sigma.double(), k * gramian_eig_error(torch.float64, scale, L, N, c))
    return f64 + k * tol(dtype, scale.sqrt(), n=L + 2, c=c)


def sigma_error_from_eig(sigma: Tensor, delta: Tensor | float) -> Tensor:
    """Error of ``sigma = sqrt(lambda)`` when ``lambda`` is off by at most ``delta``: ``delta / max(sigma,
    sqrt(delta))`` (``|d sigma| = |d lambda| / (sigma + sigma')``, and never more than ``sqrt(delta)``)."""
    delta = torch.as_tensor(delta, dtype=sigma.dtype)
    return delta / torch.maximum(sigma, delta.sqrt())


def entropy_ess_error(
    sigma: Tensor, dsigma: Tensor | float, dtype: torch.dtype = torch.float64, c: float = C
) -> Tensor:
    """Bound on ``|ESS(sigma') - ESS(sigma)|`` (entropy-ESS over the last dim) for ``|sigma' - sigma| <=
    dsigma`` elementwise, plus the round-off of evaluating ESS itself in ``dtype``.

    With ``S = sum(sigma)``, ``p = sigma / S`` moves by at most ``dp = (dsigma + p sum(dsigma)) / (S -
    sum(dsigma))``; each term ``f(p) = -p log p`` then by at most its largest change over ``[p - dp, p + dp]``
    (exact for the concave ``f``, finite at ``p = 0`` where ``f'`` is not), so ``H = sum f(p)`` by ``dH`` at
    most their sum, and ``ESS = exp(H)`` by ``ESS * expm1(dH)``. Where ``S <= sum(dsigma)`` nothing is
    resolved: the bound is ``K`` (any value).
    """
    sigma = sigma.double().clamp_min(0)
    dsigma = torch.as_tensor(dsigma, dtype=torch.float64).expand_as(sigma)
    K = sigma.shape[-1]
    S, dS = sigma.sum(-1, keepdim=True), dsigma.sum(-1, keepdim=True)
    resolved = S > dS
    p = sigma / torch.where(S > 0, S, torch.ones_like(S))
    dp = (dsigma + p * dS) / torch.where(resolved, S - dS, torch.ones_like(S))
    lo, hi = (p - dp).clamp(0, 1), (p + dp).clamp(0, 1)

    def f(x: Tensor) -> Tensor:
        return -torch.xlogy(x, x)

    top = f(torch.minimum(torch.maximum(torch.full_like(p, math.exp(-1)), lo), hi))  # max of f on [lo, hi]
    df = torch.maximum(top - f(p), f(p) - torch.minimum(f(lo), f(hi)))
    ess = torch.exp(f(p).sum(-1)) * (S.squeeze(-1) > 0)
    own = tol(dtype, ess, n=K + 2, c=c)  # the sum of K terms, the log and the exp
    bound = ess * torch.expm1(df.sum(-1)) + own
    return torch.where(resolved.squeeze(-1), bound, torch.full_like(bound, float(K)))


def near_threshold(sigma: Tensor, thr: Tensor | float, dsigma: Tensor | float) -> Tensor:
    """Per position (last dim reduced): how many ``sigma`` lie within ``dsigma`` of ``thr``, i.e. may fall
    on either side of it under round-off (tolerance-ESS counts may differ by that many)."""
    return ((sigma - thr).abs() <= dsigma).sum(-1)


def _log(what: str, ratio: float) -> None:
    path = os.environ.get("ESS_TOLERANCE_LOG")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, "what": what, "ratio": ratio}) + "\n")


def _f64(x) -> Tensor:
    # a Python float straight to float64 (torch.as_tensor would round it to float32 first)
    return x.detach().double() if isinstance(x, Tensor) else torch.as_tensor(x, dtype=torch.float64)


def assert_within(actual, expected, bound, what: str = "") -> None:
    """``|actual - expected| <= bound`` elementwise (tensors or floats, broadcasting), with a message that
    names the worst element and by how much it exceeds its bound."""
    a, e, b = (_f64(x) for x in (actual, expected, bound))
    err = (a - e).abs()
    err, b = torch.broadcast_tensors(err, b)
    ratio = torch.where(err == 0, torch.zeros_like(err), err / b)  # 0 / 0: within; NaN stays NaN
    bad = ~(ratio <= 1)  # NaN fails
    worst = float(ratio.max()) if ratio.numel() else 0.0
    _log(what, worst)
    if bool(bad.any()):
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise AssertionError(
            f"{what or 'values'}: {int(bad.sum())} of {bad.numel()} outside their round-off bound; first at "
            f"{idx}: |{a.broadcast_to(err.shape)[idx]:.6g} - {e.broadcast_to(err.shape)[idx]:.6g}| = "
            f"{err[idx]:.3g} > {b[idx]:.3g} (worst: {worst:.3g}x the bound)"
        )
