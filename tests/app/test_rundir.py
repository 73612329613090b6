"""plan_resume: when a start continues an earlier one, from which checkpoint, with which config and run id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ess_train.app.checkpoint_files import write_checkpoint_file
from ess_train.app.rundir import check_resume_argument, latest_checkpoint, plan_resume, save_run_file


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


def _write_checkpoint(path: Path, step: int, sidecar: bool = True) -> None:
    if sidecar:
        write_checkpoint_file(path, lambda f: torch.save({"global_step": step}, f), step=step)
    else:  # as written before sidecars
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"global_step": step}, path)


def _started_run(run_dir: Path, version: str = "abc123") -> None:
    save_run_file(run_dir, _cfg(run_dir), version)
    _write_checkpoint(run_dir / "checkpoints" / "last.ckpt", 4)


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


def test_the_newest_by_recorded_step_wins_whatever_its_name(tmp_path):
    """Lightning's hpc_ckpt, a last-v1 and a checkpoint without sidecar compete by the step they hold."""
    run = tmp_path / "run"
    _started_run(run)  # last.ckpt: step 4
    _write_checkpoint(run / "hpc_ckpt_1.ckpt", 6)
    assert latest_checkpoint(run) == run / "hpc_ckpt_1.ckpt"
    _write_checkpoint(run / "checkpoints" / "last-v1.ckpt", 8, sidecar=False)
    plan = plan_resume(_cfg(run), [])
    assert plan.checkpoint == run / "checkpoints" / "last-v1.ckpt" and plan.checkpoint_step == 8


def test_a_bad_checkpoint_is_skipped_with_its_cost_and_none_intact_is_refused(tmp_path):
    run = tmp_path / "run"
    _started_run(run)  # last.ckpt: step 4
    _write_checkpoint(run / "checkpoints" / "best-step2.ckpt", 2)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"\0" * 10)
    plan = plan_resume(_cfg(run), [])
    assert plan.checkpoint_step == 2
    (message,) = plan.skipped
    assert "last.ckpt" in message and "fails its checksum" in message and "costs 2 steps" in message
    (run / "checkpoints" / "best-step2.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="no intact checkpoint: .*last.ckpt fails its checksum.*best-step2"):
        plan_resume(_cfg(run), [])


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
    assert "not an ess-train run directory" in check_resume_argument([f"resume={tmp_path}"])
    (tmp_path / "run.json").write_text("{}")
    assert check_resume_argument(["resume=auto", "resume=null", f"resume={tmp_path}"]) is None


def test_run_file_keeps_the_first_start(tmp_path):
    save_run_file(tmp_path, _cfg(tmp_path), "first")
    save_run_file(tmp_path, _cfg(tmp_path), "second")
    assert json.loads((tmp_path / "run.json").read_text())["logger_version"] == "first"
