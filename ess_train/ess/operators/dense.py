"""An operator given as its matrix ``T`` (softmax attention, anything without a recurrence)."""

from __future__ import annotations

import torch
from torch import Tensor

from ess_train.ess.operators.base import Operator, check_finite, check_floating, check_input, select_batch

__all__ = ["DenseOperator", "CAUSALITY_RTOL"]

# Entries above the diagonal up to this fraction of max|T| are taken as round-off.
CAUSALITY_RTOL = 1e-5


def check_causal(T: Tensor) -> None:
    """Raise ``ValueError`` when ``T`` has an entry above the diagonal beyond round-off."""
    if not T.numel():
        return
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


class DenseOperator(Operator):
    """A causal operator given as its matrix ``T`` of shape ``[..., L, L]``.

    Raises ``ValueError`` for a non-square ``T``, NaN/inf, or entries above the diagonal larger than
    ``CAUSALITY_RTOL * max|T|`` (round-off allowance); ``TypeError`` for non-floating dtypes.
    Round-off above the diagonal is zeroed so that the stored matrix is exactly lower triangular.
    """

    def __init__(self, T: Tensor, *, validate: bool = True) -> None:
        check_floating("T", T)
        if T.dim() < 2 or T.shape[-1] != T.shape[-2]:
            raise ValueError(
                f"T must have shape [..., L, L] (square in its last two dims), got {tuple(T.shape)}"
            )
        if validate:
            check_finite("T", T)
            check_causal(T)
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
        vec = check_input(u, self.seq_len, self.batch_shape)
        out = self.T @ (u.unsqueeze(-1) if vec else u)
        return out.squeeze(-1) if vec else out

    def subset(self, rows: int | None = None, index: Tensor | None = None) -> DenseOperator:
        return DenseOperator(select_batch(self.T, self.batch_shape, 2, rows, index), validate=False)

    def __repr__(self) -> str:
        return f"DenseOperator(shape={tuple(self.T.shape)}, dtype={self.T.dtype})"
