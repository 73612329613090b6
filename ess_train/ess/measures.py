"""Effective state-size measures (definitions: ``docs/ESS.md``).

Public entry points take an operator (``DenseOperator``, ``RecurrentOperator``, or a raw causal
``T`` tensor, wrapped in a ``DenseOperator``) and return one value per position
``i`` of the Hankel block ``H_i = T[i:, :i]``:

- :func:`hankel_singular_values` ``-> [..., P, K]``;
- :func:`entropy_ess` (differentiable) and :func:`tolerance_ess` ``-> [..., P]``;
- aggregates :func:`average_ess`, :func:`max_ess`, :func:`tss_fraction`.

``P = len(positions)`` (all ``L`` positions by default, ``ESS_0 = 0``). ``method="auto"`` runs the
Gramian path for a ``RecurrentOperator`` (``O(L N^3)``) and the dense path for a ``DenseOperator``
(one ``svdvals`` per position, ``O(L^4)``); ``method="dense"`` on a ``RecurrentOperator``
materializes ``T``. Float64 operators are computed in float64; all others in float32 (float16/bfloat16
upcast, and their results returned in float32: the operator is what the model computes, its ESS is not
rounded to half precision; the tolerance threshold is float32's), with float64 where float32 would square
round-off:
the Gramian path's sums and eigenproblems (:data:`GRAMIAN_ACCUMULATE`) and the Gram matrices of float32
dense blocks (``ess_train.ess.dense_svd``), so float32 results are as exact as a float32 SVD (issue 14).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from ess_train.ess.dense_svd import dense_hankel_singular_values
from ess_train.ess.gramian import gramian_hankel_singular_values
from ess_train.ess.operators import DenseOperator, RecurrentOperator, check_finite, compute_dtype

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "DEFAULT_CHUNK_ELEMENTS_ACCELERATOR",
    "hankel_singular_values",
    "entropy_ess",
    "tolerance_ess",
    "entropy_ess_from_singular_values",
    "tolerance_ess_from_singular_values",
    "default_rtol",
    "average_ess",
    "max_ess",
    "tss_fraction",
]

Method = Literal["auto", "dense", "gramian"]
Positions = Sequence[int] | Tensor | None

# Size (elements) of the largest intermediate tensor built per chunk (the Gramian path's sums are float64,
# 8 bytes per element, for every operator). On CPU 2**20 (4 MiB in float32)
# keeps allocations under glibc's mmap threshold, so they are reused instead of page-faulted afresh:
# 1.4-1.8x faster than 2**24 at L=4096, N=64. Accelerators get larger chunks (fewer kernel launches).
DEFAULT_CHUNK_ELEMENTS = 2**20
DEFAULT_CHUNK_ELEMENTS_ACCELERATOR = 2**25


# The Gramian path accumulates its sums, factors and eigenproblems in float64 whatever the operator's
# dtype (see ``ess_train/ess/gramian.py``): float32 results are then as exact as a float32 SVD.
GRAMIAN_ACCUMULATE = torch.float64


def default_rtol(dtype: torch.dtype) -> float:
    """Default ``rtol`` of :func:`tolerance_ess`: ``max(1e-6, 100 * eps)`` of the compute dtype.

    That is 1e-6 for float64 and about 1.2e-5 for float32 (also used for float16/bfloat16, which are
    computed in float32). Both paths resolve a float32 operator's singular values to a few ``eps32 *
    sigma_max`` (the Gramian path accumulates in float64 and never squares in float32; float32 dense
    blocks use a float64 Gram matrix): a threshold 100 ulps up counts the same singular values as float64
    at 99% of positions or more (``benchmarks/bench_ess.py`` prints the agreement).
    """
    eps = torch.finfo(compute_dtype(dtype)).eps
    return max(1e-6, 100.0 * eps)


def _as_operator(op: object) -> DenseOperator | RecurrentOperator:
    if isinstance(op, (DenseOperator, RecurrentOperator)):
        return op
    if isinstance(op, Tensor):
        return DenseOperator(op)
    raise TypeError(
        "op must be a DenseOperator, a RecurrentOperator or a causal tensor T [..., L, L]; "
        f"got {type(op).__name__}"
    )


def _parse_positions(positions: Positions, L: int) -> Tensor:
    """Requested positions as a CPU LongTensor (order kept, duplicates allowed); validates range."""
    if positions is None:
        return torch.arange(L)
    if isinstance(positions, bool):
        raise TypeError("positions must be ints, a sequence of ints or an integer tensor, got a bool")
    if isinstance(positions, int):
        raise TypeError(
            f"positions={positions} is ambiguous here: the engine takes the positions themselves, e.g. "
            f"[{positions}] for position {positions}, or a list/tensor of them (an int means 'that many "
            "evenly spaced positions' only in ess_train.measure, the callbacks and analyze)"
        )
    if isinstance(positions, Tensor):
        if positions.dtype == torch.bool or positions.is_floating_point() or positions.is_complex():
            raise TypeError(f"positions must be an integer tensor, got dtype {positions.dtype}")
        if positions.dim() > 1:
            raise ValueError(f"positions must be 1-D, got shape {tuple(positions.shape)}")
        pos = positions.detach().reshape(-1).to("cpu", torch.long)
    else:
        items = list(positions)
        for p in items:
            if isinstance(p, bool) or not isinstance(p, int):
                raise TypeError(f"positions must be ints, got {p!r} ({type(p).__name__})")
        pos = torch.tensor(items, dtype=torch.long)
    if pos.numel():
        lo, hi = int(pos.min()), int(pos.max())
        bad = lo if lo < 0 else hi if hi >= L else None
        if bad is not None:
            raise ValueError(
                f"position {bad} is out of range for a sequence of length L={L} (need 0 <= i < {L})"
            )
    return pos


def _check_method(method: str, op: DenseOperator | RecurrentOperator) -> str:
    if method not in ("auto", "dense", "gramian"):
        raise ValueError(f"method must be 'auto', 'dense' or 'gramian', got {method!r}")
    if method == "auto":
        return "gramian" if isinstance(op, RecurrentOperator) else "dense"
    if method == "gramian" and not isinstance(op, RecurrentOperator):
        raise ValueError(
            "method='gramian' needs a RecurrentOperator (a state-space realization); got a DenseOperator"
        )
    return method


def _materialize(op: RecurrentOperator, budget: int) -> Tensor:
    """``T`` of a recurrent operator, by blocks of columns (``op.apply`` on identity columns)."""
    L = op.seq_len
    block = max(1, min(L, budget // max(1, 2 * op.batch_shape.numel() * L * op.state_dim)))
    if block >= L:
        return op.dense()
    eye = torch.eye(L, dtype=op.dtype, device=op.device)
    cols = [op.apply(eye[:, s0 : s0 + block].expand(*op.batch_shape, L, -1)) for s0 in range(0, L, block)]
    return torch.tril(torch.cat(cols, -1))


def _svals(
    op: object, positions: Positions, method: str, chunk_elements: int | None
) -> tuple[Tensor, torch.dtype]:
    """Hankel singular values in the compute dtype, and the operator's dtype."""
    op = _as_operator(op)
    method = _check_method(method, op)
    if chunk_elements is None:
        cpu = op.device.type == "cpu"
        budget = DEFAULT_CHUNK_ELEMENTS if cpu else DEFAULT_CHUNK_ELEMENTS_ACCELERATOR
    else:
        budget = int(chunk_elements)
    if budget < 1:
        raise ValueError(f"chunk_elements must be a positive int, got {chunk_elements}")
    L = op.seq_len
    pos = _parse_positions(positions, L)
    uniq, inverse = torch.unique(pos, sorted=True, return_inverse=True)
    cd = compute_dtype(op.dtype)
    batch = op.batch_shape
    B = batch.numel()
    if isinstance(op, RecurrentOperator):
        for name, x in (("a", op.a), ("b", op.b), ("c", op.c)):
            check_finite(name, x)
        N = op.state_dim
        a, b, c = (x.to(cd) for x in (op.a, op.b, op.c))
        if method == "gramian":
            a = a.reshape(B, *a.shape[len(batch) :])
            s = gramian_hankel_singular_values(
                a,
                b.reshape(B, L, N),
                c.reshape(B, L, N),
                diagonal=op.diagonal,
                positions=uniq,
                chunk_elements=budget,
                acc=GRAMIAN_ACCUMULATE if op.device.type != "mps" else None,  # MPS has no float64
            )
        else:
            T = _materialize(RecurrentOperator(a, b, c, validate=False), budget).reshape(B, L, L)
            s = dense_hankel_singular_values(T, positions=uniq, K=N, chunk_elements=budget)
        K = N
    else:
        check_finite("T", op.T)
        K = L // 2
        T = op.T.to(cd).reshape(B, L, L)
        s = dense_hankel_singular_values(T, positions=uniq, K=K, chunk_elements=budget)
    if uniq.numel() != pos.numel() or not torch.equal(uniq, pos):
        s = s[:, inverse.to(s.device)]
    return s.reshape(*batch, pos.numel(), K), cd  # (half precision: float32 results, not rounded back)


