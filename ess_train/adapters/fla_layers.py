"""flash-linear-attention (fla) layers: ``GatedLinearAttention``, ``DeltaNet``, ``GatedDeltaNet``.

While a capture is open, the kernel functions the layer's module calls (module globals such as
``fla.layers.gla.fused_recurrent_gla``, looked up at each call) are replaced by recording wrappers; a
pre-hook on the layer tells the wrapper which layer is calling. The wrapper sees exactly what the kernel
sees, so the operator is the kernel's, per head and acting on the kernel's ``v`` (after the layer's short
convolutions and activations; the output norm, gate and ``o_proj`` stay outside):

- GLA: diagonal ``a_t = exp(gk_t)``, ``b_t = k_t``, ``c_t = scale q_t``;
- DeltaNet: ``A_t = I - beta_t k_t k_t^T``, ``b_t = beta_t k_t``, ``c_t = scale q_t``;
- GatedDeltaNet: ``A_t = exp(g_t) (I - beta_t k_t k_t^T)``; fla 0.6 computes the gate
  (``-exp(A_log) softplus(g + dt_bias)``), ``sigmoid(beta)`` (times 2 with ``allow_neg_eigval``) and the
  q/k L2 norm inside the kernel through flags, which the adapter applies the same way.

Kernel keywords are read through a per-version table (:data:`KERNEL_ARGS`): a keyword not in it is refused
(:class:`CaptureError` naming it), as are an initial state, packed rows (``cu_seqlens``) and options the
adapter does not model (``gv``, ``reverse``, per-key gates). Checked on CPU only, with fla's Triton kernels
routed to fla's naive torch references (``tests/fla_cpu.py``); not yet against the Triton kernels.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, MutableMapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ess_train.adapters.base import AdaptedLayer, CaptureError, calling_layer, check_exact, swapped_attribute
from ess_train.ess import DeltaRuleOperator, RecurrentOperator
from ess_train.models.protocol import OperatorView, StateSize

__all__ = ["FLAAdapter", "FLA_LAYERS", "KERNEL_ARGS", "TESTED_FLA", "require_fla"]

#: fla versions whose kernel signatures are in :data:`KERNEL_ARGS` (the adapters' tests ran on these)
TESTED_FLA = ("0.6.0",)

_GLA_FR = (
    "q",
    "k",
    "v",
    "gk",
    "gv",
    "scale",
    "initial_state",
    "output_final_state",
    "reverse",
    "state_v_first",
    "cu_seqlens",
)
_GLA_CH = (
    "q",
    "k",
    "v",
    "g",
    "scale",
    "initial_state",
    "output_final_state",
    "state_v_first",
    "cu_seqlens",
    "cu_seqlens_cpu",
)
_DR = (
    "q",
    "k",
    "v",
    "beta",
    "scale",
    "initial_state",
    "output_final_state",
    "use_qk_l2norm_in_kernel",
    "cu_seqlens",
    "cu_seqlens_cpu",
)
_GDR_CH = (
    "q",
    "k",
    "v",
    "g",
    "beta",
    "scale",
    "initial_state",
    "output_final_state",
    "use_qk_l2norm_in_kernel",
    "use_beta_sigmoid_in_kernel",
    "allow_neg_eigval",
    "state_v_first",
    "cu_seqlens",
    "cu_seqlens_cpu",
    "chunk_indices",
    "cp_context",
    "use_gate_in_kernel",
    "A_log",
    "dt_bias",
)
_GDR_FR = (
    "q",
    "k",
    "v",
    "g",
    "gk",
    "gv",
    "beta",
    "scale",
    "initial_state",
    "output_final_state",
    "use_qk_l2norm_in_kernel",
    "use_gate_in_kernel",
    "A_log",
    "dt_bias",
    "use_beta_sigmoid_in_kernel",
    "allow_neg_eigval",
    "state_v_first",
    "cu_seqlens",
)

#: fla version -> kernel global -> the kernel's arguments in positional order (anything else is refused)
KERNEL_ARGS: dict[str, dict[str, tuple[str, ...]]] = {
    "0.6.0": {
        "fused_recurrent_gla": _GLA_FR,
        "chunk_gla": _GLA_CH,
        "fused_chunk_gla": ("q", "k", "v", "g", "scale", "initial_state", "output_final_state"),
        "fused_recurrent_delta_rule": _DR[:-1],
        "chunk_delta_rule": _DR,
        "chunk_gated_delta_rule": _GDR_CH,
        "fused_recurrent_gated_delta_rule": _GDR_FR,
    }
}
#: arguments that must be absent (``None``/``False``): the operator from a zero state over one row each
MUST_BE_OFF = (
    "initial_state",
    "cu_seqlens",
    "cu_seqlens_cpu",
    "chunk_indices",
    "cp_context",
    "gv",
    "gk",
    "reverse",
)
#: exact layer class -> (kind, kernel globals of the layer's module)
FLA_LAYERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "fla.layers.gla.GatedLinearAttention": ("gla", ("fused_recurrent_gla", "chunk_gla", "fused_chunk_gla")),
    "fla.layers.delta_net.DeltaNet": ("deltanet", ("fused_recurrent_delta_rule", "chunk_delta_rule")),
    "fla.layers.gated_deltanet.GatedDeltaNet": (
        "gated_deltanet",
        ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"),
    ),
}


def require_fla() -> str:
    """fla's version, after refusing one whose kernel signatures are not in :data:`KERNEL_ARGS`."""
    import fla

    version = str(getattr(fla, "__version__", "unknown"))
    if version not in KERNEL_ARGS:
        raise ImportError(
            f"flash-linear-attention {version} is not supported by ess_train's fla adapters (kernel "
            f"signatures known for {', '.join(KERNEL_ARGS)}): pip install flash-linear-attention==0.6.0"
        )
    return version


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """The kernels' L2 norm, ``x / sqrt(sum x^2 + eps)``."""
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + eps)


