"""Naive token-by-token references of the kernels in :mod:`ess_train.models.ops` (slow, obviously right).

Each is the kernel's recurrence written as a Python loop over the sequence, with plain autograd: what the
tests compare the fast kernels' outputs and (through autograd) gradients with, and what the benchmarks time
them against (as fla's ``ops/*/naive.py``). Nothing in the package calls them.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "selective_scan_reference",
    "mamba_scan_reference",
    "gated_reference",
    "delta_rule_reference",
    "causal_conv_reference",
]


def selective_scan_reference(log_a: Tensor, x: Tensor) -> Tensor:
    """All states of ``h_t = exp(log_a_t) h_{t-1} + x_t`` (``h_{-1} = 0``) over dim ``-2`` of ``[..., L, N]``
    (reference of :func:`~ess_train.models.ops.selective_scan`)."""
    a = log_a.exp()
    h = torch.zeros_like(x[..., 0, :])
    states = []
    for a_t, x_t in zip(a.unbind(-2), x.unbind(-2)):
        h = a_t * h + x_t
        states.append(h)
    return torch.stack(states, dim=-2) if states else x.clone()


def mamba_scan_reference(dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, u: Tensor) -> Tensor:
    """``h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t``, ``y_t = C_t . h_t`` token by token, ``y [b, D, L]``
    (reference of :func:`~ess_train.models.ops.mamba_scan`)."""
    log_a = dt[..., None] * A[:, None, :]
    h = selective_scan_reference(log_a, (dt * u)[..., None] * Bm[:, None])
    return torch.einsum("bdln,bln->bdl", h, Cm)


def gated_reference(q: Tensor, k: Tensor, v: Tensor, log_a: Tensor, scale: float) -> Tensor:
    """``S_t = diag(exp(log_a_t)) S_{t-1} + k_t v_t^T``, ``y_t = scale * S_t^T q_t`` over ``[B, H, L, d]``
    (reference of :func:`~ess_train.models.ops.chunk_linear_attention` and its constant-decay variant)."""
    S = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])
    ys = []
    for t in range(q.shape[-2]):
        S = torch.exp(log_a[..., t, :, None]) * S + k[..., t, :, None] * v[..., t, None, :]
        ys.append(scale * (q[..., t, :, None] * S).sum(-2))
    return torch.stack(ys, dim=-2)


def delta_rule_reference(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, scale: float = 1.0) -> Tensor:
    """fla's ``delta_rule_recurrence``: ``S += k_t (beta_t (v_t - S^T k_t))^T``, ``y_t = scale * S^T q_t``
    over ``[B, H, L, d]`` (reference of :func:`~ess_train.models.ops.chunk_delta_rule`)."""
    S = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])
    ys = []
    for t in range(q.shape[-2]):
        kt = k[..., t, :]
        v_new = beta[..., t, None] * (v[..., t, :] - (S * kt[..., :, None]).sum(-2))
        S = S + kt[..., :, None] * v_new[..., None, :]
        ys.append(scale * (q[..., t, :, None] * S).sum(-2))
    return torch.stack(ys, dim=-2)


def causal_conv_reference(u: Tensor, k: Tensor) -> Tensor:
    """``y[t] = sum_{j <= t} k[j] u[t - j]`` over the last dim of ``u [..., L]``, ``k [..., L]``, an explicit
    sum (reference of :func:`~ess_train.models.ops.fft_causal_conv`)."""
    L = u.shape[-1]
    return torch.stack([sum(k[..., j] * u[..., t - j] for j in range(t + 1)) for t in range(L)], -1)
