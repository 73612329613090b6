"""Token-by-token references of the mixers (slow, obviously right; tests only).

- :func:`reference_y` (attention family): takes a mixer and its input ``x: [B, L, d_model]`` and returns the
  sequence-mixing output ``y: [B, H, L, d_v]`` (what ``mixer.operator(x).y`` must equal), from the mixer's
  per-token features (``mixer.features(x)``: projections, feature maps, gates) and an explicit loop over
  tokens;
- :func:`reference_forward` (SSM and convolution mixers): the whole layer's output ``[B, L, d_model]`` (what
  ``mixer(x)`` must equal), from the layer's parameters and an explicit loop over tokens.

Kernel-level references (the recurrences alone) are in ``ess_train/models/ops/naive.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ess_train.models.ops.naive import delta_rule_reference, gated_reference

__all__ = ["reference_y", "reference_forward"]


def attention_reference(m, x: Tensor) -> Tensor:
    """Softmax over the keys each query may see (``s <= t``, and ``s > t - window`` when windowed)."""
    f = m.features(x)
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
    f = m.features(x)
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


def decayed_reference(m, x: Tensor) -> Tensor:
    f = m.features(x)
    log_a = f["log_decay"][None, :, None, None].expand(f["k"].shape)
    return gated_reference(f["q"], f["k"], f["v"], log_a, m.scale)


def gla_reference(m, x: Tensor) -> Tensor:
    f = m.features(x)
    return gated_reference(f["q"], f["k"], f["v"], f["gk"], m.scale)


def deltanet_reference(m, x: Tensor) -> Tensor:
    f = m.features(x)
    return delta_rule_reference(f["q"], f["k"], f["v"], f["beta"], m.scale)


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


# ---------------------------------------------------------------------------------- whole layers
def mamba_reference(m, x: Tensor) -> Tensor:
    """mamba_ssm's ``Mamba.step`` unrolled: conv state, SSM state, one token at a time."""
    B, L, _ = x.shape
    W = m.conv1d.weight[:, 0, :]
    conv_state = x.new_zeros(B, m.d_inner, m.d_conv)
    h = x.new_zeros(B, m.d_inner, m.d_state)
    A = -torch.exp(m.A_log)
    outs = []
    for t in range(L):
        xi, z = m.in_proj(x[:, t]).chunk(2, dim=-1)
        conv_state = torch.cat([conv_state[:, :, 1:], xi[:, :, None]], dim=-1)
        u = (conv_state * W).sum(-1)
        if m.conv1d.bias is not None:
            u = u + m.conv1d.bias
        u = F.silu(u)
        dt_in, Bt, Ct = m.x_proj(u).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
        dt = F.softplus(m.dt_proj(dt_in))
        h = torch.exp(dt[..., None] * A) * h + dt[..., None] * Bt[:, None, :] * u[..., None]
        y = (h * Ct[:, None, :]).sum(-1) + m.D * u
        outs.append(m.out_proj(y * F.silu(z)))
    return torch.stack(outs, dim=1)


def s4d_reference(m, x: Tensor) -> Tensor:
    B, L, H = x.shape
    dt = m.log_dt.exp()[:, None]
    a, b = torch.exp(-dt * m.A_log.exp()), dt * m.B
    s = x.new_zeros(B, H, m.d_state)
    outs = []
    for t in range(L):
        s = a * s + b * x[:, t, :, None]
        y = (m.C * s).sum(-1) + m.D * x[:, t]
        if m.activation == "gelu":
            y = F.gelu(y)
        y = m.output_linear(y)
        outs.append(F.glu(y, dim=-1) if m.gated_output else y)
    return torch.stack(outs, dim=1)


def short_conv_reference(m, x: Tensor) -> Tensor:
    taps = m.conv.weight[:, 0, :].flip(-1)  # taps[:, j] on lag j
    outs = []
    for t in range(x.shape[1]):
        y = sum(taps[:, j] * x[:, t - j] for j in range(m.kernel_size) if t - j >= 0)
        if m.conv.bias is not None:
            y = y + m.conv.bias
        outs.append(F.silu(y) if m.activation == "silu" else y)
    return torch.stack(outs, dim=1)


def hyena_reference(m, x: Tensor) -> Tensor:
    """``y_t = x0_t (sum_{s <= t} h[t - s] x1_s v_s + bias x1_t v_t)`` with an explicit sum."""
    L = x.shape[1]
    uc = m.short_filter(m.in_proj(x).transpose(1, 2))[..., :L]
    x0, x1, v = uc.split(m.d_model, dim=1)
    h = m.filter(L, x.dtype)
    w = x1 * v
    ys = []
    for t in range(L):
        acc = sum(h[:, t - s] * w[..., s] for s in range(t + 1)) + m.bias * w[..., t]
        ys.append(x0[..., t] * acc)
    return m.out_proj(torch.stack(ys, dim=-1).transpose(1, 2))


def reference_forward(m, x: Tensor) -> Tensor:
    """The layer's output ``m(x)`` token by token; dispatch on the mixer's class name."""
    table = {
        "Mamba": mamba_reference,
        "S4D": s4d_reference,
        "ShortConv": short_conv_reference,
        "Hyena": hyena_reference,
    }
    return table[type(m).__name__](m, x)
