"""``GracefulStop``: SIGTERM (preemption, ``kill``) and Ctrl-C end a run at a step boundary, checkpointed.

Lightning turns SIGTERM into ``SIGTERMException`` once the current training step is complete (on every
rank together under DDP), which leaves the trainer in a state that resumes exactly. This callback

- sends the first Ctrl-C (SIGINT) down the same path; a second Ctrl-C aborts at once, as usual;
- defers a cluster's "checkpoint and requeue" signal (submitit's SIGUSR2 on SLURM, sent before the time
  limit or on preemption) to the same point, and hands the original handler back to the app, which calls
  it once the summary and plots are written (submitit then requeues the job and exits);
- writes ``checkpoint_path`` (``last.ckpt``) when the exception arrives, so that a resume continues the
  run where it stopped.

Signals are only redirected while training runs (between ``on_train_start`` and the end of ``fit``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["GracefulStop", "SIGTERMException"]

log = logging.getLogger(__name__)

# the signal submitit sends before a time limit or on preemption (it then requeues the job and exits)
_REQUEUE_SIGNAL = getattr(signal, "SIGUSR2", None)


class GracefulStop(Callback):
    """End training cleanly on SIGTERM, SIGINT or a requeue signal, saving ``checkpoint_path`` first.

    After ``trainer.fit`` raised :class:`SIGTERMException`, ``stopped_by`` names the signal (``"SIGTERM"``,
    ``"SIGINT"``, ``"SIGUSR2"``), ``saved`` is the checkpoint written (or None) and ``deferred`` holds a
    requeue handler to call once the run's outputs are written (:meth:`run_deferred`).
    """

    def __init__(self, checkpoint_path: str | Path | None) -> None:
        super().__init__()
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.stopped_by: str | None = None
        self.saved: Path | None = None
        self.deferred: Callable[[int, Any], Any] | None = None
        self._previous: dict[int, Any] = {}

    # ---------------------------------------------------------------------------------------- signals
    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        self._previous[signal.SIGINT] = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._on_interrupt)
        if _REQUEUE_SIGNAL is not None:
            previous = signal.getsignal(_REQUEUE_SIGNAL)
            if callable(previous):  # somebody (submitit) acts on it: defer that until the checkpoint exists
                self._previous[_REQUEUE_SIGNAL] = previous
                signal.signal(_REQUEUE_SIGNAL, self._on_requeue)

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _stop_at_step_end(self, name: str) -> None:
        if self.stopped_by is None:
            self.stopped_by = name
        # Lightning's own SIGTERM handler (installed for the duration of fit) finishes the step and raises
        os.kill(os.getpid(), signal.SIGTERM)

    def _on_interrupt(self, signum: int, frame: Any) -> None:
        log.warning(
            "Ctrl-C: finishing the current step, then saving a checkpoint and the summary "
            "(press Ctrl-C again to abort without them)."
        )
        previous = self._previous.get(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        self._stop_at_step_end("SIGINT")

    def _on_requeue(self, signum: int, frame: Any) -> None:
        log.warning(
            f"{signal.Signals(signum).name}: saving a checkpoint at the end of this step before the job is "
            "requeued."
        )
        self.deferred = self._previous.get(signum)
        self._stop_at_step_end(signal.Signals(signum).name)

    def run_deferred(self) -> None:
        """Call a deferred requeue handler (submitit's: requeues the job, then exits the process)."""
        handler, self.deferred = self.deferred, None
        if handler is not None and _REQUEUE_SIGNAL is not None:
            handler(_REQUEUE_SIGNAL, None)

    # -------------------------------------------------------------------------------------- lightning
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore()
        if not isinstance(exception, SIGTERMException):
            return
        if self.stopped_by is None:
            self.stopped_by = "SIGTERM"
        if self.checkpoint_path is not None:
            trainer.save_checkpoint(self.checkpoint_path)
            self.saved = self.checkpoint_path
            log.info(f"{self.stopped_by}: checkpoint of step {trainer.global_step} saved to {self.saved}")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()
