"""A run stopped by SIGTERM or Ctrl-C mid-way saves a checkpoint, its summary and plots, and exits; resuming
it gives the weights, metrics and ESS history of an uninterrupted run, in one W&B run.

The runs are in-process app runs (``train`` on the composed config, the signal sent to this process, as
``kill`` would); what a separate process adds (the exit status, the printed "continue with" line) is checked
once, in the last test, and the bit-for-bit checks hold within one process as across processes."""

from __future__ import annotations

import csv
import json
import math
import signal
import sys
from pathlib import Path

import pytest
import torch

from ess_train.app.interrupt import SIGTERMException
from ess_train.app.training import format_summary, train
from tests.app.test_app import TINY, _compose, _run_app
from tests.wandb_offline import find_run_files, history

pytestmark = pytest.mark.slow  # starts processes or trains (the fast lane: -m 'not slow')

# 12 steps, validation every 4, ESS every 2, all logged at every step
RUN = [*TINY, "trainer.max_steps=12", "trainer.val_check_interval=4", "callbacks.monitor.every_n_steps=2"]
STOP_AT = 6  # between validations (at 4 and 8), so the resumed run must rebuild the step-6..8 stretch exactly


def _checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def _assert_identical(a, b, where: str) -> None:
    """``a == b`` all the way down: tensors bit for bit (NaN where NaN), dicts by key, lists by item."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=where)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def _monitor_state(ckpt: dict) -> dict:
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("ESSMonitor")]
    return state


def _rows_by_step(run_dir: Path) -> dict[int, dict]:
    """Every logged scalar of every offline W&B run file under run_dir, by trainer step (Lightning's
    ``trainer/global_step``; W&B's own ``_step`` counts calls and restarts in a resumed offline run)."""
    out: dict[int, dict] = {}
    for f in sorted(find_run_files(run_dir)):
        for row in history(f):
            step = row.get("trainer/global_step")
            if step is None:
                continue
            scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not k.startswith("_")}
            scalars.pop("_runtime", None)
            out.setdefault(int(step), {}).update(scalars)
    return out


def _train(*overrides: str) -> dict:
    return train(_compose([*overrides]))


