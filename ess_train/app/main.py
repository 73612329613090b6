"""The Hydra app's command line: ``ess-train`` / ``python -m ess_train`` / ``python -m ess_train.app``.

Composes ``conf/`` (model, task, trainer, logger, callbacks, checkpoint, experiment) and validates it before
the heavy imports (torch, Lightning), so that a configuration error answers in about two seconds, in one
line, with exit status 2 (``HYDRA_FULL_ERROR=1`` for the traceback); then runs
:func:`ess_train.app.training.train`. In a multirun (``-m``) a job's configuration error fails that job
only: it is recorded in the sweep table with its message, the other jobs run, and the sweep exits non-zero.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ess_train.app.rundir import check_resume_argument, register_resolvers
from ess_train.app.validation import ConfigError, validate_config

__all__ = ["main", "CONFIG_DIR", "INTERRUPTED_AT_START_UP"]

INTERRUPTED_AT_START_UP = "ess-train: SIGINT during start-up: stopped before training began."

#: the configs: ``ess_train/conf`` links the repository's ``conf/`` (a wheel carries a copy, so that
#: ``pip install .`` runs ``ess-train`` from any directory)
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")

register_resolvers()


def _multirun() -> bool:
    if not HydraConfig.initialized():
        return False
    mode = HydraConfig.get().mode
    return getattr(mode, "name", str(mode)).endswith("MULTIRUN")


def _stop(kind: str, err: BaseException, cfg: DictConfig, status: int) -> NoReturn:
    """One line on stderr and the exit status; in a multirun the error fails this job only (Hydra records
    it and runs the others; the sweep then exits non-zero)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1" or _multirun():
        print(f"ess-train: {kind}: {err}", file=sys.stderr)
        raise err
    print(f"ess-train: {kind}: {err}", file=sys.stderr)
    if kind == "configuration error":
        print("  (set HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr)
    sys.exit(status)


def _exit_at_start_up(signum: int, frame: Any) -> None:
    """SIGINT while the app composes its config and imports its libraries: the line, and status 130 at once.

    A KeyboardInterrupt raised there unwinds through whichever library is being imported, which can turn it
    into another error (numpy half-imported: a RecursionError that the config check reported as an
    unimportable target, status 2) or abort the process (inside a pybind11 module: SIGABRT). Nothing has
    started that needs closing; training's own handler (``GracefulStop.guard``) takes over before the run."""
    os.write(2, (INTERRUPTED_AT_START_UP + "\n").encode())
    os._exit(130)


def _start_up_handler(on: bool) -> None:
    """Install :func:`_exit_at_start_up` for SIGINT (``on``) where Python's default is in place (an ignored
    SIGINT, as a shell's background job hands it, stays ignored), or put the default back."""
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGINT)
    if on and current is signal.default_int_handler:
        signal.signal(signal.SIGINT, _exit_at_start_up)
    elif not on and current is _exit_at_start_up:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    """The Hydra task: returns validation accuracy (for Hydra's sweepers)."""
    try:
        validate_config(cfg)  # before torch and Lightning are imported
    except ConfigError as err:
        _stop("configuration error", err, cfg, 2)
    from ess_train.app import training

    _start_up_handler(False)  # the libraries are in: from here a Ctrl-C is training's to handle
    try:
        return float(training.train(cfg)["val_acc"])
    except ConfigError as err:
        _stop("configuration error", err, cfg, 2)
    except (training.NonFiniteError, training.CheckpointWriteError) as err:  # the summary says why
        _stop("training stopped", err, cfg, 1)


def main() -> None:
    """Console entry point (``ess-train``, ``python -m ess_train``)."""
    problem = check_resume_argument(sys.argv[1:])
    if problem is not None:
        print(f"ess-train: configuration error: {problem}", file=sys.stderr)
        sys.exit(2)
    _start_up_handler(True)
    try:
        _hydra_main()
    except KeyboardInterrupt:  # Ctrl-C in the moment between start-up's handler and training's
        print(INTERRUPTED_AT_START_UP, file=sys.stderr, flush=True)
        sys.stdout.flush()
        # exit here: the interpreter's shutdown after a KeyboardInterrupt in the imports could end the process
        # by SIGINT instead (status -2, 2 of 7 tries here); nothing has started yet that needs closing
        os._exit(130)
