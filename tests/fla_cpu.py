"""Run fla 0.6 layers on CPU: route their Triton kernels to fla's own naive torch references.

fla's Triton kernels have no CPU path ("0 active drivers"). :func:`fla_on_cpu` swaps, while it is open,
the module globals the layers call (``fla.layers.gla.fused_recurrent_gla``, ...) for functions that take
the kernels' keywords, apply the kernel flags (q/k L2 norm, beta sigmoid, the GDN gate) and call fla's
references (``fla/ops/gla/naive.py``, ``fla/ops/delta_rule/naive.py``, ``fla/ops/gated_delta_rule/naive.py``,
``naive_gdn_gate``); the short convolution and the RMS norms go to torch (``rms_norm_ref``). This is test
scaffolding only: the adapters are checked through these references on CPU, not through the real kernels.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fla_on_cpu", "l2norm"]


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """fla's kernel L2 norm: ``x / sqrt(sum x^2 + eps)`` (in float32)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


def _refuse(**kw: Any) -> None:
    bad = [k for k, v in kw.items() if v not in (None, False)]
    if bad:
        raise NotImplementedError(f"fla_on_cpu does not route {bad}")


def _gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    gv: Tensor | None = None,
    reverse: bool = False,
    cu_seqlens: Tensor | None = None,
    **_: Any,
) -> tuple[Tensor, Any]:
    from fla.ops.gla.naive import naive_recurrent_gla

    _refuse(gv=gv, reverse=reverse, cu_seqlens=cu_seqlens)
    if scale is not None:  # the reference hard-codes K ** -0.5
        q = q * (scale * q.shape[-1] ** 0.5)
    return naive_recurrent_gla(q, k, v, gk, initial_state, output_final_state)


def _chunk_gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, **kw: Any) -> tuple[Tensor, Any]:
    return _gla(q, k, v, g, **kw)


def _delta(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Tensor | None = None,
    **_: Any,
) -> tuple[Tensor, Any]:
    from fla.ops.delta_rule.naive import delta_rule_recurrence

    _refuse(cu_seqlens=cu_seqlens)
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    if scale is not None:
        q = q * (scale * q.shape[-1] ** 0.5)
    q, k, v, beta = (x.transpose(1, 2) for x in (q, k, v, beta))  # the reference is head-first
    o, s = delta_rule_recurrence(q, k, v, beta, initial_state, output_final_state)
    return o.transpose(1, 2), s


def _gated_delta(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: Tensor | None = None,
    dt_bias: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    **_: Any,
) -> tuple[Tensor, Any]:
    from fla.ops.gated_delta_rule.gate import naive_gdn_gate
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    _refuse(cu_seqlens=cu_seqlens)
    if use_gate_in_kernel:
        g = naive_gdn_gate(g, A_log, dt_bias)
    if use_beta_sigmoid_in_kernel:
        beta = beta.float().sigmoid() * (2.0 if allow_neg_eigval else 1.0)
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    rep = v.shape[2] // q.shape[2]  # grouped value heads: value head i reads key head i // rep
    if rep > 1:
        q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
    o, s = naive_recurrent_gated_delta_rule(q, k, v, beta, g, scale, initial_state, output_final_state)
    return o.to(v.dtype), s


def _causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    residual: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    **_: Any,
) -> tuple[Tensor, None]:
    """Depthwise causal conv: ``x [B, T, D]``, ``weight [D, W]``."""
    _refuse(
        initial_state=initial_state,
        output_final_state=output_final_state,
        residual=residual,
        cu_seqlens=cu_seqlens,
    )
    T, W = x.shape[1], weight.shape[-1]
    y = F.conv1d(x.transpose(1, 2), weight[:, None, :], bias, padding=W - 1, groups=x.shape[-1])[..., :T]
    y = y.transpose(1, 2)
    return (F.silu(y) if activation in ("silu", "swish") else y), None


def _short_conv(
    self: Any,
    x: Tensor,
    residual: Tensor | None = None,
    mask: Tensor | None = None,
    cache: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    **_: Any,
) -> tuple[Tensor, None]:
    _refuse(mask=mask, cache=cache, cu_seqlens=cu_seqlens)
    return _causal_conv1d(
        x,
        self.weight[:, 0],
        self.bias,
        self.activation,
        residual=residual,
        output_final_state=output_final_state,
    )


def _rms_norm(
    self: Any,
    x: Tensor,
    residual: Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
) -> Tensor:
    from fla.modules.norm.layernorm import rms_norm_ref

    _refuse(residual=residual, prenorm=prenorm)
    weight = self.weight if self.weight is not None else torch.ones(x.shape[-1], dtype=x.dtype)
    return rms_norm_ref(x, weight, self.bias, eps=self.eps, upcast=True)


def _rms_norm_gated(
    self: Any,
    x: Tensor,
    g: Tensor,
    residual: Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
) -> Tensor:
    from fla.modules.norm.layernorm import rms_norm_ref

    _refuse(residual=residual, prenorm=prenorm)
    weight = self.weight if self.weight is not None else torch.ones(x.shape[-1], dtype=x.dtype)
    y = rms_norm_ref(x, weight, self.bias, eps=self.eps, upcast=True).float()
    act = torch.sigmoid(g.float()) if self.activation == "sigmoid" else F.silu(g.float())
    return (y * act).to(x.dtype)


#: layer module -> {global name: CPU stand-in}
KERNELS = {
    "fla.layers.gla": {"fused_recurrent_gla": _gla, "chunk_gla": _chunk_gla, "fused_chunk_gla": _chunk_gla},
    "fla.layers.delta_net": {"fused_recurrent_delta_rule": _delta, "chunk_delta_rule": _delta},
    "fla.layers.gated_deltanet": {
        "chunk_gated_delta_rule": _gated_delta,
        "fused_recurrent_gated_delta_rule": _gated_delta,
        "causal_conv1d": _causal_conv1d,
    },
}


@contextlib.contextmanager
def fla_on_cpu() -> Iterator[None]:
    """While open, fla's GLA, DeltaNet and GatedDeltaNet layers run on CPU through the naive references."""
    import fla.layers  # noqa: F401  (imports the layer modules)
    from fla.modules import FusedRMSNormGated, RMSNorm, ShortConvolution

    saved: list[tuple[Any, str, Any]] = []
    for mod_name, table in KERNELS.items():
        mod = sys.modules[mod_name]
        for attr, fn in table.items():
            saved.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, fn)
    modules = ((ShortConvolution, _short_conv), (RMSNorm, _rms_norm), (FusedRMSNormGated, _rms_norm_gated))
    for cls, fn in modules:
        saved.append((cls, "forward", cls.__dict__["forward"]))
        cls.forward = fn
    try:
        yield
    finally:
        for owner, attr, value in reversed(saved):
            setattr(owner, attr, value)