def bind(kernel: str, args: tuple, kwargs: dict[str, Any], version: str) -> dict[str, Any]:
    """The kernel call's arguments by name; :class:`CaptureError` names any argument not in the table."""
    names = KERNEL_ARGS[version][kernel]
    if len(args) > len(names):
        raise CaptureError(f"fla {version} {kernel}: {len(args)} positional arguments, known {len(names)}")
    bound = dict(zip(names, args))
    unknown = sorted(k for k in kwargs if k not in names)
    if unknown:
        raise CaptureError(
            f"fla {version} {kernel}: unknown kernel flag(s) {unknown}; refused (known: {', '.join(names)})"
        )
    bound.update(kwargs)
    return bound


_CALLER: list[tuple[FLAAdapter, MutableMapping[str, OperatorView], str]] = []


def _wrapper(original: Any, kernel: str) -> Any:
    def recording(*args: Any, **kwargs: Any) -> Any:
        if not _CALLER:
            return original(*args, **kwargs)
        adapter, sink, name = _CALLER[-1]
        call = adapter._bind(name, kernel, args, kwargs)  # refuses before the kernel runs
        out = original(*args, **kwargs)
        sink[name] = adapter._view(name, call, out)
        return out

    recording.__wrapped__ = original  # type: ignore[attr-defined]
    return recording


def _patched(module_name: str, kernel: str) -> contextlib.AbstractContextManager:
    """The module global ``kernel`` replaced by its recording wrapper while the capture is open."""
    mod = sys.modules[module_name]
    if getattr(mod, kernel, None) is None:
        raise CaptureError(f"{module_name} has no {kernel}: this fla version is not supported")
    return swapped_attribute(mod, kernel, lambda original: _wrapper(original, kernel))


def _heads_first(x: Tensor) -> Tensor:
    """``[B, T, H, ...] -> [B, H, T, ...]``, in float32 at least."""
    return x.transpose(1, 2).to(torch.promote_types(x.dtype, torch.float32))


