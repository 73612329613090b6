"""The Lightning side the ESS callbacks share: the step they log at, logging to every logger, one-line
error reports and whether a strategy shards parameters. What a measurement computes lives in
``ess_train.measure`` (no Lightning there)."""

from __future__ import annotations

import traceback
from typing import Any

import lightning.pytorch as pl

__all__ = ["log_to_loggers", "logger_step", "sharding_strategy", "short_traceback"]


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


def sharding_strategy(trainer: pl.Trainer) -> str | None:
    """Name of the trainer's strategy when it shards parameters across ranks (FSDP, ModelParallel,
    DeepSpeed ZeRO-3), where a forward on one rank alone would hang; None otherwise."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
        return type(strategy).__name__
    if isinstance(strategy, DeepSpeedStrategy) and getattr(strategy, "zero_stage_3", False):
        return "DeepSpeedStrategy (ZeRO stage 3)"
    return None