def hankel_singular_values(
    op: DenseOperator | RecurrentOperator | Tensor,
    positions: Positions = None,
    *,
    method: Method = "auto",
    chunk_elements: int | None = None,
) -> Tensor:
    """Singular values of ``H_i = T[i:, :i]`` at each position: ``[..., len(positions), K]``.

    Sorted descending and zero-padded; ``K = N`` for a ``RecurrentOperator``, ``L // 2`` for a
    ``DenseOperator``. ``H_0`` is empty: all zeros. ``positions``: a list or 1-D tensor of ints in ``[0, L)``
    (default all; a bare int is refused: it means a count of positions elsewhere in the product);
    ``chunk_elements`` bounds intermediate tensors (default :data:`DEFAULT_CHUNK_ELEMENTS` on CPU,
    :data:`DEFAULT_CHUNK_ELEMENTS_ACCELERATOR` elsewhere; one position at least) and does
    not change results. Differentiable; returned in the compute dtype (the operator's; float32 for
    float16/bfloat16).
    """
    s, dtype = _svals(op, positions, method, chunk_elements)
    return s.to(dtype)


def entropy_ess_from_singular_values(sigma: Tensor) -> Tensor:
    """Effective rank ``exp(-sum p log p)``, ``p = sigma / sum(sigma)``, over the last dim; 0 when all 0.

    Gradients are finite everywhere (``p log p`` is taken as 0, with gradient 0, at ``p = 0``).
    """
    total = sigma.sum(-1, keepdim=True)
    nz = total > 0
    p = sigma / torch.where(nz, total, torch.ones_like(total))
    pos = p > 0
    plogp = torch.where(pos, p * torch.log(torch.where(pos, p, torch.ones_like(p))), torch.zeros_like(p))
    ess = torch.exp(-plogp.sum(-1))
    return torch.where(nz.squeeze(-1), ess, torch.zeros_like(ess))


