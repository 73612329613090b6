"""The Lightning side the ESS callbacks share: the step they log at, logging to every logger, one-line
error reports, whether a strategy shards parameters and so how ESSMonitor measures across ranks. What a
measurement computes lives in ``ess_train.measure`` (no Lightning there)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

__all__ = [
    "DISTRIBUTED_MODES",
    "check_distributed",
    "log_to_loggers",
    "logger_step",
    "measure_mode",
    "sharding_strategy",
]

#: how ESSMonitor measures in a multi-process run: ``"rank0"`` (rank 0 alone), ``"split"`` (the probe forward
#: on every rank, the layers' ESS split across ranks), ``"auto"`` (split where parameters are sharded).
DISTRIBUTED_MODES = ("auto", "rank0", "split")


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


def check_distributed(distributed: str) -> str:
    """``distributed`` when it is one of :data:`DISTRIBUTED_MODES`, else ``ValueError``."""
    if distributed not in DISTRIBUTED_MODES:
        raise ValueError(f"distributed must be one of {DISTRIBUTED_MODES}, got {distributed!r}")
    return distributed


def measure_mode(distributed: str, trainer: pl.Trainer) -> str:
    """``"split"`` or ``"rank0"``: ``distributed`` itself unless ``"auto"``, which is ``"split"`` under a
    :func:`sharding_strategy` (a forward needs every rank there), ``"rank0"`` otherwise (DDP, one device)."""
    if check_distributed(distributed) != "auto":
        return distributed
    return "split" if sharding_strategy(trainer) is not None else "rank0"
