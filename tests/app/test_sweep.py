"""The sweep table (ess_train.app.sweep_summary, sweep_callback): synthetic sweep directories, the CLI, and
real tiny multiruns."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from ess_train.app.sweep_callback import SweepSummary
from ess_train.app.sweep_summary import (
    BASIC_SWEEPER,
    CSV_NAME,
    ERROR_NAME,
    MD_NAME,
    format_markdown,
    main,
    summarize_sweep,
    write_sweep_summary,
)
from tests.app.test_app import TINY as APP_TINY

ROOT = Path(__file__).resolve().parents[2]
# the tiny MQAR run of test_app.py (seconds on a CPU), shorter, without logger and plots
TINY = [*APP_TINY, "trainer.max_steps=4", "trainer.val_check_interval=2", "logger=none", "save_plots=false"]


def _layer(ent: float, util: float) -> dict[str, Any]:
    return {"avg_entropy": ent, "max_entropy": ent + 1, "utilization": util, "tss": 32, "flags": []}


def _job(sweep: Path, num: int, overrides: list[str], summary: dict[str, Any] | None = None) -> Path:
    job_dir = sweep / str(num)
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    (job_dir / ".hydra" / "hydra.yaml").write_text(OmegaConf.to_yaml({"hydra": {"job": {"num": num}}}))
    if summary is not None:
        full = {"output_dir": str(job_dir), "overrides": overrides, **summary}
        (job_dir / "summary.json").write_text(json.dumps(full))
    return job_dir


@pytest.fixture
def synthetic_sweep(tmp_path: Path) -> Path:
    """Six jobs of `seed=0,1,2,3,4,5 trainer.max_steps=4`: ok, ok (other layers), incomplete, failed,
    unreadable, and one that never started."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    OmegaConf.save(
        {
            "hydra": {
                "sweeper": {"_target_": BASIC_SWEEPER, "max_batch_size": None, "params": None},
                "overrides": {"task": ["seed=range(6)", "trainer.max_steps=4"]},
            }
        },
        sweep / "multirun.yaml",
    )
    (sweep / ".submitit" / "123").mkdir(parents=True)  # not a job
    ov = [[f"seed={i}", "trainer.max_steps=4"] for i in range(6)]
    _job(
        sweep,
        0,
        ov[0],
        {
            "val_acc": 0.5,
            "val_acc_per_slice": {},
            "steps": 4,
            "ess": {
                "layers": {
                    "model.blocks.0.mixer": _layer(2.0, 0.8),
                    "model.blocks.1.mixer": _layer(3.0, 0.9),
                }
            },
        },
    )
    _job(
        sweep,
        1,
        ov[1],
        {  # more layers, validation slices, a key the table does not know, no plots
            "val_acc": 0.75,
            "val_acc_per_slice": {"kv2": 1.0, "kv4": 0.5},
            "steps": 4,
            "checkpoint": "/somewhere/last.ckpt",
            "ess": {
                "step": 4,
                "layers": {
                    "model.blocks.10.mixer": _layer(7.0, 0.1),
                    "model.blocks.2.mixer": _layer(5.0, 0.3),
                    "model.blocks.0.mixer": _layer(4.0, 0.6),
                },
            },
        },
    )
    _job(sweep, 2, ov[2])  # started, no summary
    failed = _job(sweep, 3, ov[3])
    (failed / ERROR_NAME).write_text("RuntimeError: out of luck\n\nTraceback ...\n")
    (_job(sweep, 4, ov[4]) / "summary.json").write_text("{not json")
    return sweep


