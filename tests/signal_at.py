"""A callback that sends this process a signal after a given optimizer step (interruption tests)."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl


class SignalAt(pl.Callback):
    """``os.kill(getpid(), signum)`` once ``global_step == step`` (what ``kill`` or SLURM would send)."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)) -> None:
        self.step = step
        self.signum = signum
        self._sent = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._sent and trainer.global_step == self.step:
            self._sent = True
            os.kill(os.getpid(), self.signum)
