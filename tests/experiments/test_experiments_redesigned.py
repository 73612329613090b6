"""Smoke tests of the redesigned studies 1-5 (experiments/matched_tss, distill_ess, regularizers,
init_dose) and of their statistics (experiments/stats.py): each runs its grid's smoke variant, and plot.py
writes its table, figure and summary from the CSVs."""

from __future__ import annotations

import json
import math

import pytest

from experiments.common import read_rows


def test_matched_tss_sizes_are_matched_across_families():
    from experiments.matched_tss import run

    points = run.points()
    assert (
        len(points) == len(run.FAMILIES) * len(run.KEY_DIMS) * len(run.KV_PAIRS) * 2 + len(run.KV_PAIRS) * 2
    )
    # every family gets d_k = TSS / 64 at 4 heads and d_v 16 (linear attention through feature_dim)
    assert run.family_kwargs("gla", 512) == "{num_heads:4,expand_k:0.5,expand_v:1.0}"
    assert run.family_kwargs("linear_attention", 2048) == "{num_heads:4,feature_dim:32}"


@pytest.mark.slow
def test_matched_tss_and_distillation_smoke(tmp_path):
    from experiments.distill_ess import plot as distill_plot
    from experiments.distill_ess import run as distill_run
    from experiments.matched_tss import plot, run

    csv_path = run.main(["--smoke", "--out", str(tmp_path)])
    rows = read_rows(csv_path)
    assert [r["run_id"] for r in rows] == ["gla_tss2048_kv8_s0", "attention_kv8_s0"]
    assert int(rows[0]["ess/blocks.1.mixer/tss"]) == 2048
    assert (tmp_path / "runs_smoke_curves.csv").stat().st_size > 0
    plot.main(["--results", str(tmp_path), "--csv", csv_path.name])
    assert "| GLA | 2048 | 8 | 1 |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "ess_vs_acc.png").stat().st_size > 0 and (tmp_path / "utilization.png").exists()

    # study 5 distils the smoke teacher (its checkpoint was kept) into a student
    students = distill_run.main(["--smoke", "--teachers", str(tmp_path / "runs"), "--out", str(tmp_path)])
    (row,) = read_rows(students)
    assert not row.get("error"), row
    assert 0.0 <= float(row["agreement"]) <= 1.0 and float(row["kl"]) >= 0.0
    assert float(row["teacher_ess_per_op"]) > 0 and int(row["d_k"]) == 2
    distill_plot.main(["--results", str(tmp_path), "--csv", students.name])
    assert (tmp_path / "distill.png").stat().st_size > 0


@pytest.mark.slow
def test_regularizers_smoke(tmp_path):
    from experiments.regularizers import plot, run

    csv_path = run.main(["--smoke", "--out", str(tmp_path)])
    assert [r["run_id"] for r in read_rows(csv_path)] == ["none_s0", "floor_s0"]
    summary = plot.main(["--results", str(tmp_path), "--csv", csv_path.name])
    assert summary["floor"]["seeds"] == [0] and len(summary["floor"]["diff"]) == 3
    assert (tmp_path / "regularizers.png").stat().st_size > 0


@pytest.mark.slow
def test_init_dose_smoke(tmp_path):
    from experiments.init_dose import plot, run

    paths = run.main(["--smoke", "--out", str(tmp_path)])
    assert [p.name for p in paths] == ["init_smoke.csv", "bound_smoke.csv", "dose_smoke.csv"]
    for path in paths[1:]:
        assert all(not r.get("error") for r in read_rows(path)), read_rows(path)
    plot.main(["--results", str(tmp_path), "--smoke"])
    table = (tmp_path / "table.md").read_text()
    assert "At initialization" in table and "Dose" in table
    assert json.loads((tmp_path / "summary.json").read_text())
    assert (tmp_path / "init_dose.png").stat().st_size > 0


def test_statistics():
    from experiments.stats import (
        cluster_bootstrap,
        paired_difference,
        partial_spearman,
        sign_flip_p,
        spearman_p,
    )

    assert sign_flip_p([1.0] * 6) == pytest.approx(2 / 64)  # only the all-plus and all-minus patterns
    assert sign_flip_p([1.0, -1.0]) == 1.0
    assert spearman_p([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]) == pytest.approx(2 / 120)
    # y = x + z exactly: given z, x still explains y; a y unrelated to x given z has partial rho near 0
    x, z = [1, 5, 2, 8, 3, 7, 4, 6], [3, 1, 4, 1, 5, 9, 2, 6]
    assert partial_spearman([a + b for a, b in zip(x, z)], x, z) > 0.5
    assert math.isnan(partial_spearman([1, 2, 3], [1, 2, 3], [1, 2, 3]))
    est, low, high = paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert est == 2.0 and 1.0 <= low <= est <= high <= 3.0
    rows = [{"c": i // 2, "v": float(i)} for i in range(10)]
    est, low, high = cluster_bootstrap(lambda rs: sum(r["v"] for r in rs) / len(rs), rows, lambda r: r["c"])
    assert est == 4.5 and low < est < high


def test_results_md_is_what_the_committed_results_give():
    """RESULTS.md's verdict table and included study tables are exactly what ``experiments/verdicts.py``
    writes from the committed ``summary.json`` / ``table.md`` files (no number edited by hand)."""
    from experiments import verdicts

    text = verdicts.RESULTS_MD.read_text()
    assert verdicts.render(text, verdicts.table(verdicts.load())) == text, (
        "RESULTS.md is out of date: run `PYTHONPATH=. python experiments/verdicts.py --write`"
    )