class FLAAdapter(AdaptedLayer):
    """One fla layer: one operator of state ``d_k`` per (value) head, acting on its ``d_v`` channels.

    State size: total ``heads d_k d_v``, per operator ``min(d_k, L // 2)``, multiplicity ``d_v``.
    """

    def __init__(self, module: nn.Module, check: bool = True) -> None:
        super().__init__(module, check)
        self.version = require_fla()
        self.kind, self.kernels = FLA_LAYERS[f"{type(module).__module__}.{type(module).__qualname__}"]

    def state_size(self, seq_len: int) -> StateSize:
        m = self.module
        heads = int(getattr(m, "num_v_heads", m.num_heads))
        dk, dv = int(m.head_k_dim), int(m.head_v_dim)
        return StateSize(total=heads * dk * dv, per_operator=min(dk, seq_len // 2), multiplicity=dv)

    @contextlib.contextmanager
    def _capture(self, sink: MutableMapping[str, OperatorView], name: str) -> Iterator[None]:
        cls = type(self.module).__name__

        def refuse_padding(args: tuple, kwargs: dict[str, Any]) -> None:
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            if isinstance(mask, Tensor) and not bool(mask.bool().all()):
                raise CaptureError(
                    f"layer {name!r} ({cls}): ESS capture refuses padded batches "
                    "(attention_mask holds padding); measure unpadded rows of equal length"
                )

        with contextlib.ExitStack() as stack:
            stack.enter_context(calling_layer(self.module, (self, sink, name), _CALLER, refuse_padding))
            for kernel in self.kernels:
                stack.enter_context(_patched(type(self.module).__module__, kernel))
            yield

    def _bind(self, name: str, kernel: str, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        cls = type(self.module).__name__
        try:
            call = bind(kernel, args, kwargs, self.version)
        except CaptureError as exc:
            raise CaptureError(f"layer {name!r} ({cls}): {exc}") from None
        off = [k for k in MUST_BE_OFF if not (self.kind == "gla" and k == "gk")]  # GLA's gate is ``gk``
        on = [k for k in off if call.get(k) not in (None, False)]
        if on:
            raise CaptureError(
                f"layer {name!r} ({cls}): {kernel} called with {on}; ESS capture measures prefill forwards "
                "of unpacked rows from a zero state only (pass use_cache=False, no cu_seqlens)"
            )
        call["kernel"] = kernel
        return call

    def _view(self, name: str, call: dict[str, Any], out: Any) -> OperatorView:
        q, k, v = (_heads_first(call[x]) for x in ("q", "k", "v"))  # [B, H, T, d]
        scale = call.get("scale")
        c = q * (q.shape[-1] ** -0.5 if scale is None else float(scale))
        if self.kind == "gla":
            if k.shape[1] != v.shape[1]:
                raise CaptureError(
                    f"layer {name!r}: GLA kernel with {k.shape[1]} key and {v.shape[1]} "
                    "value heads is not supported"
                )
            gk = _heads_first(call["gk"] if "gk" in call else call["g"])
            op: RecurrentOperator = RecurrentOperator(torch.exp(gk), k, c)
        else:
            beta = _heads_first(call["beta"]) if call.get("beta") is not None else torch.ones_like(k[..., 0])
            if beta.dim() != 3:
                raise CaptureError(f"layer {name!r}: per-channel beta {tuple(beta.shape)} is not supported")
            if call.get("use_beta_sigmoid_in_kernel", False):
                beta = torch.sigmoid(beta) * (2.0 if call.get("allow_neg_eigval", False) else 1.0)
            if call.get("use_qk_l2norm_in_kernel", False):
                c = l2norm(q) * (q.shape[-1] ** -0.5 if scale is None else float(scale))
                k = l2norm(k)
            if v.shape[1] % k.shape[1]:
                raise CaptureError(f"layer {name!r}: {v.shape[1]} value heads over {k.shape[1]} key heads")
            rep = v.shape[1] // k.shape[1]  # grouped value heads: value head i reads key head i // rep
            if rep > 1:
                c, k = c.repeat_interleave(rep, dim=1), k.repeat_interleave(rep, dim=1)
            if self.kind == "deltanet":
                op = DeltaRuleOperator(k, beta, c)
            else:
                op = RecurrentOperator(self._gated_a(call, k, beta), beta[..., None] * k, c)
        view = OperatorView(op=op, u=v, y=None)  # type: ignore[arg-type]
        if self.check and self.checked_error is None:
            view.y = op.apply(v)
            ref = (out[0] if isinstance(out, tuple) else out).transpose(1, 2)
            self.checked_error = check_exact(name, self.module, view.y, ref, f"{call['kernel']} output")
        return view

    @staticmethod
    def _gated_a(call: dict[str, Any], k: Tensor, beta: Tensor) -> Tensor:
        """``A_t = exp(g_t) (I - beta_t k_t k_t^T)``, ``g`` through the in-kernel gate when flagged."""
        g = call.get("g")
        if g is None:
            g = torch.zeros_like(beta)
        else:
            g = _heads_first(g)
            if call.get("use_gate_in_kernel", False):
                if call.get("A_log") is None:
                    raise CaptureError("use_gate_in_kernel=True without A_log")
                bias = call.get("dt_bias")
                g = g + bias.to(g.dtype)[:, None] if bias is not None else g
                g = -call["A_log"].to(g.dtype).exp()[:, None] * F.softplus(g)
        eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
        kk = k[..., :, None] * k[..., None, :]
        return torch.exp(g)[..., None, None] * (eye - beta[..., None, None] * kk)
