"""Causal linear operators ``y = T u`` in the two forms the ESS engine understands.

``DenseOperator`` holds ``T`` itself (softmax attention, anything without a recurrence).
``RecurrentOperator`` holds a state-space realization ``h_t = A_t h_{t-1} + b_t u_t``,
``y_t = c_t . h_t`` with diagonal (``a: [..., L, N]``) or full (``a: [..., L, N, N]``)
transitions, so that ``T[t, s] = c_t^T A_t ... A_{s+1} b_s`` for ``s <= t``.

Leading dimensions (``...``) are free: ``[batch, heads]`` or ``[batch, channels]`` in practice.
Every constructor validates its input and raises an error that names the problem.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "DenseOperator",
    "RecurrentOperator",
    "Operator",
    "CAUSALITY_RTOL",
    "compute_dtype",
    "check_finite",
    "select_batch",
]

# Entries above the diagonal up to this fraction of max|T| are taken as round-off.
CAUSALITY_RTOL = 1e-5


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype ESS math runs in: float64 stays, everything else floating runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_floating(name: str, x: Tensor) -> None:
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


class DenseOperator:
    """A causal operator given as its matrix ``T`` of shape ``[..., L, L]``.

    Raises ``ValueError`` for a non-square ``T``, NaN/inf, or entries above the diagonal larger than
    ``CAUSALITY_RTOL * max|T|`` (round-off allowance); ``TypeError`` for non-floating dtypes.
    Round-off above the diagonal is zeroed so that the stored matrix is exactly lower triangular.
    """

    def __init__(self, T: Tensor, *, validate: bool = True) -> None:
        _check_floating("T", T)
        if T.dim() < 2 or T.shape[-1] != T.shape[-2]:
            raise ValueError(
                f"T must have shape [..., L, L] (square in its last two dims), got {tuple(T.shape)}"
            )
        if validate:
            check_finite("T", T)
            if T.numel():
                upper = torch.triu(T.detach(), diagonal=1).abs()
                worst = float(upper.max())
                scale = float(T.detach().abs().max())
                if worst > CAUSALITY_RTOL * scale:
                    idx = torch.nonzero(upper == upper.max())[0].tolist()
                    raise ValueError(
                        f"T is not causal: largest entry above the diagonal is {worst:.3e} at index {idx} "
                        f"(tolerance {CAUSALITY_RTOL:g} * max|T| = {CAUSALITY_RTOL * scale:.3e}); "
                        "T[t, s] must be 0 for s > t"
                    )
        self.T = torch.tril(T)

    @property
    def seq_len(self) -> int:
        return self.T.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        return self.T.shape[:-2]

    @property
    def dtype(self) -> torch.dtype:
        return self.T.dtype

    @property
    def device(self) -> torch.device:
        return self.T.device

    def dense(self) -> Tensor:
        """``T`` as ``[..., L, L]``."""
        return self.T

    def apply(self, u: Tensor) -> Tensor:
        """``T u`` for ``u`` of shape ``[..., L]`` or ``[..., L, P]``."""
        vec = _check_input(u, self.seq_len, self.batch_shape)
        out = self.T @ (u.unsqueeze(-1) if vec else u)
        return out.squeeze(-1) if vec else out

    def subset(self, rows: int | None = None, index: Tensor | None = None) -> DenseOperator:
        """The operator on its first ``rows`` batch rows and the operators ``index`` of batch dim 1
        (``None``: all). Subclasses that build ``T`` lazily cut their factors instead."""
        return DenseOperator(select_batch(self.T, self.batch_shape, 2, rows, index), validate=False)

    def __repr__(self) -> str:
        return f"DenseOperator(shape={tuple(self.T.shape)}, dtype={self.T.dtype})"


class RecurrentOperator:
    """A causal operator given by a state-space realization of state size ``N``.

    ``h_t = A_t h_{t-1} + b_t u_t``, ``y_t = c_t . h_t``, ``h_{-1} = 0``.

    Args:
        a: transitions, ``[..., L, N]`` (diagonal ``A_t``) or ``[..., L, N, N]`` (full ``A_t``).
        b: input vectors, ``[..., L, N]``.
        c: output vectors, ``[..., L, N]``.
    """

    def __init__(self, a: Tensor, b: Tensor, c: Tensor, *, validate: bool = True) -> None:
        for name, x in (("a", a), ("b", b), ("c", c)):
            _check_floating(name, x)
        if b.dim() < 2:
            raise ValueError(f"b must have shape [..., L, N], got {tuple(b.shape)}")
        if c.shape != b.shape:
            raise ValueError(
                f"b and c must have the same shape [..., L, N], got b {tuple(b.shape)} and c {tuple(c.shape)}"
            )
        if a.shape == b.shape:
            self.diagonal = True
        elif a.shape == (*b.shape, b.shape[-1]):
            self.diagonal = False
        else:
            L, N = b.shape[-2], b.shape[-1]
            raise ValueError(
                f"a must have shape [..., L, N] = {tuple(b.shape)} (diagonal) or [..., L, N, N] = "
                f"{(*b.shape, N)} (full) to match b and c with L={L}, N={N}; got {tuple(a.shape)}"
            )
        if validate:
            for name, x in (("a", a), ("b", b), ("c", c)):
                check_finite(name, x)
        self.a, self.b, self.c = a, b, c

    @property
    def seq_len(self) -> int:
        return self.b.shape[-2]

    @property
    def state_dim(self) -> int:
        return self.b.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        return self.b.shape[:-2]

    @property
    def dtype(self) -> torch.dtype:
        return torch.promote_types(torch.promote_types(self.a.dtype, self.b.dtype), self.c.dtype)

    @property
    def device(self) -> torch.device:
        return self.b.device

    def transition_matrices(self) -> Tensor:
        """``A_t`` as full matrices ``[..., L, N, N]`` (a diagonal embedding when diagonal)."""
        return torch.diag_embed(self.a) if self.diagonal else self.a

    def apply(self, u: Tensor) -> Tensor:
        """``T u`` for ``u`` of shape ``[..., L]`` or ``[..., L, P]``, by running the recurrence.

        ``T`` is never materialized: memory is ``O(L N P)``.
        """
        vec = _check_input(u, self.seq_len, self.batch_shape)
        U = u.unsqueeze(-1) if vec else u  # [..., L, P]
        dtype = torch.promote_types(self.dtype, U.dtype)
        a, b, c, U = (x.to(dtype) for x in (self.a, self.b, self.c, U))
        L = self.seq_len
        # outer products b_t u_t^T: [..., L, N, P]
        inputs = b.unsqueeze(-1) * U.unsqueeze(-2)
        h = torch.zeros_like(inputs[..., 0, :, :])
        states = []
        for t in range(L):
            if self.diagonal:
                h = a[..., t, :, None] * h + inputs[..., t, :, :]
            else:
                h = a[..., t, :, :] @ h + inputs[..., t, :, :]
            states.append(h)
        if L == 0:
            out = U.new_zeros(U.shape)
        else:
            H = torch.stack(states, dim=-3)  # [..., L, N, P]
            out = (c.unsqueeze(-1) * H).sum(-2)
        return out.squeeze(-1) if vec else out

    def subset(self, rows: int | None = None, index: Tensor | None = None) -> RecurrentOperator:
        """The operator on its first ``rows`` batch rows and the operators ``index`` of batch dim 1
        (``None``: all). Subclasses that build ``a``/``b``/``c`` lazily cut their factors instead."""
        batch, tail = self.batch_shape, 2 if self.diagonal else 3
        a = select_batch(self.a, batch, tail, rows, index)
        b, c = (select_batch(x, batch, 2, rows, index) for x in (self.b, self.c))
        return RecurrentOperator(a, b, c, validate=False)

    def dense(self) -> Tensor:
        """``T`` as ``[..., L, L]`` (materialized: ``O(L^2)`` memory; for tests and small L)."""
        L = self.seq_len
        eye = torch.eye(L, dtype=self.dtype, device=self.device)
        eye = eye.expand(*self.batch_shape, L, L)
        return torch.tril(self.apply(eye))

    def __repr__(self) -> str:
        kind = "diagonal" if self.diagonal else "full"
        return (
            f"RecurrentOperator(batch={tuple(self.batch_shape)}, L={self.seq_len}, N={self.state_dim}, "
            f"{kind}, dtype={self.dtype})"
        )


Operator = DenseOperator | RecurrentOperator


def _check_input(u: Tensor, L: int, batch_shape: torch.Size) -> bool:
    """Validate ``u`` for ``apply``; returns True when ``u`` is ``[..., L]`` (a vector per operator)."""
    _check_floating("u", u)
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
