"""One training run of the app from a composed config: :func:`train` (what ``ess-train`` runs per job).

Validates every key before anything is built, trains with checkpoints in the run directory (and a clean
stop on SIGTERM or Ctrl-C), and returns (and prints) a summary: accuracy (overall and per slice), ESS per
layer, and where the checkpoint, the offline W&B run and the plots are. ``resume=<run dir>`` continues a
run (see :mod:`ess_train.app.rundir`). The command line around it is :mod:`ess_train.app.main`.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import signal
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ess_train.app.checkpoint_files import CheckpointWriteError, recorded_step, write_text_atomically
from ess_train.app.checkpointing import AtomicCheckpointIO
from ess_train.app.interrupt import GracefulStop, SIGTERMException
from ess_train.app.nonfinite import NonFiniteError, NonFiniteGuard, NonFiniteWarning
from ess_train.app.progress import StepProgressBar
from ess_train.app.rundir import (
    CHECKPOINT_DIR,
    LAST_CHECKPOINT,
    latest_checkpoint,
    plan_resume,
    register_resolvers,
    save_run_file,
    target_dir,
)
from ess_train.app.runlock import RunDirectoryBusy, RunLock, is_launching_process
from ess_train.app.validation import ConfigError, validate_config
from ess_train.callbacks import ESSMonitor
from ess_train.lit import SequenceLM

__all__ = ["train", "format_summary"]

log = logging.getLogger(__name__)


register_resolvers()

# Third-party warnings a user of the app cannot act on (filtered here, never in a user's own Trainer):
# - conf/hydra/launcher/submitit_{local,slurm}.yaml keep the plugin's names on purpose, so Hydra validates
#   them against the plugin's schema; Hydra 1.3 warns that this matching is deprecated (hydra-core < 1.4);
# - Lightning's own pytree helper uses torch's deprecated LeafSpec (fixed upstream, not in Lightning 2.6).
_IGNORED_WARNINGS = (
    r".*is validated against ConfigStore schema with the same name.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
)
for _pattern in _IGNORED_WARNINGS:
    warnings.filterwarnings("ignore", message=_pattern)


class _DropAdvertisements(logging.Filter):
    """Drop Lightning's "Tip: try installing <cloud product>" lines from the app's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip: For seamless cloud" not in record.getMessage()


_DROP_ADVERTISEMENTS = _DropAdvertisements()


def _route_lightning_logs() -> None:
    """Send Lightning's messages and Python warnings through the root logger's handlers (Hydra's console
    and log file), when there are any (not when ``train`` is called from plain Python).

    Lightning gives its loggers their own stream handlers and stops propagation when it is imported before
    logging is configured, so its messages would miss the run's log file.
    """
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DROP_ADVERTISEMENTS)
    if not logging.getLogger().handlers:
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True
    logging.captureWarnings(True)