def entropy_ess(
    op: DenseOperator | RecurrentOperator | Tensor,
    positions: Positions = None,
    *,
    method: Method = "auto",
    chunk_elements: int | None = None,
) -> Tensor:
    """Entropy-ESS (effective rank of ``H_i``) per position: ``[..., len(positions)]``.

    ``exp(-sum_k p_k log p_k)`` with ``p_k = sigma_k / sum_j sigma_j`` (singular values, not their
    squares); 0 where ``H_i = 0`` (so ``ESS_0 = 0``). Differentiable with finite gradients on both
    paths, also for zero, rank-deficient and degenerate operators. Returned in the compute dtype (the
    operator's; float32 for float16/bfloat16, whose ESS is never rounded to half precision).
    """
    s, dtype = _svals(op, positions, method, chunk_elements)
    # evaluated in float64 ([..., P, K]: cheap), so that float32 results keep the singular values' accuracy
    return entropy_ess_from_singular_values(s.double() if s.device.type != "mps" else s).to(dtype)


def tolerance_ess_from_singular_values(
    sigma: Tensor,
    rtol: float | None = None,
    atol: float = 0.0,
    *,
    scale: Tensor | float | None = None,
) -> Tensor:
    """``#{k : sigma_k > max(atol, rtol * scale)}`` over the last dim of ``sigma [..., P, K]`` (int64).

    ``scale`` defaults to the largest value of ``sigma`` per operator (over ``P`` and ``K``);
    ``rtol`` defaults to :func:`default_rtol` of ``sigma.dtype``.
    """
    if rtol is None:
        rtol = default_rtol(sigma.dtype)
    if not (rtol >= 0 and atol >= 0):
        raise ValueError(f"rtol and atol must be >= 0, got rtol={rtol}, atol={atol}")
    sigma = sigma.detach()
    if scale is None:
        if sigma.numel():
            scale = sigma.amax(dim=(-2, -1), keepdim=True)
        else:
            scale = sigma.new_zeros(*sigma.shape[:-2], 1, 1)
    else:
        scale = torch.as_tensor(scale, dtype=sigma.dtype, device=sigma.device)
        if bool((scale < 0).any()) or not bool(torch.isfinite(scale).all()):
            raise ValueError(f"scale must be finite and >= 0, got {scale}")
        scale = scale.reshape(*scale.shape, 1, 1) if scale.dim() else scale
    thr = torch.clamp_min(rtol * scale, atol)
    return (sigma > thr).sum(-1)


