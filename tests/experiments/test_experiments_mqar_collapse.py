"""Smoke tests of studies 1 (experiments/mqar_ess) and 2 (experiments/collapse): each study's ``--smoke``
variant (same code path as the full grid, a few steps) into a temporary directory, then its plot script."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from experiments.collapse import plot as collapse_plot
from experiments.collapse import run as collapse_run
from experiments.mqar_ess import plot as mqar_plot
from experiments.mqar_ess import run as mqar_run

pytestmark = pytest.mark.slow  # starts processes or trains (the fast lane: -m 'not slow')


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_experiment_configs_compose() -> None:
    from hydra import compose, initialize_config_dir

    from ess_train.app.main import CONFIG_DIR
    from ess_train.app.validation import validate_config

    for name, overrides in (
        ("mqar_ess", next(iter(mqar_run.points().values()))),
        ("collapse", next(iter(collapse_run.points().values()))),
        ("collapse_hybrid", collapse_run.points(hybrid=True)["gla_floor_s0"]),
    ):
        assert f"experiment={name}" in overrides
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, "output_dir=/tmp/unused"])
        validate_config(cfg)
    assert len(mqar_run.points()) == 90
    assert len(collapse_run.points()) == len(collapse_run.points(hybrid=True)) == 12


@pytest.mark.filterwarnings("ignore")
def test_mqar_ess_smoke(tmp_path: Path) -> None:
    csv_path = mqar_run.main(["--smoke", "--out", str(tmp_path)])
    rows = _rows(csv_path)
    assert len(rows) == len(mqar_run.points(smoke=True))
    assert all(not r.get("error") and r["val_acc"] and r["ess_per_kv"] for r in rows)
    assert any(k.endswith("/tss") for k in rows[0])
    for png in mqar_plot.main(["--csv", str(csv_path)]):
        assert png.exists() and png.stat().st_size > 0
    assert (tmp_path / "mqar_ess_tables.md").exists()


@pytest.mark.filterwarnings("ignore")
def test_collapse_smoke(tmp_path: Path) -> None:
    csv_path = collapse_run.main(["--smoke", "--out", str(tmp_path)])
    rows = _rows(csv_path)
    assert len(rows) == len(collapse_run.points(smoke=True))
    assert all(not r.get("error") and r["val_acc"] for r in rows)
    curves = _rows(tmp_path / "collapse_smoke_curves.csv")
    metrics = {c["metric"] for c in curves}
    assert "val/acc" in metrics and any(m.endswith("/utilization") for m in metrics)
    for png in collapse_plot.main(["--csv", str(csv_path)]):
        assert png.exists() and png.stat().st_size > 0


@pytest.mark.filterwarnings("ignore")
def test_collapse_hybrid_smoke(tmp_path: Path) -> None:
    csv_path = collapse_run.main(["--smoke", "--hybrid", "--out", str(tmp_path)])
    rows = _rows(csv_path)
    assert len(rows) == 2 and all(not r.get("error") and r["val_acc"] for r in rows)
    assert all("[short_conv,gla]" in r["overrides"] for r in rows)
    for png in collapse_plot.main(["--csv", str(csv_path), "--layer", "blocks.1.mixer"]):
        assert png.exists() and png.stat().st_size > 0
    assert "layer blocks.1.mixer" in (tmp_path / "collapse_table.md").read_text()
