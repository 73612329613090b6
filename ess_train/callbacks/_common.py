"""Helpers shared by the ESS callbacks: probe batches, positions, operator copies, per-layer ESS stats."""

from __future__ import annotations

import contextlib
import math
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from ess_train.ess import (
    DenseOperator,
    RecurrentOperator,
    entropy_ess,
    entropy_ess_from_singular_values,
    hankel_singular_values,
    tolerance_ess_from_singular_values,
)
from ess_train.models.protocol import OperatorView, StateSize

__all__ = [
    "ESSWarning",
    "PositionSpec",
    "resolve_positions",
    "extract_inputs",
    "fetch_probe",
    "probe_from_batch",
    "kv_pairs_for",
    "eval_mode",
    "compute_copy",
    "no_autocast",
    "position_bounds",
    "state_utilization",
    "LayerESS",
    "layer_ess",
    "entropy_profile",
    "entropy_profiles",
    "log_to_loggers",
    "logger_step",
    "short_traceback",
]

PositionSpec = int | Sequence[int] | None


class ESSWarning(UserWarning):
    """Category of every warning the ESS callbacks emit (filter with ``warnings.filterwarnings``)."""


# --------------------------------------------------------------------------------------------- positions
def resolve_positions(spec: PositionSpec, seq_len: int) -> list[int] | None:
    """Positions at which ESS is evaluated.

    ``None``: all ``seq_len`` positions (``0..L-1``, returned as ``None``); an ``int`` ``k``: ``k`` evenly
    spaced positions in ``[1, L-1]`` (``ESS_0`` is always 0, so it is left out); a sequence: those positions.
    """
    if spec is None:
        return None
    if isinstance(spec, bool):
        raise TypeError("positions must be None, an int count or a sequence of ints, got a bool")
    if isinstance(spec, int):
        if spec <= 0:
            raise ValueError(f"positions count must be >= 1, got {spec}")
        if seq_len <= 1:
            return [0]
        if spec >= seq_len - 1:
            return list(range(1, seq_len))
        pos = torch.linspace(1, seq_len - 1, spec).round().long().unique()
        return [int(p) for p in pos]
    pos = sorted({int(p) for p in spec})
    if not pos:
        raise ValueError("positions must not be empty")
    if pos[0] < 0 or pos[-1] >= seq_len:
        raise ValueError(f"positions must lie in [0, {seq_len - 1}] for seq_len={seq_len}, got {pos}")
    return pos