def _float(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def _build_logger(node: DictConfig | None, version: str | int | None) -> Any:
    if node is None or node.get("_target_") is None:
        return False
    return instantiate(node, **({"version": version} if version is not None else {}))


def _build_checkpointing(node: DictConfig | None) -> pl.Callback | None:
    if node is None or node.get("_target_") is None:
        return None
    return instantiate(node)


def _built(path: str, make: Callable[[], Any]) -> Any:
    """``make()``, with a constructor's refusal of a value (``ValueError``/``TypeError``, also wrapped by
    Hydra's instantiate) raised as a :class:`ConfigError` naming the config group, before training."""
    try:
        return make()
    except (InstantiationException, ValueError, TypeError) as err:
        root: BaseException = err
        while isinstance(root, InstantiationException) and root.__cause__ is not None:
            root = root.__cause__
        if isinstance(root, ConfigError):
            raise root from err
        raise ConfigError(f"{path}: {root}") from err


def _task_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def train(cfg: DictConfig) -> dict[str, Any]:
    """Build everything from ``cfg``, fit, and return the run's summary (also written as summary.json).

    Raises :class:`ConfigError` for an unusable configuration (a run directory another live run holds
    included), :class:`SIGTERMException` (after writing the checkpoint, summary and plots) when a signal
    stopped the run, :class:`ess_train.app.interrupt.StartupInterrupt` for a signal before training began,
    :class:`CheckpointWriteError` when a checkpoint could not be written (a full disk: the summary says
    so) and, in strict mode, :class:`NonFiniteError` when training diverged.
    """
    _route_lightning_logs()
    validate_config(cfg)
    stopper = GracefulStop(None)
    with stopper.guard():
        lock_dir = target_dir(cfg)
        lock = RunLock(lock_dir) if lock_dir is not None and is_launching_process() else None
        try:
            if lock is not None:
                lock.acquire()
        except RunDirectoryBusy as err:
            raise ConfigError(str(err)) from err
        try:
            if lock is not None and lock.note:
                log.warning(lock.note)
            return _train(cfg, stopper)
        finally:
            if lock is not None:
                lock.release()


def _train(cfg: DictConfig, stopper: GracefulStop) -> dict[str, Any]:
    try:
        plan = plan_resume(cfg, _task_overrides())
    except ValueError as err:
        raise ConfigError(str(err)) from err
    cfg = plan.config
    for message in plan.skipped:
        log.warning(f"Resume: {message}")
    if plan.resuming:
        validate_config(cfg)
        log.info(f"Resuming {plan.run_dir} from {plan.checkpoint} (step {plan.checkpoint_step})")
    out_dir = plan.run_dir
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = _built("task", lambda: instantiate(cfg.task))
    model = _built("model", lambda: instantiate(cfg.model, vocab_size=datamodule.vocab_size))
    module = _built("optim", lambda: SequenceLM(model, **OmegaConf.to_container(cfg.optim, resolve=True)))
    callbacks = [
        _built(f"callbacks.{key}", lambda node=node: instantiate(node))
        for key, node in (cfg.callbacks or {}).items()
        if node is not None
    ]
    # strict mode (the ESS monitor's `strict`): a diverged run exits non-zero
    guard = NonFiniteGuard(strict=any(getattr(cb, "strict", False) is True for cb in callbacks))
    callbacks.append(guard)
    # `checkpoint=none`, or a trainer that turns checkpointing off (trainer.enable_checkpointing=false)
    wanted = cfg.trainer.get("enable_checkpointing", True) is not False
    checkpointing = _build_checkpointing(cfg.get("checkpoint")) if wanted else None
    if checkpointing is not None:
        callbacks.append(checkpointing)
        stopper.checkpoint_path = (
            Path(getattr(checkpointing, "dirpath", None) or out_dir / CHECKPOINT_DIR) / LAST_CHECKPOINT
        )
    callbacks.append(stopper)
    trainer_overrides: dict[str, Any] = {}
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(StepProgressBar())
    if checkpointing is None:
        trainer_overrides["enable_checkpointing"] = False
    if cfg.trainer.get("plugins") is None:  # checkpoints written atomically, with a checksum
        trainer_overrides["plugins"] = [AtomicCheckpointIO()]
    logger = _built("logger", lambda: _build_logger(cfg.logger, plan.logger_version))
    trainer: pl.Trainer = _built(
        "trainer", lambda: instantiate(cfg.trainer, callbacks=callbacks, logger=logger, **trainer_overrides)
    )
    if logger and hasattr(logger, "log_hyperparams") and not plan.resuming:
        hparams = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        logger.log_hyperparams(OmegaConf.to_container(hparams, resolve=True))
    if trainer.is_global_zero:  # after log_hyperparams, which starts the W&B run and so fixes its id
        # as the logger has it: an int is a CSV/TensorBoard version_<n> directory, a string a name or W&B id
        save_run_file(out_dir, cfg, logger.version if logger else None)

    stopped: SIGTERMException | None = None
    failure: NonFiniteError | CheckpointWriteError | None = None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    except SIGTERMException as exc:
        stopped = exc
    except (NonFiniteError, CheckpointWriteError) as err:
        failure = err
        if isinstance(err, NonFiniteError) and not guard.strict:
            warnings.warn(f"training stopped: {err}", NonFiniteWarning, stacklevel=2)
        log.error(f"Training stopped: {err}")
    metrics = None
    if stopped is None and failure is None and stopper.stopped_by is None:
        try:
            final = trainer.validate(module, datamodule=datamodule, verbose=False)
            metrics = {k: _float(v) for k, v in (final[0] if final else trainer.callback_metrics).items()}
        except SIGTERMException:  # a signal after training (recorded by the stopper): the summary now
            pass
    if metrics is None:  # no final validation: a preempted job has seconds left; report the last one
        metrics = {k: _float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    summary: dict[str, Any] = {
        "val_acc": metrics.get("val/acc", math.nan),
        "val_acc_per_slice": {
            k.removeprefix("val/acc/"): v for k, v in metrics.items() if k.startswith("val/acc/")
        },
        "steps": trainer.global_step,
        "max_steps": trainer.max_steps,
        "output_dir": str(out_dir),
        "overrides": _task_overrides(),
        "resumed_from": str(plan.checkpoint) if plan.resuming else None,
        "interrupted": stopper.stopped_by,
    }
    if plan.skipped:
        summary["resume_skipped"] = list(plan.skipped)
    if stopper.after_training:
        summary["interrupted_after_training"] = True
    if checkpointing is not None:
        summary.update(_checkpoint_summary(stopper, checkpointing, out_dir, failure))
    if failure is not None or stopper.save_error is not None:
        summary["stopped"] = _stop_record(failure or stopper.save_error)
    hurry = bool(stopper.repeated or stopper.after_training or failure is not None)
    for cb in callbacks:
        if not isinstance(cb, ESSMonitor):
            continue
        summary["ess"] = cb.summary()
        if cfg.save_plots and trainer.is_global_zero and not hurry:
            try:
                summary["plots"] = [str(p) for p in cb.save_plots(out_dir / "plots")]
            except Exception as err:  # plots never cost a run its summary (unless the monitor is strict)
                if cb.strict:
                    raise
                log.warning(f"ESSMonitor: could not draw the plots: {type(err).__name__}: {err}")
    experiment = getattr(logger, "experiment", None) if logger else None
    run_dir = getattr(experiment, "dir", None) or getattr(logger, "log_dir", None)
    if run_dir:
        summary["logger_dir"] = str(run_dir)
    if trainer.is_global_zero:
        try:
            write_text_atomically(out_dir / "summary.json", json.dumps(summary, indent=2, default=str))
        except OSError as err:
            log.error(f"could not write {out_dir / 'summary.json'}: {err}")
        log.info(format_summary(summary))
    if logger and hasattr(logger, "finalize"):
        interrupted = stopper.stopped_by is not None or failure is not None
        logger.finalize("success" if not interrupted else "interrupted")
    if experiment is not None and hasattr(experiment, "finish"):
        experiment.finish()
    if stopped is None and stopper.stopped_by is not None:  # a signal after (or at the end of) training
        stopped = SIGTERMException()
    if stopped is not None:
        stopper.run_deferred()  # a cluster's requeue handler (submitit): requeues the job and exits
        stopped.code = _exit_status(stopper.stopped_by)  # the process exits with 128 + signal number
        raise stopped
    if isinstance(failure, CheckpointWriteError) or (isinstance(failure, NonFiniteError) and guard.strict):
        raise failure
    return summary


def _checkpoint_summary(
    stopper: GracefulStop, checkpointing: pl.Callback, out_dir: Path, failure: BaseException | None
) -> dict[str, Any]:
    """The checkpoint to continue from (and its step), and the best one."""
    last: Any = stopper.saved or getattr(checkpointing, "last_model_path", "") or None
    if failure is not None or stopper.save_error is not None:  # the newest intact one, whatever its name
        try:
            last = latest_checkpoint(out_dir)
        except ValueError:
            last = None
    out = {"checkpoint": str(last) if last else None}
    out["checkpoint_step"] = recorded_step(last) if last else None
    out["best_checkpoint"] = getattr(checkpointing, "best_model_path", "") or None
    return out


def _stop_record(err: BaseException) -> dict[str, Any]:
    """summary.json's ``stopped``: why training ended before ``max_steps``."""
    if isinstance(err, NonFiniteError):
        return {"reason": "non-finite " + err.what, "step": err.step, "where": err.name, "message": str(err)}
    reason = "disk full" if getattr(err, "errno", None) == errno.ENOSPC else "checkpoint not written"
    return {"reason": reason, "step": getattr(err, "step", None), "message": str(err)}


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable end-of-run summary."""
    lines = ["", "=" * 72, f"ess-train summary  (steps: {summary['steps']})"]
    if summary.get("interrupted"):
        when = " (after training)" if summary.get("interrupted_after_training") else ""
        lines.append(
            f"  STOPPED by {summary['interrupted']}{when} at step {summary['steps']} of "
            f"{summary.get('max_steps')}"
        )
    if summary.get("stopped"):
        lines.append(f"  STOPPED ({summary['stopped']['reason']}): {summary['stopped']['message']}")
    for message in summary.get("resume_skipped", []):
        lines.append(f"  resume {message}")
    lines.append(f"  validation accuracy: {summary['val_acc']:.3f}")
    for name, acc in summary.get("val_acc_per_slice", {}).items():
        lines.append(f"    {name:<28s} {acc:.3f}")
    ess = summary.get("ess") or {}
    layers = ess.get("layers", {}) if isinstance(ess, dict) else {}
    if layers:
        lines.append(
            "  ESS per layer (entropy-ESS averaged over positions; utilization = ESS / its rank bound):"
        )
        for name, row in layers.items():
            kind = f" ({row['mixer']})" if row.get("mixer") else ""
            cells = "  ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in row.items()
                if k != "mixer" and not (k == "flags" and not v)
            )
            lines.append(f"    {name}{kind}: {cells}")
    if summary.get("checkpoint"):
        step = summary.get("checkpoint_step")
        held = f" (step {step})" if step is not None else ""
        lines.append(f"  checkpoint: {summary['checkpoint']}{held}")
    resumable = summary.get("interrupted") or (summary.get("stopped") or {}).get("reason") == "disk full"
    if resumable and summary.get("checkpoint") and not summary.get("interrupted_after_training"):
        lines.append(f"    continue with: ess-train resume={summary['output_dir']}")
    if "logger_dir" in summary:
        lines.append(f"  logger run directory: {summary['logger_dir']}")
        if "wandb" in summary["logger_dir"]:
            lines.append("    (offline W&B run: `wandb sync <that directory's parent>` uploads it)")
    if summary.get("plots"):
        lines.append(f"  ESS plots: {Path(summary['plots'][0]).parent}")
    lines.append(f"  summary.json: {summary['output_dir']}/summary.json")
    lines.append("=" * 72)
    return "\n".join(lines)


def _exit_status(signal_name: str | None) -> int:
    """128 + the signal's number, as a shell reports a process a signal ended (143 for SIGTERM)."""
    return 128 + int(getattr(signal, signal_name or "SIGTERM", signal.SIGTERM))
