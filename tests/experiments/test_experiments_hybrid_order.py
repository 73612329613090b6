"""Smoke test of study 7 (experiments/hybrid_order): both layer orders run, the CSV has each mixer's ESS,
and plot.py writes its table and figure from it."""

from __future__ import annotations

import pytest

from experiments.common import read_rows


@pytest.mark.slow
def test_hybrid_order_smoke(tmp_path):
    from experiments.hybrid_order import plot, run

    csv_path = run.main(["--smoke", "--out", str(tmp_path)])
    rows = read_rows(csv_path)
    assert [r["run_id"] for r in rows] == ["gla_first_s0", "attention_first_s0"]
    assert [r["ess/blocks.0.mixer/mixer"] for r in rows] == ["GatedLinearAttention", "SoftmaxAttention"]
    assert all(float(r["ess/blocks.1.mixer/utilization"]) > 0 for r in rows)
    plot.main(["--results", str(tmp_path), "--csv", csv_path.name])
    table = (tmp_path / "table.md").read_text()
    assert "| gla_first | 1 |" in table and "SoftmaxAttention utilization" in table
    assert (tmp_path / "hybrid_order.png").stat().st_size > 0
