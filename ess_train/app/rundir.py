"""A run's directory, and how an interrupted run is found and continued.

::

    <run dir>/
      .hydra/          Hydra's composed config and overrides of the first start (.hydra/resume-*/ later)
      run.json         the first start's resolved config and the logger's run id/version (what resume uses)
      checkpoints/     last.ckpt (every validation, and on SIGTERM/SIGINT), best-*.ckpt (best val/acc),
                       each with a sidecar <file>.json (step, size, sha256: ess_train/app/checkpoint_files.py)
      .ess_train.lock  held while a process runs in the directory (ess_train/app/runlock.py)
      summary.json     plots/     wandb/ (offline W&B run)     ess_train.log

``resume`` (a top-level config key) is ``auto`` (default: continue when the run directory already holds a
checkpoint, as after a SLURM requeue into the same directory), ``null`` (always start afresh), or a run
directory (``ess-train resume=outputs/2026-12-02/10-00-00``: continue that run in its own directory, with its
config, its logger run (same W&B id) and its ESS history; overrides given with it, such as
``trainer.max_steps=4000``, are applied on top). The checkpoint continued from is the newest intact one by
the step it holds, whatever its name; newer ones that fail their checksum or do not load are named and
skipped (:func:`ess_train.app.checkpoint_files.choose_checkpoint`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ess_train.app.checkpoint_files import NoIntactCheckpoint, choose_checkpoint

__all__ = [
    "RUN_FILE",
    "CHECKPOINT_DIR",
    "LAST_CHECKPOINT",
    "ResumePlan",
    "plan_resume",
    "save_run_file",
    "latest_checkpoint",
    "checkpoint_candidates",
    "target_dir",
    "check_resume_argument",
    "run_dir_resolver",
    "output_subdir_resolver",
    "register_resolvers",
]

RUN_FILE = "run.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
_NO_RESUME = (None, "", "null", "none", "never", False)


def _is_dir_value(resume: Any) -> bool:
    return resume not in _NO_RESUME and str(resume) != "auto"


def register_resolvers() -> None:
    """The resolvers ``conf/config.yaml`` uses (``ess_run_dir``, ``ess_output_subdir``), registered before
    any config is composed (the command line, ``train``, tests)."""
    OmegaConf.register_new_resolver("ess_run_dir", run_dir_resolver, replace=True)
    OmegaConf.register_new_resolver("ess_output_subdir", output_subdir_resolver, replace=True)


def run_dir_resolver(resume: Any, default: str) -> str:
    """``hydra.run.dir``: the run being resumed, else ``default`` (a new timestamped directory)."""
    return str(resume) if _is_dir_value(resume) else default


def output_subdir_resolver(resume: Any, stamp: str) -> str:
    """``hydra.output_subdir``: keep the first start's ``.hydra/`` and put a resume's beside it."""
    return f".hydra/resume-{stamp}" if _is_dir_value(resume) else ".hydra"


def check_resume_argument(argv: list[str]) -> str | None:
    """The problem with a ``resume=<dir>`` command-line argument (no such directory, or not a run: no
    ``run.json``), else None.

    Checked before Hydra starts: Hydra would create that directory as the run directory and write its
    ``.hydra/`` and log file there, into a directory that is not a run.
    """
    for arg in argv:
        if arg.startswith("resume="):
            value = arg.split("=", 1)[1]
            if not _is_dir_value(value):
                continue
            if not Path(value).is_dir():
                return f"resume={value}: no such run directory"
            if not (Path(value) / RUN_FILE).is_file():
                return (
                    f"resume={value}: not an ess-train run directory (no {RUN_FILE}; runs started before "
                    "checkpoints were on by default can be continued with ckpt_path=<file.ckpt>)"
                )
    return None


def checkpoint_candidates(run_dir: str | Path) -> list[Path]:
    """Every checkpoint of a run: ``checkpoints/*.ckpt`` (last, last-v<n>, best-*) and Lightning's SLURM
    ``hpc_ckpt_*.ckpt`` (written on its SIGUSR1 auto-requeue)."""
    run_dir = Path(run_dir)
    return sorted((run_dir / CHECKPOINT_DIR).glob("*.ckpt")) + sorted(run_dir.glob("hpc_ckpt_*.ckpt"))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint a resume continues from: the newest intact one by recorded step, else None.

    Raises :class:`ess_train.app.checkpoint_files.NoIntactCheckpoint` when there are checkpoints and none is
    intact.
    """
    chosen, _ = choose_checkpoint(checkpoint_candidates(run_dir))
    return None if chosen is None else chosen.path


def target_dir(cfg: DictConfig) -> Path | None:
    """The directory this start works in: the run named by ``resume=<dir>`` (None when that does not
    exist: :func:`plan_resume` refuses it), else ``output_dir``."""
    resume = cfg.get("resume")
    if _is_dir_value(resume):
        return Path(str(resume)) if Path(str(resume)).is_dir() else None
    return Path(str(cfg.output_dir))


@dataclass
class ResumePlan:
    """What the app does about an earlier start of this run."""

    config: DictConfig  #: the config to run (the saved one, with this start's overrides applied)
    checkpoint: Path | None  #: checkpoint to continue from (None: a fresh run)
    logger_version: str | int | None  #: the logger's run id/version to continue (W&B id, CSV/TB version)
    run_dir: Path  #: where everything goes
    checkpoint_step: int | None = None  #: the step the checkpoint holds
    skipped: tuple[str, ...] = ()  #: newer checkpoints skipped (failed their checksum or did not load), why

    @property
    def resuming(self) -> bool:
        return self.checkpoint is not None


def _override_keys(overrides: list[str]) -> list[str]:
    """Config keys set by command-line overrides (``+a.b=1`` -> ``a.b``; ``model=gla`` -> ``model``)."""
    keys = []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        key = key.split("@", 1)[0]  # group@package
        if key in ("resume",) or key.startswith("hydra"):
            continue
        keys.append(key)
    return keys


#: what a resumed start may not change: the checkpoint holds the model it trained, and the data it saw
#: follow from the task and the seed (a new start in a new directory can change them)
FIXED_ON_RESUME = ("model", "task", "seed")


def _refuse_fixed(keys: list[str], resume: Any) -> None:
    fixed = [k for k in keys if k.split(".", 1)[0] in FIXED_ON_RESUME]
    if fixed:
        raise ValueError(
            f"resume={resume}: {', '.join(fixed)} cannot change when a run continues (its checkpoint holds "
            "the model it trained and the data order it saw); start a new run instead (resume=null, "
            "another directory). What may change: trainer.*, optim.*, callbacks.*, logger.*, checkpoint.*"
        )


def plan_resume(cfg: DictConfig, overrides: list[str]) -> ResumePlan:
    """Decide, from ``cfg.resume`` and the run directory, whether this start continues an earlier one.

    Raises ``ValueError`` naming the problem when ``resume`` names a directory that is not a resumable run.
    """
    resume = cfg.get("resume")
    run_dir = Path(str(cfg.output_dir))
    if resume in _NO_RESUME:
        return ResumePlan(cfg, None, None, run_dir)
    if _is_dir_value(resume):
        run_dir = Path(str(resume))
        if not run_dir.is_dir():
            raise ValueError(f"resume={resume}: no such run directory")
        if not (run_dir / RUN_FILE).is_file():
            raise ValueError(
                f"resume={resume}: not an ess-train run directory (no {RUN_FILE}; runs started before "
                "checkpoints were on by default can be continued with ckpt_path=<file.ckpt>)"
            )
    try:
        chosen, skipped = choose_checkpoint(checkpoint_candidates(run_dir))
    except NoIntactCheckpoint as err:
        raise ValueError(
            f"{run_dir}: {err}; nothing to resume from (start afresh elsewhere, or with resume=null)"
        ) from err
    checkpoint = None if chosen is None else chosen.path
    if checkpoint is None:
        if _is_dir_value(resume):
            raise ValueError(
                f"resume={resume}: the run left no checkpoint ({CHECKPOINT_DIR}/{LAST_CHECKPOINT}); it "
                "stopped "
                "before its first validation and was not stopped by a signal"
            )
        return ResumePlan(cfg, None, None, run_dir)
    saved = json.loads((run_dir / RUN_FILE).read_text()) if (run_dir / RUN_FILE).is_file() else {}
    config = (
        OmegaConf.create(saved["config"])
        if "config" in saved
        else OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    )
    first_dir = str(config.get("output_dir") or "")  # before overrides: an output_dir= one must not hide it
    # this start's command-line overrides win over the saved values (e.g. trainer.max_steps=4000, optim.lr:
    # SequenceLM.on_load_checkpoint puts the new values into the optimizer state the checkpoint restores),
    # except for what the checkpoint fixes
    keys = _override_keys(overrides)
    if "config" in saved:
        _refuse_fixed([k for k in keys if _changes(saved["config"], cfg, k)], resume)
    for key in keys:
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        OmegaConf.update(config, key, value, merge=False, force_add=True)
    _rebase(config, first_dir, str(run_dir))
    config.output_dir = str(run_dir)
    config.resume = str(resume)
    config.ckpt_path = str(checkpoint)
    step = None if chosen is None else chosen.step
    return ResumePlan(config, checkpoint, saved.get("logger_version"), run_dir, step, tuple(skipped))


def _changes(saved: dict[str, Any], cfg: DictConfig, key: str) -> bool:
    """Whether the override of ``key`` gives another value than the run was started with."""
    node: Any = saved
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return True
        node = node[part]
    value = OmegaConf.select(cfg, key, throw_on_missing=False)
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return value != node


def _rebase(node: Any, old: str, new: str) -> None:
    """Point every path under the first start's run directory ``old`` at ``new`` (a moved or copied run)."""
    if not old or old == new:
        return
    for key in list(node.keys()):
        value = node[key]
        if OmegaConf.is_dict(value):
            _rebase(value, old, new)
        elif isinstance(value, str) and (value == old or value.startswith(old.rstrip("/") + "/")):
            node[key] = new + value[len(old) :]


def save_run_file(run_dir: Path, config: DictConfig, logger_version: str | int | None) -> Path:
    """Write ``run.json`` at a run's first start: its resolved config and the logger's run id/version."""
    path = run_dir / RUN_FILE
    if path.is_file():  # a resumed start keeps the first start's record
        return path
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(
        OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]), resolve=True
    )
    path.write_text(json.dumps({"config": resolved, "logger_version": logger_version}, indent=2, default=str))
    return path
