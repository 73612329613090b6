"""Callbacks that inject faults into an app run, or record what it left on disk
(tests/app/test_app_faults.py)."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn

# what LastCheckpointProbe saw: (step about to be taken, step held by last.ckpt or None)
SEEN: list[tuple[int, int | None]] = []


class LastCheckpointProbe(pl.Callback):
    """Before every training step, the step ``<dirpath>/last.ckpt`` holds: what a kill there would keep."""

    def __init__(self, dirpath: str) -> None:
        self.path = Path(dirpath) / "last.ckpt"

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        held = None
        if self.path.is_file():
            held = int(torch.load(self.path, map_location="cpu", weights_only=False)["global_step"])
        SEEN.append((trainer.global_step, held))


class FillDisk(pl.Callback):
    """At the validation of ``at_step`` (before the checkpoint is written), fill the filesystem of
    ``path`` with a ballast file so that only ``leave`` bytes stay free (None: an empty ballast file)."""

    def __init__(self, path: str, at_step: int, leave: int | None) -> None:
        self.path, self.at_step, self.leave = Path(path), at_step, leave

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self.at_step or trainer.state.fn != TrainerFn.FITTING:
            return
        st = os.statvfs(self.path.parent)
        free = st.f_bavail * st.f_frsize
        with open(self.path, "wb") as f:
            f.write(b"\0" * (0 if self.leave is None else max(0, free - self.leave)))


class Poison(pl.Callback):
    """At the start of step ``at_step``: ``what="lr"`` sets every learning rate to inf (for that step's
    update), ``what="weight"`` sets the first entry of the parameter ``name`` to inf."""

    def __init__(self, at_step: int, what: str, name: str = "") -> None:
        self.at_step, self.what, self.name = at_step, what, name

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.at_step:
            return
        if self.what == "lr":
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = math.inf
        else:
            with torch.no_grad():
                dict(pl_module.named_parameters())[self.name].view(-1)[0] = math.inf


class SignalTwice(pl.Callback):
    """SIGINT after step ``step`` (a Ctrl-C), then another one while the stop is being handled (while the
    checkpoint is written: this callback's ``on_exception`` runs before the app's)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self._sent = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._sent and trainer.global_step == self.step:
            self._sent = 1
            os.kill(os.getpid(), signal.SIGINT)

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._sent == 1:
            self._sent = 2
            os.kill(os.getpid(), signal.SIGINT)


class SignalAtFinalValidation(pl.Callback):
    """SIGTERM when the validation after ``fit`` starts (the run's training is complete)."""

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            os.kill(os.getpid(), signal.SIGTERM)


class SignalAtSetup(pl.Callback):
    """SIGINT while the trainer sets up (before training begins)."""

    def setup(self, trainer, pl_module, stage) -> None:
        os.kill(os.getpid(), signal.SIGINT)