def tolerance_ess(
    op: DenseOperator | RecurrentOperator | Tensor,
    positions: Positions = None,
    rtol: float | None = None,
    atol: float = 0.0,
    *,
    scale: Tensor | float | None = None,
    method: Method = "auto",
    chunk_elements: int | None = None,
) -> Tensor:
    """Tolerance-ESS per position: ``#{k : sigma_k(H_i) > max(atol, rtol * scale)}``, int64 ``[..., P]``.

    ``scale`` (per operator, batch-shaped or scalar) defaults to the largest Hankel singular value
    of that operator over the requested positions (all by default: pass ``scale`` when querying a
    subset, to threshold against the whole sequence). So the default is invariant to scaling ``T``,
    and a block that has decayed below ``rtol`` of the operator's peak counts 0. ``rtol`` defaults
    to :func:`default_rtol` (1e-6 for float64, ~1.2e-5 for float32/float16/bfloat16); ``atol`` is
    an absolute floor (default 0: a zero operator has ESS 0). Not differentiable (a count: int64, exact
    for any ``L``; :func:`average_ess` turns it into a float).
    """
    s, dtype = _svals(op, positions, method, chunk_elements)
    return tolerance_ess_from_singular_values(
        s, default_rtol(dtype) if rtol is None else rtol, atol, scale=scale
    )


def _floating(x: Tensor) -> Tensor:
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def average_ess(ess: Tensor, dim: int = -1) -> Tensor:
    """Mean ESS over positions (``dim``), ``ESS_0 = 0`` included; integer input gives a float result."""
    return _floating(ess).mean(dim)


def max_ess(ess: Tensor, dim: int = -1) -> Tensor:
    """Maximum ESS over positions (``dim``)."""
    return ess.amax(dim)


def tss_fraction(ess: Tensor, tss: Tensor | float) -> Tensor:
    """The fraction ``ESS / TSS`` of a theoretical state size that an ESS fills (broadcasting); ``tss`` must
    be positive. Not the *utilization* the monitor, the regularizer and the initializer use (``sum_i ESS_i /
    sum_i b_i`` over positions, against each position's rank bound: ``ess_train.measure.layer_utilization``):
    at a position ``i < N`` even a full state has ``ESS_i <= i < N``."""
    tss_t = torch.as_tensor(tss, device=ess.device)
    if bool((tss_t <= 0).any()):
        raise ValueError(f"tss (theoretical state size) must be > 0, got {tss}")
    return _floating(ess) / tss_t
