"""Loggers as the app configures them (``conf/logger/``)."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from typing import Any

from lightning.fabric.utilities.logger import _add_prefix
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

__all__ = ["WandbLogger", "CSVLogger"]


#: ``WANDB_MODE`` values that mean online (wandb's own spellings)
_ONLINE_MODES = ("online", "run")


def resolve_offline(offline: bool | None) -> bool:
    """``offline`` when given; else the environment's ``WANDB_MODE`` (online/run: False; disabled: False,
    so that wandb itself disables the run), else True (the app's default: no account, no network)."""
    if offline is not None:
        return bool(offline)
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    return mode not in (*_ONLINE_MODES, "disabled")


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` as the app uses it.

    - ``offline=None`` (the app's config) follows ``WANDB_MODE`` from the environment (``online`` syncs
      live), else offline; an explicit ``logger.offline=true/false`` wins over the environment.
    - ``init_timeout`` (seconds, online only): how long ``wandb.init`` may wait for the server, so that a
      bad API key or an unreachable server fails within seconds with wandb's message, not after minutes.
    - W&B's own step (``_step``) is the trainer step, so that a resumed run's rows continue the step axis
      of the run it resumes (one W&B run id) instead of starting again at 0, where W&B would draw the two
      segments on top of each other (or drop the rows whose step went back).
    - without the ``anonymous`` argument that wandb >= 0.19 ignores (Lightning always passes it, and wandb
      then prints "The anonymous setting has no effect" at every run).
    """

    def __init__(
        self,
        *args: Any,
        offline: bool | None = None,
        init_timeout: float = 20.0,
        anonymous: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if not init_timeout > 0:
            raise ValueError(f"init_timeout must be > 0 seconds, got {init_timeout!r}")
        offline = resolve_offline(offline)
        if not offline and "settings" not in kwargs:
            import wandb

            kwargs["settings"] = wandb.Settings(init_timeout=float(init_timeout))
        super().__init__(*args, offline=offline, anonymous=anonymous, **kwargs)
        if not anonymous:
            self._wandb_init.pop("anonymous", None)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if step is None or self._wandb_init.get("sync_tensorboard"):
            return super().log_metrics(metrics, step)
        metrics = _add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR)
        self.experiment.log(dict(metrics, **{"trainer/global_step": step}), step=int(step))


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued, not deleted.

    Lightning's writer deletes the file it finds in its version directory; a resumed run (same version)
    would lose every row logged before the interruption.
    """

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                header = next(csv.reader(file), [])
            self.metrics_keys = sorted(header)


class CSVLogger(_LightningCSVLogger):
    """Lightning's ``CSVLogger``; a run resumed with the same ``version`` appends to its ``metrics.csv``."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
