"""``StepProgressBar``: training progress in optimizer steps toward ``max_steps``, across epochs.

Lightning's bar restarts at every epoch (313 batches for the main job), which hides how far a
step-budgeted run is from its end. This bar counts ``trainer.global_step`` of ``max_steps``, with rate
and time left, and starts at the resumed step after a resume. When stdout is not a terminal (a SLURM log,
a pipe, CI) it prints one plain line every ``line_every`` of the run instead of carriage-return updates,
through :mod:`logging`, so the lines also reach the run's log file.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar

__all__ = ["StepProgressBar", "format_duration"]

log = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    """``3725.0 -> '1h02m05s'``, ``65 -> '1m05s'``, ``4.2 -> '4s'``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class StepProgressBar(TQDMProgressBar):
    """A TQDM bar over the whole run's optimizer steps (``global_step`` of ``max_steps``).

    Args:
        refresh_rate: update the terminal bar every this many steps.
        line_every: without a terminal, print a progress line every this fraction of the run.
        interactive: force the terminal bar (True) or plain lines (False); default: ``sys.stdout.isatty()``.
    """

    def __init__(self, refresh_rate: int = 1, line_every: float = 0.05, interactive: bool | None = None):
        super().__init__(refresh_rate=refresh_rate)
        if not 0 < line_every <= 1:
            raise ValueError(f"line_every must be in (0, 1], got {line_every}")
        self.line_every = line_every
        self.interactive = sys.stdout.isatty() if interactive is None else interactive
        self._start_step = 0
        self._start_time = 0.0
        self._next_line = 0

    def _total(self, trainer: pl.Trainer) -> int | None:
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        batches = self.total_train_batches
        epochs = trainer.max_epochs
        if isinstance(batches, int) and epochs is not None and epochs > 0:
            return batches * epochs
        return None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.interactive:
            self.disable()  # no carriage-return bars (validation's included); lines come from _print_line
        self._start_run(trainer)

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.interactive:
            self.disable()
        super().on_sanity_check_start(trainer, pl_module)

    def _start_run(self, trainer: pl.Trainer) -> None:
        total = self._total(trainer)
        self._start_step = trainer.global_step
        self._start_time = time.monotonic()
        self._next_line = trainer.global_step
        self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        bar.reset(total=total)
        bar.initial = trainer.global_step
        bar.n = trainer.global_step
        bar.set_description("train (steps)")

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        """One bar for the whole run: nothing restarts at an epoch."""

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        total = self._total(trainer)
        if self.interactive:
            bar = self.train_progress_bar
            if bar is not None and self._should_update(step, bar.total):
                bar.n = step
                bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
                bar.refresh()
            return
        if step >= self._next_line or (total is not None and step >= total):
            self._print_line(trainer, pl_module, step, total)
            stride = max(1, int(round(self.line_every * total))) if total else 100
            self._next_line = (step // stride + 1) * stride

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.interactive and self.train_progress_bar is not None:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def _print_line(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, total: int | None):
        if not trainer.is_global_zero:
            return
        done = step - self._start_step
        elapsed = time.monotonic() - self._start_time
        rate = done / elapsed if elapsed > 0 and done > 0 else float("nan")
        parts = [f"step {step}/{total}" if total else f"step {step}"]
        if total:
            parts.append(f"({100.0 * step / total:.0f}%)")
        if rate == rate:  # not NaN
            parts.append(f"{rate:.1f} steps/s")
            parts.append(f"elapsed {format_duration(elapsed)}")
            if total:
                parts.append(f"left {format_duration((total - step) / rate)}")
        metrics = self.get_metrics(trainer, pl_module)
        shown = {k: v for k, v in metrics.items() if k.startswith(("train/", "val/"))}
        parts.extend(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        log.info("  ".join(parts))