def test_summarize_synthetic_sweep(synthetic_sweep: Path) -> None:
    rows = summarize_sweep(synthetic_sweep)
    assert [r["job"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r["status"] for r in rows] == ["ok", "ok", "incomplete", "failed", "failed", "missing"]
    assert len({tuple(r) for r in rows}) == 1  # the same keys, in the same order
    layers = ["blocks.0.mixer", "blocks.1.mixer", "blocks.2.mixer", "blocks.10.mixer"]
    assert list(rows[0]) == [
        "job",
        "status",
        "overrides",
        "seed",  # varies; trainer.max_steps=4 does not
        "val_acc",
        "val_acc[kv2]",
        "val_acc[kv4]",
        "steps",
        *(f"ess[{n}]" for n in layers),
        *(f"util[{n}]" for n in layers),
        "run_dir",
        "error",
    ]
    r0, r1, r2, r3, r4, r5 = rows
    assert r0["overrides"] == ["seed=0", "trainer.max_steps=4"] and r0["seed"] == "0"
    assert r0["val_acc"] == 0.5 and r0["steps"] == 4 and r0["val_acc[kv2]"] is None
    assert (r0["ess[blocks.0.mixer]"], r0["util[blocks.1.mixer]"], r0["ess[blocks.10.mixer]"]) == (
        2.0,
        0.9,
        None,
    )
    assert (r1["ess[blocks.10.mixer]"], r1["util[blocks.2.mixer]"], r1["ess[blocks.1.mixer]"]) == (
        7.0,
        0.3,
        None,
    )
    assert r1["val_acc[kv4]"] == 0.5 and r1["run_dir"] == str(synthetic_sweep / "1") and r1["error"] == ""
    assert r2["val_acc"] is None and r2["seed"] == "2" and "no summary.json" in r2["error"]
    assert r3["error"] == "RuntimeError: out of luck"
    assert "unreadable summary.json" in r4["error"]
    assert r5["overrides"] == ["seed=5", "trainer.max_steps=4"] and r5["run_dir"] == ""


def test_write_sweep_summary_csv_md_and_cli(synthetic_sweep: Path, capsys: pytest.CaptureFixture) -> None:
    result = write_sweep_summary(synthetic_sweep)
    assert result["csv"] == synthetic_sweep / CSV_NAME and result["md"] == synthetic_sweep / MD_NAME
    with open(result["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6
    assert table[1]["overrides"] == "seed=1 trainer.max_steps=4"
    assert float(table[1]["val_acc"]) == 0.75 and table[1]["ess[blocks.2.mixer]"] == "5.0"
    assert table[5]["status"] == "missing" and table[5]["val_acc"] == ""

    md = result["md"].read_text()
    assert md == result["markdown"]
    assert "6 jobs: 2 ok, 1 incomplete, 2 failed, 1 missing" in md
    assert "common overrides: `trainer.max_steps=4`" in md
    assert "best val_acc: 0.750 (job 1: seed=1)" in md
    header = next(line for line in md.splitlines() if line.startswith("| job"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells[:4] == ["job", "status", "seed", "val_acc"]  # the varying override replaces `overrides`
    assert "ess[blocks.10.mixer]" in cells and cells[-2:] == ["run_dir", "error"]
    row1 = next(line for line in md.splitlines() if line.startswith("| 1 "))
    assert "0.750" in row1 and " 7.00 |" in row1 and " 0.300 |" in row1
    assert not list(synthetic_sweep.glob(".*.tmp"))  # the atomic writes cleaned up

    result["csv"].unlink()
    assert main([str(synthetic_sweep)]) == 0
    out = capsys.readouterr().out
    assert "| job" in out and "RuntimeError: out of luck" in out
    assert (synthetic_sweep / CSV_NAME).is_file()
    assert main([str(synthetic_sweep / "nope")]) == 2


def test_sweep_without_multirun_yaml_lists_what_is_on_disk(tmp_path: Path) -> None:
    """Another sweeper (no job list): the job directories found, numbered by their name."""
    for num, acc in ((1, 0.25), (0, math.nan)):
        (tmp_path / str(num)).mkdir()
        summary = {"val_acc": acc, "overrides": [f"model={'gla' if num else 'mamba'}"], "steps": 2}
        (tmp_path / str(num) / "summary.json").write_text(json.dumps(summary))
    rows = summarize_sweep(tmp_path)
    assert [(r["job"], r["model"], r["status"]) for r in rows] == [(0, "mamba", "ok"), (1, "gla", "ok")]
    assert math.isnan(rows[0]["val_acc"]) and rows[0]["run_dir"] == str(tmp_path / "0")
    assert [k for k in rows[0] if k.startswith(("ess[", "util["))] == []
    md = format_markdown(rows, tmp_path)
    assert " nan |" in md and "best val_acc" not in md  # one scored job: nothing to compare
    assert summarize_sweep(tmp_path / "empty") == []


def test_layer_names_stay_full_when_shortening_would_collide(tmp_path: Path) -> None:
    (tmp_path / "0").mkdir()
    layers = {"model.mixer": _layer(1.0, 0.5), "mixer": _layer(2.0, 0.25)}
    (tmp_path / "0" / "summary.json").write_text(json.dumps({"val_acc": 0.1, "ess": {"layers": layers}}))
    (row,) = summarize_sweep(tmp_path)
    assert row["ess[model.mixer]"] == 1.0 and row["util[mixer]"] == 0.25


def test_callback_leaves_single_runs_alone(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"hydra": {"mode": "RUN", "sweep": {"dir": str(tmp_path / "sweep")}}})
    SweepSummary().on_job_end(cfg, job_return=None)
    assert not (tmp_path / "sweep").exists()


def _run_app(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "ess_train", "-m", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_real_multirun_writes_and_prints_the_table(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = _run_app([*TINY, "seed=0,1", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _csv_rows(sweep / CSV_NAME)
    assert [(r["job"], r["status"], r["seed"]) for r in rows] == [("0", "ok", "0"), ("1", "ok", "1")]
    for row in rows:
        summary = json.loads((sweep / row["job"] / "summary.json").read_text())
        assert row["overrides"].split(" ") == summary["overrides"]
        assert f"seed={row['job']}" in summary["overrides"]
        assert float(row["val_acc"]) == pytest.approx(summary["val_acc"])
        assert int(row["steps"]) == summary["steps"] == 4
        assert row["run_dir"] == str(sweep / row["job"])
        for name, stats in summary["ess"]["layers"].items():
            short = name.removeprefix("model.")
            assert float(row[f"ess[{short}]"]) == pytest.approx(stats["avg_entropy"])
            assert float(row[f"util[{short}]"]) == pytest.approx(stats["utilization"])
    assert {"ess[blocks.0.mixer]", "util[blocks.1.mixer]"} <= set(rows[0])
    assert proc.stdout.count(f"## Sweep {sweep}") == 1  # printed once, at the end
    assert (sweep / MD_NAME).read_text() in proc.stdout


@pytest.mark.slow
def test_real_multirun_with_a_failed_job_still_gets_its_table(tmp_path: Path) -> None:
    """Hydra skips on_multirun_end when a job failed: the table comes from on_job_end."""
    sweep = tmp_path / "sweep"
    proc = _run_app([*TINY, "ckpt_path=/nonexistent/x.ckpt,null", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode != 0
    rows = _csv_rows(sweep / CSV_NAME)
    assert [(r["status"], r["ckpt_path"]) for r in rows] == [
        ("failed", "/nonexistent/x.ckpt"),
        ("ok", "null"),
    ]
    assert "FileNotFoundError" in rows[0]["error"] and rows[0]["val_acc"] == ""
    assert (sweep / "0" / ERROR_NAME).is_file() and (sweep / "1" / "summary.json").is_file()
    assert proc.stdout.count(f"## Sweep {sweep}") == 1  # printed once, after the last job
    assert "2 jobs: 1 failed, 1 ok" in proc.stdout


@pytest.mark.slow
def test_a_sweep_point_with_a_config_error_fails_alone(tmp_path: Path) -> None:
    """Issue 25, finding 5: an unknown mixer in one point aborted the whole sweep (sys.exit inside the job)
    and the table called that job "not started". Now it is failed with its one-line message, the other
    point runs, and the sweep exits non-zero."""
    sweep = tmp_path / "sweep"
    proc = _run_app([*TINY, "model.mixer=glaa,gla", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode != 0
    rows = _csv_rows(sweep / CSV_NAME)
    assert [(r["status"], r["model.mixer"]) for r in rows] == [("failed", "glaa"), ("ok", "gla")]
    assert rows[0]["error"].startswith("ConfigError: model: unknown mixer 'glaa'")
    assert "\n" not in rows[0]["error"] and float(rows[1]["val_acc"]) >= 0
    assert "ess-train: configuration error: model: unknown mixer 'glaa'" in proc.stderr
