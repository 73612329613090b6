"""Loggers as the app configures them (``conf/logger/``)."""

from __future__ import annotations

import csv
from typing import Any

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

__all__ = ["WandbLogger", "CSVLogger"]


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger``, without the ``anonymous`` argument that wandb >= 0.19 ignores.

    Lightning always passes ``anonymous`` to ``wandb.init`` (``None`` unless asked), and wandb then prints
    "The anonymous setting has no effect" at every run; it is only dropped when not asked for.
    """

    def __init__(self, *args: Any, anonymous: bool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, anonymous=anonymous, **kwargs)
        if not anonymous:
            self._wandb_init.pop("anonymous", None)


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
