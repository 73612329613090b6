"""HF ``MambaMixer``, ``FalconMambaMixer`` and ``JambaMambaMixer``: the operator rebuilt from the parameters.

A forward pre-hook (keyword-aware: HF calls mixers as ``mixer(hidden_states, cache=..., attention_mask=...)``)
recomputes, from the mixer's input, ``u = act(conv1d(x-part of in_proj(x)))`` and the selective parameters
``dt = softplus(dt_proj(t))``, ``B``, ``C`` (``t, B, C = x_proj(u)``), and builds one diagonal
:class:`~ess_train.ess.RecurrentOperator` per channel: ``a = exp(dt A)`` with ``A = -exp(A_log)``,
``b = dt B``, ``c = C``. The skip ``D u`` and the gate ``silu(z)`` stay outside the operator. FalconMamba
adds weightless RMS norms on ``t``, ``B`` and ``C`` (its own recipe: the Mamba one applied to it is off by a
third with no error); Jamba's mixer has the same norms with weights. Being rebuilt from the parameters, the
operator is exact under fused training kernels too, and differentiable. Costs one extra set of projections
per layer. The operator is built in the module's compute dtype (float64 stays float64).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, MutableMapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ess_train.adapters.base import AdaptedLayer, CaptureError, check_exact
from ess_train.ess import RecurrentOperator, compute_dtype
from ess_train.models.protocol import OperatorView, StateSize

__all__ = ["MambaAdapter", "FalconMambaAdapter", "JambaMambaAdapter", "refuse_ssm_call", "SSMAdapter"]


def refuse_ssm_call(
    name: str, module: nn.Module, x: Tensor, kwargs: dict[str, Any], getter: str = "get_recurrent_state"
) -> None:
    """Refuse padded batches, packed rows and cached (generation) calls of an HF SSM mixer (``getter``: the
    cache's method giving the layer's carried state; ``get_conv_state`` for a convolution-only mixer)."""
    cls = type(module).__name__
    mask = kwargs.get("attention_mask")
    if isinstance(mask, Tensor) and not bool(mask.bool().all()):
        raise CaptureError(
            f"layer {name!r} ({cls}): ESS capture refuses padded batches (attention_mask holds padding); "
            "measure unpadded rows of equal length"
        )
    if any(kwargs.get(k) is not None for k in ("seq_idx", "cu_seqlens", "cu_seq_lens_q")):
        raise CaptureError(
            f"layer {name!r} ({cls}): packed sequences (seq_idx/cu_seqlens) cannot be captured"
        )
    cache = kwargs.get("cache", kwargs.get("cache_params"))
    if cache is not None:
        get = getattr(cache, getter, None)
        state = get(module.layer_idx, state_idx=0) if callable(get) else None
        if state is not None or x.shape[1] == 1:
            raise CaptureError(
                f"layer {name!r} ({cls}): the call continues from a cached state (generation); ESS capture "
                "measures prefill forwards from a zero state only: pass use_cache=False"
            )


class SSMAdapter(AdaptedLayer):
    """Shared capture of the HF SSM mixers: pre-hook builds the view, forward hook checks it once."""

    def prepare(self, name: str, args: tuple, kwargs: dict[str, Any]) -> Tensor:
        """The mixer's input, after refusing calls that cannot be measured (padding, packing, caches)."""
        x = args[0] if args else kwargs["hidden_states"]
        refuse_ssm_call(name, self.module, x, kwargs)
        return x

    def build(self, x: Tensor) -> tuple[OperatorView, dict[str, Tensor]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def readout(self, y: Tensor, parts: dict[str, Tensor], dtype: torch.dtype) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    @contextlib.contextmanager
    def _capture(self, sink: MutableMapping[str, OperatorView], name: str) -> Iterator[None]:
        pending: list[tuple[OperatorView, dict[str, Tensor]]] = []

        def pre(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            view, parts = self.build(self.prepare(name, args, kwargs))
            if self.check and self.checked_error is None:
                view.y = view.op.apply(view.u)
                pending.append((view, parts))
            sink[name] = view

        def post(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            if not pending:
                return
            view, parts = pending.pop()
            ref = output[0] if isinstance(output, tuple) else output
            rebuilt = self.readout(view.y, parts, ref.dtype)
            self.checked_error = check_exact(name, module, rebuilt, ref, "output")

        handles = [
            self.module.register_forward_pre_hook(pre, with_kwargs=True),
            self.module.register_forward_hook(post, with_kwargs=True),
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


class MambaAdapter(SSMAdapter):
    """``MambaMixer``: one diagonal operator of state ``N`` per inner channel (``d_inner`` of them).

    State size: total ``d_inner * N``, per operator ``min(N, L // 2)``, multiplicity 1. ``view.y`` is filled
    at the checked capture only (nothing downstream reads it; the recurrence costs an ``L``-step loop).
    """

    kind = "mamba"
    norms = False

    def state_size(self, seq_len: int) -> StateSize:
        m = self.module
        N = int(m.ssm_state_size)
        return StateSize(
            total=int(m.intermediate_size) * N, per_operator=min(N, seq_len // 2), multiplicity=1
        )

    def build(self, x: Tensor) -> tuple[OperatorView, dict[str, Tensor]]:
        m = self.module
        L = x.shape[1]
        xs, z = m.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # [B, D, L] each
        u = m.act(m.conv1d(xs.to(m.conv1d.weight.dtype))[..., :L]).to(x.dtype)  # [B, D, L]
        t, B, C = torch.split(
            m.x_proj(u.transpose(1, 2)), [m.time_step_rank, m.ssm_state_size, m.ssm_state_size], dim=-1
        )
        if self.norms:
            t, B, C = m.dt_layernorm(t), m.b_layernorm(B), m.c_layernorm(C)
        dtype = compute_dtype(x.dtype)  # float64 stays float64 (its tolerance-ESS threshold too)
        dt = m.dt_proj.weight @ t.transpose(1, 2)  # [B, D, L]
        dt = F.softplus(dt + m.dt_proj.bias.float().to(dt.dtype)[:, None]).to(dtype)
        A = -torch.exp(m.A_log.to(dtype))  # [D, N]
        a = torch.exp(A[None, :, None, :] * dt[..., None])  # [B, D, L, N]
        b = dt[..., None] * B[:, None].to(dtype)
        c = C[:, None].to(dtype).expand_as(b)
        op = RecurrentOperator(a, b, c)
        view = OperatorView(op=op, u=u.to(dtype), y=None)  # type: ignore[arg-type]
        return view, {"u": u, "z": z}

    def readout(self, y: Tensor, parts: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        m = self.module
        out = (y + parts["u"] * m.D[None, :, None]) * F.silu(parts["z"])
        return m.out_proj(out.transpose(1, 2).to(dtype))


class FalconMambaAdapter(MambaAdapter):
    """``FalconMambaMixer``: Mamba with RMS norms on ``dt``, ``B`` and ``C`` before discretization."""

    kind = "falcon_mamba"
    norms = True


class JambaMambaAdapter(MambaAdapter):
    """Jamba's ``JambaMambaMixer``: Mamba with RMS norms (with weights) on ``dt``, ``B`` and ``C`` before
    discretization, applied where FalconMamba applies its weightless ones."""

    kind = "jamba_mamba"
    norms = True
