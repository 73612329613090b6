"""Mamba's selective scan forward as one fused Triton kernel (GPU; on CPU through Triton's interpreter).

- :func:`triton_mamba_scan`: :func:`~ess_train.models.ops.scan.mamba_scan`'s ``y`` from one kernel launch
  instead of the chunked form's many small ones; the backward recomputes through ``mamba_scan`` (the same
  gradients as the torch path, bit for bit);
- :func:`select_scan_backend`: which of ``"torch"`` / ``"triton"`` a ``scan_backend`` setting gives for
  tensors on a device;
- :func:`triton_available`: whether ``triton`` imports.

``triton`` is imported on first use only: importing ``ess_train`` never needs it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ess_train.checks import check_choice, check_positive_int
from ess_train.models.ops.scan import mamba_scan

__all__ = [
    "SCAN_BACKENDS",
    "triton_available",
    "triton_interpreting",
    "select_scan_backend",
    "triton_mamba_scan",
]

SCAN_BACKENDS = ("auto", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    """Whether ``triton`` (and ``triton.language``) import here (checked once)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` is on (Triton's own reading: 1, true, on, yes): kernels run on CPU."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def select_scan_backend(backend: str, device: torch.device) -> str:
    """``"torch"`` or ``"triton"`` for a ``scan_backend`` setting (:data:`SCAN_BACKENDS`) and tensors on
    ``device``.

    ``"auto"``: Triton on CUDA where it imports, else torch (the CPU default). ``"triton"``: always, but on
    a CPU only under Triton's interpreter (``TRITON_INTERPRET=1``, slow: for tests); a ``ValueError``
    otherwise, or without ``triton``.
    """
    backend = check_choice("scan_backend", backend, SCAN_BACKENDS)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"scan_backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 (Triton's CPU interpreter) for "
            f"tensors on {device.type!r}; got tensors on {device} without TRITON_INTERPRET: use 'auto' or "
            "'torch' there"
        )
    if not triton_available():
        raise ValueError(
            "scan_backend='triton' needs triton, which does not import here (pip install triton)"
        )
    return "triton"


@functools.cache
def _kernel(interpret: bool) -> Any:
    """The jitted kernel, built on first use (``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates:
    one build per setting)."""
    import triton
    import triton.language as tl

    @triton.jit
    def mamba_scan_fwd(
        dt_ptr, A_ptr, B_ptr, C_ptr, u_ptr, y_ptr,
        D, L, N,
        s_dt_b, s_dt_d, s_dt_l,
        s_A_d, s_A_n,
        s_B_b, s_B_l, s_B_n,
        s_C_b, s_C_l, s_C_n,
        s_u_b, s_u_d, s_u_l,
        s_y_b, s_y_d, s_y_l,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        # one program: sequence pid_b, channels [pid_d * BLOCK_D, +BLOCK_D); the state h [BLOCK_D, N] stays
        # in registers through the L steps, in y's dtype (float32, or float64 for float64 inputs)
        acc = y_ptr.dtype.element_ty
        pid_b = tl.program_id(0).to(tl.int64)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        mask_d = offs_d < D
        mask_n = offs_n < N
        a = tl.load(
            A_ptr + offs_d[:, None] * s_A_d + offs_n[None, :] * s_A_n,
            mask=mask_d[:, None] & mask_n[None, :],
            other=0.0,
        ).to(acc)
        dt_p = dt_ptr + pid_b * s_dt_b + offs_d * s_dt_d
        u_p = u_ptr + pid_b * s_u_b + offs_d * s_u_d
        y_p = y_ptr + pid_b * s_y_b + offs_d * s_y_d
        B_p = B_ptr + pid_b * s_B_b + offs_n * s_B_n
        C_p = C_ptr + pid_b * s_C_b + offs_n * s_C_n
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=acc)
        for _ in range(L):
            dt_t = tl.load(dt_p, mask=mask_d, other=0.0).to(acc)
            u_t = tl.load(u_p, mask=mask_d, other=0.0).to(acc)
            B_t = tl.load(B_p, mask=mask_n, other=0.0).to(acc)
            C_t = tl.load(C_p, mask=mask_n, other=0.0).to(acc)
            # h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t; padded lanes hold 0 (a = 0, B = 0, C = 0)
            h = tl.exp(dt_t[:, None] * a) * h + (dt_t * u_t)[:, None] * B_t[None, :]
            tl.store(y_p, tl.sum(h * C_t[None, :], axis=1), mask=mask_d)
            dt_p += s_dt_l
            u_p += s_u_l
            y_p += s_y_l
            B_p += s_B_l
            C_p += s_C_l

    return mamba_scan_fwd


def _check_shapes(dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, u: Tensor) -> None:
    if dt.dim() != 3 or A.dim() != 2 or Bm.dim() != 3:
        raise ValueError(
            f"expected dt [b, D, L], A [D, N], B [b, L, N], got {tuple(dt.shape)}, {tuple(A.shape)}, "
            f"{tuple(Bm.shape)}"
        )
    (b, D, L), N = dt.shape, A.shape[-1]
    for name, t, shape in (("u", u, (b, D, L)), ("A", A, (D, N)), ("B", Bm, (b, L, N)), ("C", Cm, (b, L, N))):
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{name} must be {shape} for dt {tuple(dt.shape)} and N = {N}, got {tuple(t.shape)}"
            )
    if len({t.device for t in (dt, A, Bm, Cm, u)}) > 1:
        raise ValueError("dt, A, B, C and u must be on one device")


def _forward(dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, u: Tensor, block_d: int | None) -> Tensor:
    """Launch the kernel: grid (batch, channel blocks), any strides (no copies), ``y`` float32 or float64."""
    dtype = torch.promote_types(torch.promote_types(dt.dtype, A.dtype), torch.float32)
    (b, D, L), N = dt.shape, A.shape[-1]
    y = torch.empty(b, D, L, dtype=dtype, device=dt.device)
    if y.numel() == 0:
        return y.zero_()
    block_n = 1 << (N - 1).bit_length()  # tl.arange needs powers of two
    if block_d is None:  # ~2k state entries per program at most (registers), at least 1 channel
        block_d = max(1, min(1 << (D - 1).bit_length(), 32, 2048 // block_n))
    grid = (b, -(-D // block_d))
    guard = torch.cuda.device(dt.device) if dt.device.type == "cuda" else contextlib.nullcontext()
    with guard:  # launch on the tensors' GPU, not the current one
        _kernel(triton_interpreting())[grid](
            dt, A, Bm, Cm, u, y,
            D, L, N,
            *dt.stride(), *A.stride(), *Bm.stride(), *Cm.stride(), *u.stride(), *y.stride(),
            BLOCK_D=block_d,
            BLOCK_N=block_n,
        )  # fmt: skip
    return y


class _TritonMambaScan(torch.autograd.Function):
    """The fused forward; the backward recomputes ``mamba_scan`` under autograd and differentiates it."""

    @staticmethod
    def forward(
        ctx: Any,
        dt: Tensor,
        A: Tensor,
        Bm: Tensor,
        Cm: Tensor,
        u: Tensor,
        chunk: int | None,
        block_d: int | None,
    ) -> Tensor:
        ctx.save_for_backward(dt, A, Bm, Cm, u)
        ctx.chunk = chunk
        return _forward(dt, A, Bm, Cm, u, block_d)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        needs = ctx.needs_input_grad[:5]
        with torch.enable_grad():
            ins = [t.detach().requires_grad_(True) for t in ctx.saved_tensors]
            y = mamba_scan(*ins, ctx.chunk)
            g = iter(torch.autograd.grad(y, [t for t, n in zip(ins, needs) if n], gy))
        return (*(next(g) if n else None for n in needs), None, None)


def triton_mamba_scan(
    dt: Tensor,
    A: Tensor,
    Bm: Tensor,
    Cm: Tensor,
    u: Tensor,
    chunk_size: int | None = None,
    block_d: int | None = None,
) -> Tensor:
    """:func:`~ess_train.models.ops.scan.mamba_scan`'s ``y [b, D, L]`` from one fused Triton kernel.

    Same arguments and meaning: ``h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t`` (``h_{-1} = 0``),
    ``y_t = C_t . h_t`` per channel, ``dt, u [b, D, L]``, ``A [D, N]``, ``Bm, Cm [b, L, N]``, any strides;
    ``y`` in ``mamba_scan``'s dtype (float32, or float64 for float64 ``dt``/``A``). One program per
    (sequence, block of ``block_d`` channels) walks the ``L`` steps with its states in registers: the
    recurrence itself, accumulated in ``y``'s dtype (no factored exponentials: strong decays need no
    fallback). The backward is ``mamba_scan``'s (recomputed from the saved inputs, ``chunk_size`` its
    chunk): the torch path's gradients exactly. Needs CUDA tensors, or ``TRITON_INTERPRET=1`` on CPU.
    """
    _check_shapes(dt, A, Bm, Cm, u)
    if block_d is not None:
        block_d = check_positive_int("block_d", block_d)
        if block_d & (block_d - 1):
            raise ValueError(f"block_d must be a power of two, got {block_d}")
    if chunk_size is not None:
        chunk_size = check_positive_int("chunk_size", chunk_size)
    return _TritonMambaScan.apply(dt, A, Bm, Cm, u, chunk_size, block_d)
