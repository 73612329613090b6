"""The Hydra callback that keeps a multirun's table (``ess_train.app.sweep_summary``) up to date.

Registered in ``conf/config.yaml`` under ``hydra.callbacks``. It imports neither torch nor Lightning: Hydra
instantiates its callbacks in every run.
"""

from __future__ import annotations

import logging
import os
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ess_train.app.sweep_summary import ERROR_NAME, expected_jobs, write_sweep_summary

__all__ = ["SweepSummary"]

log = logging.getLogger(__name__)


def _is_multirun(config: DictConfig) -> bool:
    mode = OmegaConf.select(config, "hydra.mode", default=None)
    return getattr(mode, "name", str(mode)).endswith("MULTIRUN")


class SweepSummary(Callback):
    """Hydra callback: the table of every job of a multirun, in the sweep directory and on the console.

    Register it in ``conf/config.yaml``::

        hydra:
          callbacks:
            sweep_summary:
              _target_: ess_train.app.sweep_callback.SweepSummary

    ``on_multirun_end`` (in the launching process) writes ``sweep_summary.csv``/``.md`` and prints the
    table. ``on_job_end`` (in the job's process: the launching one for the basic launcher, a submitit
    worker otherwise) records a failed job's error in ``<job dir>/job_error.txt`` and, if
    ``update_each_job``, rewrites the table (without printing it), so that a sweep with a failed job,
    after which Hydra skips ``on_multirun_end``, still has its table; with the basic launcher, the last
    job of such a sweep prints it.
    Single runs (not ``-m``) are left alone. Errors are logged, never raised.
    """

    def __init__(self, update_each_job: bool = True, print_table: bool = True) -> None:
        self.update_each_job = update_each_job
        self.print_table = print_table
        self._sweep_dir: str | None = None
        self._launcher_pid: int | None = None
        self._failed = False  # a job of this process failed (basic launcher)

    def _resolve_sweep_dir(self, config: DictConfig) -> Path:
        if self._sweep_dir is not None:
            return Path(self._sweep_dir)
        return Path(str(config.hydra.sweep.dir)).absolute()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # resolved once, before any job: the launcher sees the same ${now:...} (OmegaConf caches it), and
        # the absolute path travels with this object to submitit workers
        self._sweep_dir = str(Path(str(config.hydra.sweep.dir)).absolute())
        self._launcher_pid = os.getpid()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        # a job started again in the same directory (a requeued SLURM job, resume=auto) is not failed (yet)
        out = OmegaConf.select(config, "hydra.runtime.output_dir", default=None)
        if out and _is_multirun(config):
            try:
                (Path(out) / ERROR_NAME).unlink(missing_ok=True)
            except OSError as err:
                log.warning("SweepSummary.on_job_start: %s", err)

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if not _is_multirun(config):
            return
        try:
            failed = getattr(getattr(job_return, "status", None), "name", "") == "FAILED"
            if failed:
                self._record_error(config, getattr(job_return, "_return_value", None))
            if not self.update_each_job:
                return
            sweep_dir = self._resolve_sweep_dir(config)
            in_launcher = os.getpid() == self._launcher_pid  # the basic launcher: jobs one after another
            self._failed = self._failed or (failed and in_launcher)
            # the basic launcher runs every job of the batch, then raises at the first failed one and never
            # calls on_multirun_end: after a failure, print the table when the last job is done
            expected = expected_jobs(sweep_dir) if self._failed else None
            num = OmegaConf.select(config, "hydra.job.num", default=None)
            last = expected is not None and num == len(expected) - 1
            result = write_sweep_summary(sweep_dir, print_table=self.print_table and last)
            if failed and in_launcher:
                log.warning(
                    "job %s failed; Hydra will not call on_multirun_end, the sweep table is kept up to date "
                    "in %s",
                    num,
                    result["md"],
                )
        except Exception as err:  # a summary must never take a job down
            log.warning("SweepSummary.on_job_end: %s: %s", type(err).__name__, err)

    @staticmethod
    def _record_error(config: DictConfig, err: Any) -> None:
        out = OmegaConf.select(config, "hydra.runtime.output_dir", default=None)
        if out and isinstance(err, BaseException):
            text = "".join([f"{type(err).__name__}: {err}\n\n", *traceback.format_exception(err)])
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / ERROR_NAME).write_text(text)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            result = write_sweep_summary(self._resolve_sweep_dir(config), print_table=self.print_table)
            log.info("sweep summary: %s, %s", result["csv"], result["md"])
        except Exception as err:
            log.warning("SweepSummary.on_multirun_end: %s: %s", type(err).__name__, err)