# ------------------------------------------------------------------------------------------------ probes
def extract_inputs(batch: Any, input_key: str = "inputs") -> Tensor:
    """The model input of a batch: ``batch[input_key]`` for dicts, ``batch[0]`` for tuples/lists."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict):
        if input_key not in batch:
            raise KeyError(f"batch has no key {input_key!r} (keys: {sorted(batch)}); set input_key=")
        return batch[input_key]
    if isinstance(batch, (list, tuple)) and batch:
        return batch[0]
    raise TypeError(f"cannot extract model inputs from a batch of type {type(batch).__name__}")


def _first_loader(loaders: Any) -> Any:
    if loaders is None:
        return None
    flat = getattr(loaders, "flattened", None)  # CombinedLoader
    if flat is not None:
        return flat[0] if flat else None
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    return loaders


def _rows_from_loader(loader: Any, n: int, input_key: str) -> tuple[Tensor, Tensor | None] | None:
    rows: list[Tensor] = []
    sids: list[Tensor] = []
    have = 0
    for i, batch in enumerate(loader):
        x = extract_inputs(batch, input_key)[: n - have]
        rows.append(x)
        sid = batch.get("slice_id") if isinstance(batch, dict) else None
        if isinstance(sid, Tensor):
            sids.append(sid[: x.shape[0]])
        have += x.shape[0]
        if have >= n or i >= 63:
            break
    if not rows:
        return None
    slice_id = torch.cat(sids) if len(sids) == len(rows) else None
    return torch.cat(rows), slice_id


def fetch_probe(
    trainer: pl.Trainer, probe_size: int, input_key: str = "inputs"
) -> tuple[Tensor, Tensor | None] | None:
    """First ``probe_size`` input rows (and their ``slice_id`` when batches carry one) of the validation data,
    falling back to the training data; ``None`` when no data can be reached.

    Sources, in order: ``datamodule.val_dataloader()``, ``trainer.val_dataloaders``,
    ``datamodule.train_dataloader()``, ``trainer.train_dataloader``.
    """
    dm = getattr(trainer, "datamodule", None)
    sources = [
        lambda: dm.val_dataloader() if dm is not None else None,
        lambda: trainer.val_dataloaders,
        lambda: dm.train_dataloader() if dm is not None else None,
        lambda: trainer.train_dataloader,
    ]
    for source in sources:
        try:
            loader = _first_loader(source())
        except Exception:  # not implemented / not set up: try the next source
            continue
        if loader is None:
            continue
        got = _rows_from_loader(loader, probe_size, input_key)
        if got is not None and got[0].shape[0] > 0:
            x, sid = got
            return x.detach().clone(), None if sid is None else sid.detach().clone()
    return None


def probe_from_batch(batch: Any, probe_size: int, input_key: str = "inputs") -> tuple[Tensor, Tensor | None]:
    """``(inputs, slice_id or None)`` from a user-given probe batch (Tensor, dict or tuple)."""
    x = extract_inputs(batch, input_key)[:probe_size]
    sid = batch.get("slice_id") if isinstance(batch, dict) else None
    sid = sid[: x.shape[0]] if isinstance(sid, Tensor) else None
    return x.detach().clone(), None if sid is None else sid.detach().clone()


def kv_pairs_for(datamodule: Any, slice_id: Tensor | None) -> Tensor | None:
    """Key-value pairs per probe row from ``datamodule.slice_kv_pairs`` (per slice, indexed by
    ``slice_id``) or ``datamodule.num_kv_pairs``; ``None`` when the task has no such notion."""
    if datamodule is None:
        return None
    per_slice = getattr(datamodule, "slice_kv_pairs", None)
    if per_slice is not None and slice_id is not None:
        if isinstance(per_slice, dict):
            names = list(getattr(datamodule, "slice_names", []) or [])
            per_slice = [per_slice.get(n, 0) for n in names] if names else list(per_slice.values())
        table = torch.as_tensor([float(v) for v in per_slice])
        if table.numel() and int(slice_id.max()) < table.numel():
            return table[slice_id.long().cpu()]
    num = getattr(datamodule, "num_kv_pairs", None)
    if isinstance(num, (int, float)) and not isinstance(num, bool) and num > 0:
        return torch.tensor(float(num))
    return None


# ---------------------------------------------------------------------------------------------- modules
@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode and restore each sub-module's own ``training`` flag afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in modes:
            m.training = flag


# -------------------------------------------------------------------------------------------- operators
def compute_copy(
    op: DenseOperator | RecurrentOperator,
    rows: int | None = None,
    operators: int | None = None,
    offset: int = 0,
) -> DenseOperator | RecurrentOperator:
    """``op`` restricted to its first ``rows`` batch rows and ``operators`` operators of dim 1.

    The operators are evenly spaced with stride ``G // operators``, starting at ``offset`` (mod ``G``): an
    increasing ``offset`` (the regularizer passes its call count) cycles through all of them.

    Returns ``op`` itself when nothing is cut, otherwise ``op.subset(...)``: the same kind of operator
    (a lazy zoo operator, e.g. Mamba's, cuts its factors, so nothing full-size is materialized), graph
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


# ------------------------------------------------------------------------------------------------- ESS
@contextlib.contextmanager
def no_autocast(op: DenseOperator | RecurrentOperator) -> Iterator[None]:
    """Autocast off on ``op``'s device (ESS is computed in float32/float64 whatever the AMP setting)."""
    device_type = op.device.type
    if device_type not in ("cpu", "cuda", "xpu", "mps", "hpu"):
        yield
        return
    with torch.autocast(device_type=device_type, enabled=False):
        yield


def position_bounds(per_operator: int, seq_len: int, positions: list[int] | None) -> list[int]:
    """Per-position bound on ``rank(H_i)`` of one operator: ``b_i = min(per_operator, i, L - i)``.

    ``H_i = T[i:, :i]`` has ``i`` columns and ``L - i`` rows, so ``b_0 = 0`` whatever the layer;
    ``per_operator`` is the layer's own cap (``StateSize.per_operator``: ``d`` for linear attention,
    ``N`` for Mamba, ``w - 1`` for sliding-window attention, ``L // 2`` for softmax attention, which
    makes ``b_i = min(i, L - i)``). ``positions=None``: all ``0..L-1``.
    """
    pos = range(seq_len) if positions is None else positions
    return [max(0, min(int(per_operator), int(i), seq_len - int(i))) for i in pos]


def state_utilization(
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


def entropy_profile(op: DenseOperator | RecurrentOperator, positions: list[int] | None) -> Tensor:
    """Entropy-ESS ``[batch, G, P]`` of ``op`` (batch dims after the first flattened into G)."""
    ent = entropy_ess(op, positions=positions)
    return ent.reshape(ent.shape[0], -1, ent.shape[-1])


def _batch_key(op: DenseOperator | RecurrentOperator, positions: list[int] | None) -> tuple[Any, ...]:
    """Operators with equal keys can share one engine call."""
    pos = None if positions is None else tuple(positions)
    if isinstance(op, RecurrentOperator):
        return ("recurrent", op.diagonal, op.seq_len, op.state_dim, op.dtype, op.device, pos)
    return ("dense", op.seq_len, op.dtype, op.device, pos)


def _concat_operators(ops: list[DenseOperator | RecurrentOperator]) -> DenseOperator | RecurrentOperator:
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


def entropy_profiles(
    ops: Sequence[DenseOperator | RecurrentOperator], positions: Sequence[list[int] | None]
) -> list[Tensor]:
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
        merged = _concat_operators([ops[i] for i in members])
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
    (:func:`state_utilization`, independent of whether position 0 is evaluated); NaN where undefined
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
    row_totals: Tensor  # [batch], multiplicity * sum over operators of avg ESS, for each row

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
    row_totals = size.multiplicity * n_ops * ent.mean(-1).mean(-1)
    per_kv = None
    if kv_pairs is not None:
        kv = kv_pairs.to(row_totals).reshape(-1)
        kv = kv.expand_as(row_totals) if kv.numel() == 1 else kv[: row_totals.shape[0]]
        per_kv = float((row_totals / kv.clamp_min(1)).mean())
    avg = float(profile.mean())
    util = state_utilization(profile, size.per_operator, L, positions)
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


# --------------------------------------------------------------------------------------------- logging
def logger_step(trainer: pl.Trainer) -> int:
    """The step at which Lightning logs the current batch's own metrics (``train/loss``, ``val/acc``).

    Inside ``fit`` that is the number of optimizer steps *before* the training batch that just ran
    (``global_step - 1`` in ``on_train_batch_end`` and in a validation inside training), so that ESS rows
    share steps with the loss and accuracy rows of the same moment (in ``metrics.csv``, W&B, TensorBoard).
    ``global_step`` where there is no fit loop.
    """
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    step = getattr(loop, "_batches_that_stepped", None)  # what Lightning's logger connector uses
    return int(step) if isinstance(step, int) else int(trainer.global_step)


def log_to_loggers(trainer: pl.Trainer, metrics: dict[str, Any]) -> None:
    """Send ``metrics`` to every logger of ``trainer`` at :func:`logger_step` (loggers are rank-zero only)."""
    if not metrics:
        return
    step = logger_step(trainer)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def short_traceback(exc: BaseException, limit: int = 3) -> str:
    """``Type: message`` plus the last ``limit`` frames, one line each."""
    frames = traceback.extract_tb(exc.__traceback__)[-limit:]
    where = " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} in {f.name}" for f in reversed(frames))
    return f"{type(exc).__name__}: {exc} (at {where})" if where else f"{type(exc).__name__}: {exc}"
