"""plan_resume: when a start continues an earlier one, from which checkpoint, with which config and run id."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ess_train.rundir import check_resume_argument, latest_checkpoint, plan_resume, save_run_file


def _cfg(output_dir: Path, resume="auto", **extra):
    return OmegaConf.create(
        {
            "seed": 0,
            "output_dir": str(output_dir),
            "resume": resume,
            "ckpt_path": None,
            "trainer": {"max_steps": 20, "default_root_dir": str(output_dir)},
            "checkpoint": {"dirpath": f"{output_dir}/checkpoints"},
            **extra,
        }
    )


def _started_run(run_dir: Path, version: str = "abc123") -> None:
    save_run_file(run_dir, _cfg(run_dir), version)
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")


def test_fresh_run_and_resume_null(tmp_path):
    plan = plan_resume(_cfg(tmp_path / "new"), [])
    assert not plan.resuming and plan.checkpoint is None
    _started_run(tmp_path / "old")
    plan = plan_resume(_cfg(tmp_path / "old", resume=None), [])
    assert not plan.resuming  # null: always afresh, even over a checkpoint


def test_auto_continues_a_run_directory_that_holds_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    _started_run(run)
    plan = plan_resume(_cfg(run), [])
    assert plan.resuming and plan.checkpoint == run / "checkpoints" / "last.ckpt"
    assert plan.logger_version == "abc123"
    assert plan.config.ckpt_path == str(plan.checkpoint)


def test_resume_dir_uses_the_saved_config_with_new_overrides_and_a_moved_directory(tmp_path):
    first = tmp_path / "cluster" / "run"
    _started_run(first)
    moved = tmp_path / "laptop" / "run"
    moved.parent.mkdir()
    first.rename(moved)
    current = _cfg(tmp_path / "ignored", resume=str(moved))
    current.trainer.max_steps = 40
    current.seed = 7  # not overridden on this command line: the saved value stays
    plan = plan_resume(current, ["resume=" + str(moved), "trainer.max_steps=40", "hydra.run.dir=x"])
    assert plan.run_dir == moved and plan.resuming
    assert plan.config.trainer.max_steps == 40 and plan.config.seed == 0
    assert plan.config.output_dir == str(moved)
    assert plan.config.checkpoint.dirpath == f"{moved}/checkpoints"  # rebased from the first directory
    assert plan.config.trainer.default_root_dir == str(moved)


def test_the_newest_of_last_and_lightning_hpc_checkpoint_wins(tmp_path):
    run = tmp_path / "run"
    _started_run(run)
    hpc = run / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"y")
    old = time.time() - 100
    os.utime(run / "checkpoints" / "last.ckpt", (old, old))
    assert latest_checkpoint(run) == hpc


def test_errors_name_the_problem(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not an ess-train run directory"):
        plan_resume(_cfg(tmp_path / "x", resume=str(tmp_path / "plain")), [])
    save_run_file(tmp_path / "early", _cfg(tmp_path / "early"), None)
    with pytest.raises(ValueError, match="left no checkpoint"):
        plan_resume(_cfg(tmp_path / "x", resume=str(tmp_path / "early")), [])
    assert (
        check_resume_argument([f"resume={tmp_path}/missing"])
        == f"resume={tmp_path}/missing: no such run directory"
    )
    assert check_resume_argument(["resume=auto", "resume=null", f"resume={tmp_path}"]) is None


def test_run_file_keeps_the_first_start(tmp_path):
    save_run_file(tmp_path, _cfg(tmp_path), "first")
    save_run_file(tmp_path, _cfg(tmp_path), "second")
    assert json.loads((tmp_path / "run.json").read_text())["logger_version"] == "first"
