"""The contract every causal operator ``y = T u`` of the engine implements, and the checks they share.

An :class:`Operator` has a sequence length ``L``, free leading batch dimensions (``[batch, heads]`` or
``[batch, channels]`` in practice), a dtype and a device; it applies itself to inputs, materializes ``T``
and cuts itself to a subset of its batch without building what it leaves out. The engine measures two
forms: :class:`~ess_train.ess.operators.dense.DenseOperator` (``T`` itself) and
:class:`~ess_train.ess.operators.recurrent.RecurrentOperator` (a state-space realization ``a, b, c``).
Structured operators (:mod:`.structured`) are one of the two forms, built from smaller factors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

__all__ = ["Operator", "compute_dtype", "check_finite", "check_floating", "select_batch", "check_input"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype ESS math runs in: float64 stays, everything else floating runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_floating(name: str, x: Tensor) -> None:
    """Raise ``TypeError`` naming ``name`` unless ``x`` is a floating-point tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got dtype {x.dtype} (shape {tuple(x.shape)})"
        )


def check_finite(name: str, x: Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` when ``x`` holds NaN or inf."""
    if x.numel() and not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(
            f"{name} (shape {tuple(x.shape)}) contains non-finite values: {n_nan} NaN and {n_inf} inf"
        )


def select_batch(
    x: Tensor, batch_shape: torch.Size, tail: int, rows: int | None = None, index: Tensor | None = None
) -> Tensor:
    """``x`` (batch dims broadcastable to ``batch_shape``, then ``tail`` own dims) cut to its first ``rows``
    rows of batch dim 0 and the entries ``index`` of batch dim 1. Broadcast dims are expanded as views, so
    only the selected part is ever materialized; the autograd graph is kept."""
    x = x.expand(*batch_shape, *x.shape[x.dim() - tail :])
    if rows is not None:
        x = x[:rows]
    if index is not None:
        x = x.index_select(1, index.to(x.device))
    return x


def check_input(u: Tensor, L: int, batch_shape: torch.Size) -> bool:
    """Validate ``u`` for ``apply``; returns True when ``u`` is ``[..., L]`` (a vector per operator)."""
    check_floating("u", u)
    nb = len(batch_shape)
    if u.dim() == nb + 1 and u.shape[-1] == L:
        vec = True
    elif u.dim() == nb + 2 and u.shape[-2] == L:
        vec = False
    else:
        raise ValueError(
            f"u must have shape {(*batch_shape, L)} or {(*batch_shape, L)} + (P,) for an operator with batch "
            f"shape {tuple(batch_shape)} and L={L}; got {tuple(u.shape)}"
        )
    lead = u.shape[:nb]
    if torch.broadcast_shapes(lead, batch_shape) != batch_shape:
        raise ValueError(
            f"u's leading dims {tuple(lead)} do not match the operator's batch shape {tuple(batch_shape)}"
        )
    return vec


class Operator(ABC):
    """A batch of causal linear operators ``y = T u``, ``T[..., t, s] = 0`` for ``s > t``."""

    @property
    @abstractmethod
    def seq_len(self) -> int:
        """``L``."""

    @property
    @abstractmethod
    def batch_shape(self) -> torch.Size:
        """The leading dims (one operator per entry)."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @abstractmethod
    def apply(self, u: Tensor) -> Tensor:
        """``T u`` for ``u`` of shape ``[..., L]`` or ``[..., L, P]``."""

    @abstractmethod
    def dense(self) -> Tensor:
        """``T`` as ``[..., L, L]``."""

    @abstractmethod
    def subset(self, rows: int | None = None, index: Tensor | None = None) -> Operator:
        """The operators of the first ``rows`` entries of batch dim 0 and the entries ``index`` of batch
        dim 1 (``None``: all), built from cut factors: nothing of the full batch's size is materialized."""

    @property
    def num_operators(self) -> int:
        """How many operators the batch holds."""
        return self.batch_shape.numel()
