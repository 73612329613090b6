"""Operators with structure: one of the two forms, built from the small factors a layer computes.

A layer's forward produces factors (Mamba's ``dt, A, B, C``; DeltaNet's ``k, beta, q``; Hyena's filter
and gates; a short convolution's taps). The operators here keep those factors, build the large tensors
of their form (``a, b, c`` or ``T``) once, on first read (``functools.cached_property``), and cut the
factors, never the built tensors, in :meth:`subset`. Their ``apply`` uses the structure where it is
cheaper (the delta rule's rank-one transitions, the shift register's shift).
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from ess_train.ess.operators.base import check_floating, select_batch
from ess_train.ess.operators.dense import DenseOperator
from ess_train.ess.operators.recurrent import RecurrentOperator

__all__ = ["SelectiveSSMOperator", "DeltaRuleOperator", "GatedToeplitzOperator", "ShiftRegisterOperator"]


def _check_floating(**tensors: Tensor) -> None:
    for name, x in tensors.items():
        check_floating(name, x)


class SelectiveSSMOperator(RecurrentOperator):
    """Mamba's (S6) per-channel operator: diagonal ``a = exp(dt A)``, ``b = dt B``, ``c = C``.

    Args: ``dt [batch, D, L]``, ``A [D, N]`` (negative), ``B, C [batch, L, N]`` (shared by the channels).
    Batch shape ``[batch, D]``. ``a``/``b`` (``[batch, D, L, N]``) are built on first read; ``c`` is an
    expanded view of ``C``.
    """

    def __init__(self, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> None:
        _check_floating(dt=dt, A=A, B=B, C=C)
        if dt.dim() != 3 or A.dim() != 2 or B.dim() != 3 or B.shape != C.shape:
            raise ValueError(
                f"expected dt [batch, D, L], A [D, N], B and C [batch, L, N]; got dt {tuple(dt.shape)}, "
                f"A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}"
            )
        if A.shape[0] != dt.shape[1] or B.shape[:2] != (dt.shape[0], dt.shape[2]) or A.shape[1] != B.shape[2]:
            raise ValueError(
                f"inconsistent shapes: dt {tuple(dt.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}"
            )
        self.dt, self.A, self.B, self.C = dt, A, B, C
        self.diagonal = True

    @cached_property
    def a(self) -> Tensor:  # type: ignore[override]
        return torch.exp(self.dt[..., None] * self.A[:, None, :])

    @cached_property
    def b(self) -> Tensor:  # type: ignore[override]
        return self.dt[..., None] * self.B[:, None, :, :]

    @cached_property
    def c(self) -> Tensor:  # type: ignore[override]
        batch, D, L = self.dt.shape
        return self.C[:, None, :, :].expand(batch, D, L, self.A.shape[1])

    @property
    def seq_len(self) -> int:
        return self.dt.shape[-1]

    @property
    def state_dim(self) -> int:
        return self.A.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        return self.dt.shape[:-1]

    @property
    def dtype(self) -> torch.dtype:
        return torch.promote_types(torch.promote_types(self.dt.dtype, self.A.dtype), self.B.dtype)

    @property
    def device(self) -> torch.device:
        return self.dt.device

    def subset(self, rows: int | None = None, index: Tensor | None = None) -> SelectiveSSMOperator:
        dt = select_batch(self.dt, self.batch_shape, 1, rows, index)
        A = self.A if index is None else self.A.index_select(0, index.to(self.A.device))
        B, C = (x if rows is None else x[:rows] for x in (self.B, self.C))
        return SelectiveSSMOperator(dt, A, B, C)


class DeltaRuleOperator(RecurrentOperator):
    """The delta rule's operator: full transitions ``A_t = I - beta_t k_t k_t^T``, ``b_t = beta_t k_t``.

    Args: ``k [..., L, N]``, ``beta [..., L]``, ``c [..., L, N]``. ``a`` (``[..., L, N, N]``, ``O(L N^2)``
    memory) is built on first read only (the Gramian path needs it); :meth:`apply` uses the rank-one
    form ``A_t h = h - beta_t k_t (k_t^T h)`` and never builds it.
    """

    def __init__(self, k: Tensor, beta: Tensor, c: Tensor) -> None:
        _check_floating(k=k, beta=beta, c=c)
        if k.shape != c.shape or beta.shape != k.shape[:-1] or k.dim() < 2:
            raise ValueError(
                f"k and c must be [..., L, N] and beta [..., L]; got k {tuple(k.shape)}, "
                f"beta {tuple(beta.shape)}, c {tuple(c.shape)}"
            )
        self.k, self.beta = k, beta
        self.b = beta[..., None] * k
        self.c = c
        self.diagonal = False

    @cached_property
    def a(self) -> Tensor:  # type: ignore[override]
        N = self.k.shape[-1]
        eye = torch.eye(N, dtype=self.k.dtype, device=self.k.device)
        return eye - self.beta[..., None, None] * self.k[..., :, None] * self.k[..., None, :]

    @property
    def dtype(self) -> torch.dtype:
        return torch.promote_types(torch.promote_types(self.k.dtype, self.beta.dtype), self.c.dtype)

    def _step(self, t: int, h: Tensor) -> Tensor:
        k = self.k[..., t, :, None]  # [..., N, 1]
        return h - self.beta[..., t, None, None] * k * (k * h).sum(-2, keepdim=True)

    def subset(self, rows: int | None = None, index: Tensor | None = None) -> DeltaRuleOperator:
        batch = self.batch_shape
        k, c = (select_batch(x, batch, 2, rows, index) for x in (self.k, self.c))
        return DeltaRuleOperator(k, select_batch(self.beta, batch, 1, rows, index), c)


class GatedToeplitzOperator(DenseOperator):
    """``T[..., t, s] = g_out[..., t] h[..., t - s] g_in[..., s]`` for ``s <= t`` (0 above): a gated long
    convolution (Hyena).

    Args: ``h [..., L]`` (filter taps, lag 0 first), ``g_out``, ``g_in [..., L]``; leading dims broadcast.
    ``T`` (``O(L^2)`` per operator) is built on first read of ``.T`` / ``.dense()``.
    """

    def __init__(self, h: Tensor, g_out: Tensor, g_in: Tensor) -> None:
        _check_floating(h=h, g_out=g_out, g_in=g_in)
        L = h.shape[-1]
        if g_out.shape[-1] != L or g_in.shape[-1] != L:
            raise ValueError(
                f"h, g_out and g_in must share the last dim L; got {tuple(h.shape)}, "
                f"{tuple(g_out.shape)}, {tuple(g_in.shape)}"
            )
        self.h, self.g_out, self.g_in = h, g_out, g_in

    @cached_property
    def T(self) -> Tensor:  # type: ignore[override]
        L = self.seq_len
        idx = torch.arange(L, device=self.h.device)
        lag = idx[:, None] - idx[None, :]
        band = self.h[..., lag.clamp(min=0)] * (lag >= 0).to(self.h.dtype)  # [..., L, L]
        return self.g_out[..., :, None] * band * self.g_in[..., None, :]

    @property
    def seq_len(self) -> int:
        return self.h.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        return torch.broadcast_shapes(self.h.shape[:-1], self.g_out.shape[:-1], self.g_in.shape[:-1])

    @property
    def dtype(self) -> torch.dtype:
        return torch.promote_types(torch.promote_types(self.h.dtype, self.g_out.dtype), self.g_in.dtype)

    @property
    def device(self) -> torch.device:
        return self.h.device

    def subset(self, rows: int | None = None, index: Tensor | None = None) -> GatedToeplitzOperator:
        batch = self.batch_shape
        return GatedToeplitzOperator(
            *(select_batch(x, batch, 1, rows, index) for x in (self.h, self.g_out, self.g_in))
        )

    def __repr__(self) -> str:
        return f"GatedToeplitzOperator(batch={tuple(self.batch_shape)}, L={self.seq_len}, dtype={self.dtype})"


class ShiftRegisterOperator(RecurrentOperator):
    """FIR filters ``taps [G, k]`` (``taps[g, j]`` on lag ``j``) as a recurrence with ``N = k`` slots.

    Batch shape ``[batch, G]``: the same filters for every row. ``A_t`` shifts the slots down by one,
    ``b_t = e_0``, ``c_t = taps``; ``a``, ``b``, ``c`` are expanded views (no copies).

    Optional gates ``g_in``, ``g_out`` (``[batch, G, L]``) make it a gated convolution
    ``T[t, s] = g_out[t] taps[t - s] g_in[s]`` (LFM2's short convolution): ``b_t = g_in[t] e_0``,
    ``c_t = g_out[t] taps``.
    """

    def __init__(
        self,
        taps: Tensor,
        batch: int,
        seq_len: int,
        g_in: Tensor | None = None,
        g_out: Tensor | None = None,
    ) -> None:
        check_floating("taps", taps)
        if taps.dim() != 2 or taps.shape[1] < 1:
            raise ValueError(f"taps must be [G, k] with k >= 1, got {tuple(taps.shape)}")
        if batch < 0 or seq_len < 0:
            raise ValueError(f"batch and seq_len must be >= 0, got {batch} and {seq_len}")
        for name, gate in (("g_in", g_in), ("g_out", g_out)):
            if gate is None:
                continue
            check_floating(name, gate)
            if tuple(gate.shape) != (batch, taps.shape[0], seq_len):
                raise ValueError(
                    f"{name} must be [batch, G, L] = {(batch, taps.shape[0], seq_len)}, "
                    f"got {tuple(gate.shape)}"
                )
        self.taps, self.rows, self.length = taps, batch, seq_len
        self.g_in, self.g_out = g_in, g_out
        self.diagonal = False

    @cached_property
    def a(self) -> Tensor:  # type: ignore[override]
        k = self.taps.shape[1]
        shift = torch.diag(torch.ones(k - 1, dtype=self.taps.dtype, device=self.taps.device), diagonal=-1)
        return shift.expand(*self.batch_shape, self.length, k, k)

    @cached_property
    def b(self) -> Tensor:  # type: ignore[override]
        k = self.taps.shape[1]
        e0 = torch.zeros(k, dtype=self.taps.dtype, device=self.taps.device)
        e0[0] = 1.0
        if self.g_in is not None:
            return self.g_in[..., None] * e0
        return e0.expand(*self.batch_shape, self.length, k)

    @cached_property
    def c(self) -> Tensor:  # type: ignore[override]
        taps = self.taps[None, :, None, :]
        if self.g_out is not None:
            return self.g_out[..., None] * taps
        return taps.expand(*self.batch_shape, self.length, self.taps.shape[1])

    @property
    def seq_len(self) -> int:
        return self.length

    @property
    def state_dim(self) -> int:
        return self.taps.shape[1]

    @property
    def batch_shape(self) -> torch.Size:
        return torch.Size((self.rows, self.taps.shape[0]))

    @property
    def dtype(self) -> torch.dtype:
        dtype = self.taps.dtype
        for gate in (self.g_in, self.g_out):
            if gate is not None:
                dtype = torch.promote_types(dtype, gate.dtype)
        return dtype

    @property
    def device(self) -> torch.device:
        return self.taps.device

    def _step(self, t: int, h: Tensor) -> Tensor:
        return torch.cat([torch.zeros_like(h[..., :1, :]), h[..., :-1, :]], dim=-2)

    def subset(self, rows: int | None = None, index: Tensor | None = None) -> ShiftRegisterOperator:
        taps = self.taps if index is None else self.taps.index_select(0, index.to(self.taps.device))
        n = self.rows if rows is None else min(rows, self.rows)
        g_in, g_out = (
            None if g is None else select_batch(g, self.batch_shape, 1, rows, index)
            for g in (self.g_in, self.g_out)
        )
        return ShiftRegisterOperator(taps, n, self.length, g_in=g_in, g_out=g_out)
