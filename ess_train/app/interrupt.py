"""``GracefulStop``: SIGTERM (preemption, ``kill``) and Ctrl-C end a run at a step boundary, checkpointed.

Lightning turns SIGTERM into ``SIGTERMException`` once the current training step is complete (on every
rank together under DDP), which leaves the trainer in a state that resumes exactly. This callback

- sends the first Ctrl-C (SIGINT) down the same path; a second signal (Ctrl-C or SIGTERM) no longer
  aborts: the checkpoint and the summary are still written, only the plots are skipped (Ctrl-\\, SIGQUIT,
  kills at once);
- defers a cluster's "checkpoint and requeue" signal (submitit's SIGUSR2 on SLURM, sent before the time
  limit or on preemption) to the same point, and hands the original handler back to the app, which calls
  it once the summary and plots are written (submitit then requeues the job and exits);
- writes ``checkpoint_path`` (``last.ckpt``) when the exception arrives, so that a resume continues the
  run where it stopped.

Signals are only redirected while training runs (between ``on_train_start`` and the end of ``fit``), and,
where the app asks for it (:meth:`GracefulStop.guard`, around its whole run), before and after: a signal
during start-up raises :class:`StartupInterrupt` (a clean exit, status 128 + signal number, nothing to
resume), one after training is recorded (``stopped_by``, ``after_training``) so that the app writes the
summary, skips the plots and exits with that status.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ess_train.app.checkpoint_files import CheckpointWriteError

__all__ = ["GracefulStop", "SIGTERMException", "StartupInterrupt"]

log = logging.getLogger(__name__)

# the signal submitit sends before a time limit or on preemption (it then requeues the job and exits)
_REQUEUE_SIGNAL = getattr(signal, "SIGUSR2", None)
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StartupInterrupt(SystemExit):
    """SIGINT/SIGTERM before training began: a clean exit with status 128 + the signal's number."""

    def __init__(self, signal_name: str) -> None:
        self.signal_name = signal_name
        super().__init__(128 + int(getattr(signal, signal_name)))


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
        self.save_error: CheckpointWriteError | None = None
        self.repeated = 0
        self.after_training = False
        self._previous: dict[int, Any] = {}
        self._phase = "start"  # start -> fit (on_train_start) -> finish (once fit is over)
        self._outer: dict[int, Any] = {}  # handlers before guard()
        self._self_sent = 0  # SIGTERMs this process sent itself (a Ctrl-C turned into a stop)

    # ------------------------------------------------------------------------- the app's whole run
    @contextmanager
    def guard(self) -> Iterator[GracefulStop]:
        """Handle SIGINT/SIGTERM for the whole of the app's run (start-up, training, the summary)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        self._outer = {s: signal.getsignal(s) for s in _STOP_SIGNALS}
        for signum in _STOP_SIGNALS:
            signal.signal(signum, self._on_signal)
        try:
            yield self
        finally:
            for signum, handler in self._outer.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
            self._outer = {}

    def _repeat(self, name: str) -> None:
        self.repeated += 1
        log.warning(
            f"{name}: already stopping (by {self.stopped_by}); the checkpoint and the summary are still "
            "written, the plots are skipped (Ctrl-\\ / SIGQUIT kills at once, losing them)."
        )

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._phase == "start":
            outer = self._outer.get(signum)
            if callable(outer) and outer is not signal.default_int_handler:
                outer(signum, frame)  # somebody acts on it (submitit bypasses SIGTERM): theirs to decide
                return
            print(
                f"ess-train: {name} during start-up: stopped before training began (nothing to resume).",
                file=sys.stderr,
                flush=True,
            )
            raise StartupInterrupt(name)
        if self._phase == "fit":  # SIGTERM, after Lightning's own handler (which stops at the step's end)
            if self._self_sent:
                self._self_sent -= 1
            elif self.stopped_by is None:
                self.stopped_by = name
            else:
                self._repeat(name)
            return
        if self.stopped_by is not None:
            self._repeat(name)
            return
        self.stopped_by, self.after_training = name, True
        log.warning(f"{name} after training: writing the summary (plots skipped), then exiting.")

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
        if self.stopped_by is not None:
            self._repeat(name)
            return
        self.stopped_by = name
        # Lightning's own SIGTERM handler (installed for the duration of fit) finishes the step and raises
        self._self_sent += 1 if self._outer else 0
        os.kill(os.getpid(), signal.SIGTERM)

    def _on_interrupt(self, signum: int, frame: Any) -> None:
        if self.stopped_by is None:
            log.warning(
                "Ctrl-C: finishing the current step, then saving a checkpoint and the summary "
                "(a second Ctrl-C skips only the plots; Ctrl-\\ kills at once)."
            )
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
        self._phase = "fit"
        self._install()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()
        self._phase = "finish"

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore()
        started = self._phase != "start"
        self._phase = "finish" if started else "start"
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        if self.stopped_by is None:
            self.stopped_by = "SIGTERM"
        if self.checkpoint_path is not None and started:
            try:
                trainer.save_checkpoint(self.checkpoint_path)
            except CheckpointWriteError as err:  # the summary says so; the previous checkpoint is intact
                self.save_error = err
                log.error(f"{self.stopped_by}: {err}")
                return
            self.saved = self.checkpoint_path
            log.info(f"{self.stopped_by}: checkpoint of step {trainer.global_step} saved to {self.saved}")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()
        if self._phase == "fit":
            self._phase = "finish"
