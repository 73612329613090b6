"""Per-layer ESS statistics of captured operators, with the one state-utilization definition.

What the monitor logs, the regularizer penalizes and the initializer scores is computed here, from
:class:`~ess_train.models.protocol.OperatorView` objects and the engine (``ess_train.ess``):
:func:`layer_utilization` (``sum_i ESS_i / sum_i b_i``), :func:`entropy_profiles` (batched engine calls
for compatible operators), :func:`compute_copy` (a cheaper operator subset) and :func:`layer_ess` (a
layer's summary, :class:`LayerESS`). No Lightning: usable on any ``nn.Module`` with protocol layers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ess_train.ess import (
    DenseOperator,
    Operator,
    RecurrentOperator,
    entropy_ess,
    entropy_ess_from_singular_values,
    hankel_singular_values,
    tolerance_ess_from_singular_values,
)
from ess_train.measure.positions import position_bounds
from ess_train.models.protocol import OperatorView, StateSize

__all__ = [
    "compute_copy",
    "view_rows",
    "no_autocast",
    "layer_utilization",
    "entropy_profile",
    "entropy_profiles",
    "concat_operators",
    "LayerESS",
    "layer_ess",
]


# -------------------------------------------------------------------------------------------- operators
def compute_copy(
    op: Operator,
    rows: int | None = None,
    operators: int | None = None,
    offset: int = 0,
) -> Operator:
    """``op`` restricted to its first ``rows`` batch rows and ``operators`` operators of dim 1.

    The operators are evenly spaced with stride ``G // operators``, starting at ``offset`` (mod ``G``): an
    increasing ``offset`` (the regularizer passes its call count) cycles through all of them.

    Returns ``op`` itself when nothing is cut, otherwise ``op.subset(...)``: the same kind of operator
    (a structured operator, e.g. Mamba's, cuts its factors, so nothing full-size is materialized), graph
    preserved. Dtypes are kept: the engine computes in float32 (float64 stays) whatever the operator's dtype.
    """
    batch = op.batch_shape
    cut_rows = rows is not None and len(batch) > 0 and batch[0] > rows
    cut_ops = operators is not None and len(batch) > 1 and batch[1] > operators
    if not (cut_rows or cut_ops):
        return op
    index = None
    if cut_ops:
        G = batch[1]
        stride = G // operators
        index = (offset + stride * torch.arange(operators, device=op.device)) % G
    return op.subset(rows if cut_rows else None, index)


def view_rows(view: OperatorView, rows: int | None) -> OperatorView:
    """``view`` on its first ``rows`` rows only (itself when that cuts nothing)."""
    if rows is None or rows >= view.op.batch_shape[0]:
        return view
    return OperatorView(compute_copy(view.op, rows=rows), view.u[:rows], view.y[:rows], dict(view.extras))


# ------------------------------------------------------------------------------------------------- ESS
@contextlib.contextmanager
def no_autocast(op: Operator) -> Iterator[None]:
    """Autocast off on ``op``'s device (ESS is computed in float32/float64 whatever the AMP setting)."""
    device_type = op.device.type
    if device_type not in ("cpu", "cuda", "xpu", "mps", "hpu"):
        yield
        return
    with torch.autocast(device_type=device_type, enabled=False):
        yield


def layer_utilization(
    ess: Tensor, per_operator: int, seq_len: int, positions: list[int] | None
) -> Tensor | None:
    """State utilization ``sum_i ESS_i / sum_i b_i`` over the evaluated positions (the one definition the
    monitor, the regularizer and the initializer share).

    ``ess``: entropy-ESS ``[..., P]`` at ``positions`` (``None``: all ``L``); leading dims (rows,
    operators) are averaged first, so the result is also the mean over operators of each operator's
    utilization. ``b_i = min(per_operator, i, L - i)`` (:func:`position_bounds`): since
    ``ESS_i <= rank(H_i) <= b_i``, the ratio lies in ``[0, 1]`` and reaches 1 exactly when every evaluated
    ``H_i`` is at its bound with a flat spectrum. Positions with ``b_i = 0`` (``i = 0``) contribute
    nothing to either sum, so including position 0 or not gives the same number. Differentiable.
    Returns ``None`` when ``sum_i b_i = 0`` (``per_operator == 0``, e.g. sliding-window attention with
    ``window=1``, or ``L == 1``): utilization is undefined there.
    """
    bound = sum(position_bounds(per_operator, seq_len, positions))
    if bound <= 0:
        return None
    if ess.shape[-1] != (seq_len if positions is None else len(positions)):
        raise ValueError(f"ESS profile has {ess.shape[-1]} positions, expected {positions or seq_len}")
    profile = ess.reshape(-1, ess.shape[-1]).mean(0)
    return profile.sum() / bound


def entropy_profile(op: Operator, positions: list[int] | None) -> Tensor:
    """Entropy-ESS ``[batch, G, P]`` of ``op`` (batch dims after the first flattened into G)."""
    ent = entropy_ess(op, positions=positions)
    return ent.reshape(ent.shape[0], -1, ent.shape[-1])


def _batch_key(op: Operator, positions: list[int] | None) -> tuple[Any, ...]:
    """Operators with equal keys can share one engine call."""
    pos = None if positions is None else tuple(positions)
    if isinstance(op, RecurrentOperator):
        return ("recurrent", op.diagonal, op.seq_len, op.state_dim, op.dtype, op.device, pos)
    return ("dense", op.seq_len, op.dtype, op.device, pos)


def concat_operators(ops: list[Operator]) -> Operator:
    """One operator whose batch is the concatenation of the flattened batches of ``ops`` (same key)."""
    L = ops[0].seq_len
    if isinstance(ops[0], RecurrentOperator):
        recs = [o for o in ops if isinstance(o, RecurrentOperator)]
        trans = recs[0].a.shape[len(recs[0].batch_shape) :]  # [L, N] or [L, N, N]
        N = recs[0].state_dim
        return RecurrentOperator(
            torch.cat([o.a.reshape(-1, *trans) for o in recs]),
            torch.cat([o.b.reshape(-1, L, N) for o in recs]),
            torch.cat([o.c.reshape(-1, L, N) for o in recs]),
            validate=False,
        )
    dense = [o for o in ops if isinstance(o, DenseOperator)]
    return DenseOperator(
        torch.cat([o.T.expand(*o.batch_shape, L, L).reshape(-1, L, L) for o in dense]), validate=False
    )


def entropy_profiles(ops: Sequence[Operator], positions: Sequence[list[int] | None]) -> list[Tensor]:
    """:func:`entropy_profile` of each operator, with one engine call per group of compatible operators
    (same kind, length, state size, dtype, device and positions: e.g. all GLA layers of a model), which
    saves the engine's fixed per-call cost on small training-time estimates. Differentiable."""
    out: list[Tensor | None] = [None] * len(ops)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (op, pos) in enumerate(zip(ops, positions)):
        groups.setdefault(_batch_key(op, pos), []).append(i)
    for members in groups.values():
        if len(members) == 1:
            out[members[0]] = entropy_profile(ops[members[0]], positions[members[0]])
            continue
        merged = concat_operators([ops[i] for i in members])
        ent = entropy_ess(merged, positions=positions[members[0]])
        sizes = [ops[i].batch_shape.numel() for i in members]
        for i, part in zip(members, ent.split(sizes)):
            rows = ops[i].batch_shape[0] if len(ops[i].batch_shape) else 1
            out[i] = part.reshape(rows, -1, part.shape[-1])
    return out  # type: ignore[return-value]


@dataclass
class LayerESS:
    """ESS summary of one layer on one batch (floats; ``profile`` is the mean over rows and operators of
    entropy-ESS, ``tolerance_profile`` the same for tolerance-ESS, which, unlike the scale-invariant
    entropy-ESS, drops where a gate shrinks the state, e.g. a reset at a delimiter).

    ``avg_entropy``/``avg_tolerance``: mean over the evaluated positions (position 0, whose ESS is 0, counts
    when it is evaluated, as with ``positions=None``), operators and rows. ``utilization``:
    ``sum_i ESS_i / sum_i min(per_operator, i, L - i)`` over the evaluated positions
    (:func:`layer_utilization`, independent of whether position 0 is evaluated); NaN where undefined
    (``per_operator == 0`` or ``L == 1``).
    """

    positions: list[int]
    profile: list[float]
    tolerance_profile: list[float] | None
    avg_entropy: float
    max_entropy: float
    avg_tolerance: float | None
    utilization: float
    total: float
    per_kv: float | None
    row_totals: Tensor  # [batch], multiplicity * states * mean over operators of avg ESS, for each row

    def metrics(self) -> dict[str, float]:
        out = {
            "avg_entropy": self.avg_entropy,
            "max_entropy": self.max_entropy,
            "utilization": self.utilization,
            "total": self.total,
        }
        if self.avg_tolerance is not None:
            out["avg_tolerance"] = self.avg_tolerance
        if self.per_kv is not None:
            out["per_kv"] = self.per_kv
        return out


def layer_ess(
    view: OperatorView,
    size: StateSize,
    positions: list[int] | None,
    *,
    tolerance: bool = True,
    rtol: float | None = None,
    atol: float = 0.0,
    kv_pairs: Tensor | None = None,
    max_operators: int | None = None,
) -> LayerESS:
    """Entropy- (and tolerance-) ESS summary of a captured view; ``ValueError`` on NaN/inf (engine check).

    One ``hankel_singular_values`` call feeds both measures; the tolerance threshold is relative to the
    largest singular value over the evaluated positions (as ``tolerance_ess``). With ``max_operators``,
    the operators are an evenly spaced subset and ``total`` is scaled up to all of them (an estimate).
    """
    n_ops = math.prod(view.op.batch_shape[1:])
    with torch.no_grad(), no_autocast(view.op):
        op = compute_copy(view.op, operators=max_operators)
        sigma = hankel_singular_values(op, positions)  # [B, G..., P, K]
        ent = entropy_ess_from_singular_values(sigma)
        ent = ent.reshape(ent.shape[0], -1, ent.shape[-1])  # [B, G, P]
        tol = tolerance_ess_from_singular_values(sigma, rtol, atol) if tolerance else None
        ent = ent.float().cpu()  # one transfer; everything below is small CPU math
        tol = None if tol is None else tol.float().cpu()
    L = op.seq_len
    pos = list(range(L)) if positions is None else list(positions)
    profile = ent.mean(dim=(0, 1))
    # grouped-query attention: a KV head's state counted once (its heads' mean), not once per query head
    states = size.states or n_ops
    row_totals = size.multiplicity * states * ent.mean(-1).mean(-1)
    per_kv = None
    if kv_pairs is not None:
        kv = kv_pairs.to(row_totals).reshape(-1)
        kv = kv.expand_as(row_totals) if kv.numel() == 1 else kv[: row_totals.shape[0]]
        per_kv = float((row_totals / kv.clamp_min(1)).mean())
    avg = float(profile.mean())
    util = layer_utilization(profile, size.per_operator, L, positions)
    return LayerESS(
        positions=pos,
        profile=[float(v) for v in profile],
        tolerance_profile=None if tol is None else [float(v) for v in tol.reshape(-1, tol.shape[-1]).mean(0)],
        avg_entropy=avg,
        max_entropy=float(profile.max()),
        avg_tolerance=None if tol is None else float(tol.float().mean()),
        utilization=math.nan if util is None else float(util),
        total=float(row_totals.mean()),
        per_kv=per_kv,
        row_totals=row_totals.detach().cpu(),
    )
