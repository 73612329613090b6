"""The chunkwise delta rule (WY/UT form), DeltaNet's fast forward (plain autograd, no custom backward)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ess_train.models.ops.utils import chunk_plan, kernel_dtype, pad_len

__all__ = ["chunk_delta_rule"]


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
    C, Lp, n = chunk_plan(L, chunk_size)
    out_dtype, dtype = v.dtype, kernel_dtype(q, k, v, beta)
    # padded tokens: beta = 0, k = 0 -> identity transition, no input
    beta = F.pad(beta.to(dtype), (0, Lp - L)).reshape(*lead, n, C, 1)
    q, k, v = (pad_len(x.to(dtype), Lp - L).reshape(*lead, n, C, x.shape[-1]) for x in (q, k, v))
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
