"""Qwen3-Next's ``Qwen3NextGatedDeltaNet`` (transformers' torch path): the kernel call, recorded.

While a capture is open, the modeling module's ``torch_chunk_gated_delta_rule`` (looked up as a module
global at each call) is replaced by a recording wrapper; a pre-hook on the layer tells the wrapper which
layer is calling. It sees exactly what the kernel sees, so the operator is the kernel's: per value head,
full transitions ``A_t = exp(g_t) (I - beta_t k_t k_t^T)``, ``b_t = beta_t k_t``, ``c_t = q_t / sqrt(d_k)``
(``q``, ``k`` L2-normalized when the kernel flag says so), acting on the head's ``d_v`` value channels.
Kernel flags other than the known ones, an initial state and packed rows are refused. Checked only on
CPU with transformers' torch kernel (fla's GPU kernel, which transformers prefers when fla is installed,
is a different call target: not captured, and then the layer reports "not called").
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, MutableMapping
from typing import Any

import torch

from ess_train.adapters.base import AdaptedLayer, CaptureError, calling_layer, check_exact, swapped_attribute
from ess_train.adapters.hf_mamba import refuse_ssm_call
from ess_train.ess import RecurrentOperator
from ess_train.models.protocol import OperatorView, StateSize

__all__ = ["GatedDeltaNetAdapter", "KERNEL", "KNOWN_FLAGS"]

KERNEL = "torch_chunk_gated_delta_rule"
#: kernel keywords the adapter understands (anything else with a value is refused)
KNOWN_FLAGS = {
    "g",
    "beta",
    "chunk_size",
    "initial_state",
    "output_final_state",
    "use_qk_l2norm_in_kernel",
    "cu_seqlens",
}
#: model-level keywords that reach the kernel through ``**kwargs`` and do not change its math
IGNORED = {
    "position_ids",
    "cache_position",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "output_router_logits",
    "return_dict",
    "position_embeddings",
}

_CALLER: list[tuple[GatedDeltaNetAdapter, MutableMapping[str, OperatorView], str]] = []


def _wrapper(original: Any) -> Any:
    def recording(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if _CALLER:
            adapter, sink, name = _CALLER[-1]
            sink[name] = adapter._view(name, args, kwargs, out)
        return out

    recording.__wrapped__ = original  # type: ignore[attr-defined]
    return recording


def _patched(module_name: str) -> contextlib.AbstractContextManager:
    """The modeling module's torch kernel replaced by its recording wrapper while the capture is open."""
    mod = sys.modules[module_name]
    if getattr(mod, KERNEL, None) is None:
        raise CaptureError(f"{module_name} has no {KERNEL}: this transformers version is not supported")
    return swapped_attribute(mod, KERNEL, _wrapper)


class GatedDeltaNetAdapter(AdaptedLayer):
    """``Qwen3NextGatedDeltaNet``: one full-transition operator of state ``d_k`` per value head.

    State size: total ``n_v_heads * d_k * d_v``, per operator ``min(d_k, L // 2)``, multiplicity ``d_v``.
    """

    kind = "gated_deltanet"

    def state_size(self, seq_len: int) -> StateSize:
        m = self.module
        dk, dv = int(m.head_k_dim), int(m.head_v_dim)
        return StateSize(
            total=int(m.num_v_heads) * dk * dv, per_operator=min(dk, seq_len // 2), multiplicity=dv
        )

    @contextlib.contextmanager
    def _capture(self, sink: MutableMapping[str, OperatorView], name: str) -> Iterator[None]:
        def refuse(args: tuple, kwargs: dict[str, Any]) -> None:
            refuse_ssm_call(name, self.module, args[0] if args else kwargs["hidden_states"], kwargs)

        with (
            calling_layer(self.module, (self, sink, name), _CALLER, refuse),
            _patched(type(self.module).__module__),
        ):
            yield

    def _view(self, name: str, args: tuple, kwargs: dict[str, Any], out: Any) -> OperatorView:
        cls = type(self.module).__name__
        unknown = sorted(k for k, v in kwargs.items() if k not in KNOWN_FLAGS | IGNORED and v is not None)
        if unknown or len(args) > 5:
            raise CaptureError(f"layer {name!r} ({cls}): unknown kernel flags {unknown or args[5:]}; refused")
        if kwargs.get("initial_state") is not None:
            raise CaptureError(f"layer {name!r} ({cls}): the kernel continues from a state (generation)")
        if kwargs.get("cu_seqlens") is not None:
            raise CaptureError(f"layer {name!r} ({cls}): packed sequences (cu_seqlens) cannot be captured")
        q, k, v = args[:3]
        g = kwargs["g"] if "g" in kwargs else args[3]
        beta = kwargs["beta"] if "beta" in kwargs else args[4]
        rep = v.shape[2] // k.shape[2]
        if rep > 1:
            q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
        q, k, v, g, beta = (x.transpose(1, 2).float() for x in (q, k, v, g, beta))  # [B, H, L, ...]
        if kwargs.get("use_qk_l2norm_in_kernel", False):
            l2norm = sys.modules[type(self.module).__module__].l2norm
            q, k = l2norm(q, dim=-1, eps=1e-6), l2norm(k, dim=-1, eps=1e-6)
        c = q * q.shape[-1] ** -0.5
        eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
        a = torch.exp(g)[..., None, None] * (eye - beta[..., None, None] * k[..., :, None] * k[..., None, :])
        op = RecurrentOperator(a, beta[..., None] * k, c)
        view = OperatorView(op=op, u=v, y=None)  # type: ignore[arg-type]
        if self.check and self.checked_error is None:
            view.y = op.apply(v)
            ref = (out[0] if isinstance(out, tuple) else out).transpose(1, 2)
            self.checked_error = check_exact(name, self.module, view.y, ref, "gated delta rule output")
        return view
