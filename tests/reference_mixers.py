"""Token-by-token references of the attention-family mixers (slow, obviously right; tests only).

Each function takes a mixer and its input ``x: [B, L, d_model]`` and returns the sequence-mixing output
``y: [B, H, L, d_v]`` (what ``mixer.operator(x).y`` must equal), from the mixer's per-token features
(``mixer._features``: projections, feature maps, gates) and an explicit loop over tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["reference_y"]


def attention_reference(m, x: Tensor) -> Tensor:
    """Softmax over the keys each query may see (``s <= t``, and ``s > t - window`` when windowed)."""
    f = m._features(x)
    q, k, v = f["q"], f["k"], f["v"]
    window = getattr(m, "window", None)
    ys = []
    for t in range(x.shape[1]):
        lo = 0 if window is None else max(0, t - window + 1)
        scores = (q[..., t : t + 1, :] @ k[..., lo : t + 1, :].transpose(-1, -2)) * m.scale
        ys.append(torch.softmax(scores, dim=-1) @ v[..., lo : t + 1, :])
    return torch.cat(ys, dim=-2)


def linear_attention_reference(m, x: Tensor) -> Tensor:
    """``S_t = S_{t-1} + phi(k_t) v_t^T``, ``z_t = z_{t-1} + phi(k_t)``,
    ``y_t = phi(q_t)^T S_t / (phi(q_t) . z_t + eps)`` (or ``scale * phi(q_t)^T S_t``)."""
    f = m._features(x)
    q, k, v = f["q"], f["k"], f["v"]
    S = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])
    z = q.new_zeros(*q.shape[:2], q.shape[-1])
    ys = []
    for t in range(x.shape[1]):
        S = S + k[..., t, :, None] * v[..., t, None, :]
        z = z + k[..., t, :]
        num = (q[..., t, :, None] * S).sum(-2)
        if m.normalize:
            ys.append(num / ((q[..., t, :] * z).sum(-1, keepdim=True) + m.eps))
        else:
            ys.append(num * m.scale)
    return torch.stack(ys, dim=-2)


def gated_reference(q: Tensor, k: Tensor, v: Tensor, log_a: Tensor, scale: float) -> Tensor:
    """``S_t = diag(exp(log_a_t)) S_{t-1} + k_t v_t^T``, ``y_t = scale * S_t^T q_t``."""
    S = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])
    ys = []
    for t in range(q.shape[-2]):
        S = torch.exp(log_a[..., t, :, None]) * S + k[..., t, :, None] * v[..., t, None, :]
        ys.append(scale * (q[..., t, :, None] * S).sum(-2))
    return torch.stack(ys, dim=-2)


def decayed_reference(m, x: Tensor) -> Tensor:
    f = m._features(x)
    log_a = f["log_decay"][None, :, None, None].expand(f["k"].shape)
    return gated_reference(f["q"], f["k"], f["v"], log_a, m.scale)


def gla_reference(m, x: Tensor) -> Tensor:
    f = m._features(x)
    return gated_reference(f["q"], f["k"], f["v"], f["gk"], m.scale)


def deltanet_reference(m, x: Tensor) -> Tensor:
    """fla's ``delta_rule_recurrence``: ``S += k_t (beta_t (v_t - S^T k_t))^T``, ``y_t = scale * S^T q_t``."""
    f = m._features(x)
    q, k, v, beta = f["q"], f["k"], f["v"], f["beta"]
    S = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])
    ys = []
    for t in range(x.shape[1]):
        kt = k[..., t, :]
        v_new = beta[..., t, None] * (v[..., t, :] - (S * kt[..., :, None]).sum(-2))
        S = S + kt[..., :, None] * v_new[..., None, :]
        ys.append(m.scale * (q[..., t, :, None] * S).sum(-2))
    return torch.stack(ys, dim=-2)


def reference_y(m, x: Tensor) -> Tensor:
    """Dispatch on the mixer's class name."""
    name = type(m).__name__
    table = {
        "SoftmaxAttention": attention_reference,
        "SlidingWindowAttention": attention_reference,
        "LinearAttention": linear_attention_reference,
        "DecayedLinearAttention": decayed_reference,
        "GatedLinearAttention": gla_reference,
        "DeltaNet": deltanet_reference,
    }
    return table[name](m, x)