def _interrupted(run_dir: Path, signum: int, *extra: str) -> SIGTERMException:
    killer = [
        "+callbacks.killer._target_=tests.signal_at.SignalAt",
        f"+callbacks.killer.step={STOP_AT}",
        f"+callbacks.killer.signum={int(signum)}",
    ]
    with pytest.raises(SIGTERMException) as caught:
        _train(*RUN, *extra, *killer, f"output_dir={run_dir}")
    return caught.value


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("full") / "run"
    _train(*RUN, f"output_dir={run_dir}")
    return run_dir


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupt_then_resume_matches_an_uninterrupted_run(tmp_path, uninterrupted, signum, status):
    run_dir = tmp_path / "run"
    assert _interrupted(run_dir, signum).code == status
    stopped = json.loads((run_dir / "summary.json").read_text())
    assert stopped["interrupted"] == signal.Signals(signum).name
    assert stopped["steps"] == STOP_AT
    assert Path(stopped["checkpoint"]) == run_dir / "checkpoints" / "last.ckpt"
    assert _checkpoint(run_dir)["global_step"] == STOP_AT
    assert {Path(p).name for p in stopped["plots"]} >= {"utilization.png"}
    assert f"resume={run_dir}" in format_summary(stopped)

    _train(f"resume={run_dir}")
    resumed = json.loads((run_dir / "summary.json").read_text())
    full = json.loads((uninterrupted / "summary.json").read_text())
    assert resumed["steps"] == full["steps"] == 12
    assert resumed["resumed_from"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert resumed["val_acc"] == full["val_acc"]
    assert resumed["ess"]["layers"] == full["ess"]["layers"]

    # the same weights (bit for bit: the same computation on the same machine)
    a, b = _checkpoint(uninterrupted), _checkpoint(run_dir)
    assert a["global_step"] == b["global_step"] == 12
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b["state_dict"][key]), key
        else:
            assert value == b["state_dict"][key], key
    assert a["optimizer_states"][0]["state"].keys() == b["optimizer_states"][0]["state"].keys()
    for key, value in a["optimizer_states"][0]["state"].items():
        assert torch.equal(value["exp_avg_sq"], b["optimizer_states"][0]["state"][key]["exp_avg_sq"]), key
    # the same ESS history, step by step
    ha, hb = _monitor_state(a), _monitor_state(b)
    assert ha["totals"]["steps"] == hb["totals"]["steps"] == [0, 2, 4, 6, 8, 10, 12]
    assert ha["history"] and ha["scalars"] and ha["profiles"]
    _assert_identical(ha, hb, "monitor state")

    # one W&B run (the same id in both offline run directories) with the metrics of the uninterrupted run
    ids = {f.parent.name.rsplit("-", 1)[-1] for f in find_run_files(run_dir)}
    assert len(find_run_files(run_dir)) == 2 and len(ids) == 1
    # W&B's own step axis is the trainer's: the resumed segment continues it (it used to restart at 0)
    segments = [
        [r["_step"] for r in history(f) if "trainer/global_step" in r] for f in find_run_files(run_dir)
    ]
    assert all(
        r["_step"] == r["trainer/global_step"]
        for f in find_run_files(run_dir)
        for r in history(f)
        if "trainer/global_step" in r
    )
    first, second = sorted(segments, key=min)
    assert max(first) < STOP_AT <= min(second) + 1
    rows_full, rows = _rows_by_step(uninterrupted), _rows_by_step(run_dir)
    assert sorted(rows) == sorted(rows_full)
    for step, row in rows_full.items():
        for key, value in row.items():
            if key.startswith(("ess/", "train/", "val/", "tss/")):
                got = rows[step].get(key)
                assert got is not None and (got == value or (math.isnan(got) and math.isnan(value))), (
                    step,
                    key,
                )


def test_resume_of_a_directory_that_is_not_a_run_is_refused_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """Issue 25, finding 10: the refusal used to come after Hydra had written .hydra/ and ess_train.log into
    the directory; it comes before Hydra starts now."""
    from ess_train.app.main import main

    not_a_run = tmp_path / "papers"
    not_a_run.mkdir()
    (not_a_run / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ess-train", f"resume={not_a_run}", "optim.lr=0.1"])
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "not an ess-train run directory" in err and "Traceback" not in err
    assert sorted(p.name for p in not_a_run.iterdir()) == ["notes.txt"]  # nothing written
    assert not (tmp_path / "outputs").exists()


def test_a_resumed_csv_run_continues_its_metrics_file(tmp_path):
    """logger=csv: the resumed start writes into the same version directory and keeps the earlier rows."""
    run_dir = tmp_path / "run"
    assert _interrupted(run_dir, signal.SIGTERM, "logger=csv").code == 143
    _train(f"resume={run_dir}")
    (metrics,) = list((run_dir / "csv").glob("*/metrics.csv"))
    assert metrics.parent.name == "version_0"
    rows = list(csv.DictReader(metrics.open(newline="")))
    steps = sorted({int(r["step"]) for r in rows if r.get("train/loss")})
    assert steps == list(range(12))  # every step's loss, before and after the interruption
    ess_steps = [int(r["step"]) for r in rows if r.get("ess/total")]
    assert ess_steps == [0, 1, 3, 5, 7, 9, 11]  # optimizer steps 0, 2, ..., 12, once each


def test_a_signal_stops_the_process_with_its_status_and_the_continue_line(tmp_path):
    """As a process: SIGTERM mid-run exits 143 and prints how to continue (the resume itself is above)."""
    run_dir = tmp_path / "run"
    killer = ["+callbacks.killer._target_=tests.signal_at.SignalAt", f"+callbacks.killer.step={STOP_AT}"]
    proc = _run_app([*RUN, "logger=csv", *killer, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert f"resume={run_dir}" in proc.stdout
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STOP_AT
