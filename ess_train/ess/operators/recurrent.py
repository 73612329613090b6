"""An operator given by a state-space realization ``h_t = A_t h_{t-1} + b_t u_t``, ``y_t = c_t . h_t``.

Diagonal (``a: [..., L, N]``) or full (``a: [..., L, N, N]``) transitions, so that
``T[t, s] = c_t^T A_t ... A_{s+1} b_s`` for ``s <= t``. The Gramian path of the engine measures it
without materializing ``T``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ess_train.ess.operators.base import Operator, check_finite, check_floating, check_input, select_batch

__all__ = ["RecurrentOperator", "check_realization"]


def check_realization(a: Tensor, b: Tensor, c: Tensor) -> bool:
    """Validate the shapes and dtypes of ``a, b, c``; returns whether the transitions are diagonal."""
    for name, x in (("a", a), ("b", b), ("c", c)):
        check_floating(name, x)
    if b.dim() < 2:
        raise ValueError(f"b must have shape [..., L, N], got {tuple(b.shape)}")
    if c.shape != b.shape:
        raise ValueError(
            f"b and c must have the same shape [..., L, N], got b {tuple(b.shape)} and c {tuple(c.shape)}"
        )
    if a.shape == b.shape:
        return True
    if a.shape == (*b.shape, b.shape[-1]):
        return False
    L, N = b.shape[-2], b.shape[-1]
    raise ValueError(
        f"a must have shape [..., L, N] = {tuple(b.shape)} (diagonal) or [..., L, N, N] = "
        f"{(*b.shape, N)} (full) to match b and c with L={L}, N={N}; got {tuple(a.shape)}"
    )


class RecurrentOperator(Operator):
    """A causal operator given by a state-space realization of state size ``N``.

    ``h_t = A_t h_{t-1} + b_t u_t``, ``y_t = c_t . h_t``, ``h_{-1} = 0``.

    Args:
        a: transitions, ``[..., L, N]`` (diagonal ``A_t``) or ``[..., L, N, N]`` (full ``A_t``).
        b: input vectors, ``[..., L, N]``.
        c: output vectors, ``[..., L, N]``.
        validate: check for NaN/inf (shapes and dtypes are always checked).
    """

    diagonal: bool

    def __init__(self, a: Tensor, b: Tensor, c: Tensor, *, validate: bool = True) -> None:
        self.diagonal = check_realization(a, b, c)
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

    def _step(self, t: int, h: Tensor) -> Tensor:
        """``A_t h`` for states ``h [..., N, P]`` (subclasses with structured transitions override it)."""
        if self.diagonal:
            return self.a[..., t, :, None] * h
        return self.a[..., t, :, :] @ h

    def apply(self, u: Tensor) -> Tensor:
        """``T u`` for ``u`` of shape ``[..., L]`` or ``[..., L, P]``, by running the recurrence.

        ``T`` is never materialized: memory is ``O(L N P)``.
        """
        vec = check_input(u, self.seq_len, self.batch_shape)
        U = u.unsqueeze(-1) if vec else u  # [..., L, P]
        dtype = torch.promote_types(self.dtype, U.dtype)
        L = self.seq_len
        if L == 0:
            out = U.new_zeros(U.shape)
            return out.squeeze(-1) if vec else out
        b, c, U = (x.to(dtype) for x in (self.b, self.c, U))
        inputs = b.unsqueeze(-1) * U.unsqueeze(-2)  # b_t u_t^T: [..., L, N, P]
        h = torch.zeros_like(inputs[..., 0, :, :])
        states = []
        for t in range(L):
            h = self._step(t, h).to(dtype) + inputs[..., t, :, :]
            states.append(h)
        H = torch.stack(states, dim=-3)  # [..., L, N, P]
        out = (c.unsqueeze(-1) * H).sum(-2)
        return out.squeeze(-1) if vec else out

    def subset(self, rows: int | None = None, index: Tensor | None = None) -> RecurrentOperator:
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
            f"{type(self).__name__}(batch={tuple(self.batch_shape)}, L={self.seq_len}, N={self.state_dim}, "
            f"{kind}, dtype={self.dtype})"
        )
