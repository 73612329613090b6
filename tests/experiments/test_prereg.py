"""The pre-registrations, the registered tests' computations and the verdict rule (experiments/prereg)."""

from __future__ import annotations

import math

import pytest

from experiments import verdicts
from experiments.prereg import analysis, designs, registrations
from experiments.stats import holm


def test_every_registered_test_has_one_computation_and_a_direction():
    regs = registrations.load()
    tests = registrations.family(regs)
    assert [r.design for r in regs] == sorted(r.design for r in regs)
    assert len({t.id for t in tests}) == len(tests)
    assert {t.id for t in tests} == set(analysis.TESTS)
    assert all(t.direction in (1, -1) for t in tests)


def test_a_registration_missing_a_key_is_refused(tmp_path):
    (tmp_path / "01_x.json").write_text('{"design": 1, "name": "x"}')
    with pytest.raises(ValueError, match="01_x.json: missing keys"):
        registrations.load(tmp_path)


def test_holm_adjusts_step_down_and_keeps_order():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.001, 1.0]) == pytest.approx([0.002, 1.0])


def test_the_verdict_rule():
    done = analysis.Result(estimate=0.4, p=0.001, n=10, done=10, needed=10)
    assert verdicts.verdict(done, 0.01, 1, "registered") == verdicts.HOLDS
    assert verdicts.verdict(done, 0.01, -1, "registered") == verdicts.NOT
    assert verdicts.verdict(done, 0.2, 1, "registered") == verdicts.CANNOT
    assert verdicts.verdict(analysis.Result(done=3, needed=10), 1.0, 1, "registered") == "pending (3 of 10)"
    assert verdicts.verdict(done, 0.01, 1, "blocked: no option") == "blocked"


def _design_1_rows(ess_of_acc):
    runs = {}
    for i, rid in enumerate(designs.design_1()):
        acc = (i * 7919 % 97) / 97
        runs[rid] = {
            "run_id": rid,
            "val_acc": acc,
            "ess_total": 10 + ess_of_acc(acc),
            "ess/blocks.0.mixer/tss": 192,
            "ess/blocks.1.mixer/tss": 512,
            "ess/blocks.1.mixer/avg_entropy": ess_of_acc(acc),
            "ess/blocks.1.mixer/utilization": 0.3 if "linear_attention_" not in rid[:17] else 0.9,
            "ess/blocks.1.mixer/initial_utilization": 0.6,
        }
    return analysis.Data(runs, [], {})


def test_design_1_tests_decide_on_complete_data_and_wait_on_partial():
    tracking = analysis.compute(_design_1_rows(lambda a: 1 + 5 * a))
    assert tracking["beyond_kv"].estimate == pytest.approx(1.0)
    assert tracking["beyond_kv"].p < 0.05 / 17
    assert tracking["collapse"].estimate < 0 and tracking["collapse"].p < 1e-3
    assert tracking["linear_attention_fills"].estimate > 0
    unrelated = analysis.compute(_design_1_rows(lambda a: (a * 31) % 1))
    assert abs(unrelated["beyond_kv"].estimate) < 0.5
    partial = _design_1_rows(lambda a: a)
    partial.runs.pop("gla_kv2_s0")
    res = analysis.beyond_kv(partial)
    assert res.pending and math.isnan(res.p) and (res.done, res.needed) == (71, 72)


def test_design_5_compares_students_on_both_sides_of_each_teachers_ess():
    students = {}
    for rid, (tid, _, d_k) in designs.design_5_students().items():
        ess = 40.0 if "attention_rope" in tid else 3.0  # RoPE teachers: only d_k 64 above
        students[rid] = {
            "run_id": rid,
            "d_k": d_k,
            "teacher_ess_per_op": ess,
            "agreement": 0.5 if d_k < ess else 0.9,
        }
    res = analysis.distill_below_ess(analysis.Data({}, [], {}, students))
    assert res.estimate == pytest.approx(-0.4) and res.n == 12 and res.p < 0.05 / 17
    students.pop(next(iter(students)))
    assert analysis.distill_below_ess(analysis.Data({}, [], {}, students)).pending


def test_design_6_contrasts_reused_key_accuracy_of_the_two_arms():
    runs = {rid: {"run_id": rid, "acc_reused": 0.9 if "reset" in rid else 0.6} for rid in designs.design_6()}
    res = analysis.delimiter_reset(analysis.Data(runs, [], {}))
    assert res.estimate == pytest.approx(0.3) and res.p < 0.05 / 17 and res.n == 16


def test_the_pilot_rule_places_design_2():
    rows = [
        {"run_id": f"gla_kv{kv}_s{s}", "val_acc": acc}
        for kv, acc in [(2, 0.7), (4, 0.45), (6, 0.1), (8, 0.05)]
        for s in range(4)
    ]
    assert designs.floor_kv(rows) == 4
    rows = [{**r, "val_acc": 0.9 if r["run_id"].startswith("gla_kv4") else r["val_acc"]} for r in rows]
    assert designs.floor_kv(rows) == 2  # kv 4 out of range: the kv whose pilot mean is nearest 0.45
    assert designs.floor_kv(rows[:-1]) is None


def test_the_amended_pilot_rule_picks_the_first_mamba_regime_that_learns():
    def pilot(accs):
        return [
            {"run_id": designs.mamba_id(regime, *designs.MAMBA_PILOT_DT, s), "val_acc": acc}
            for regime, acc in zip(designs.MAMBA_REGIMES, accs)
            for s in designs.MAMBA_PILOT_SEEDS
        ]

    # kv 2: guessing is 0.5, so 0.55 is not learning; kv 4 at 3,000 steps: 0.5 >= 0.25 + 0.1 is
    assert designs.mamba_regime(pilot([0.55, 0.5, 0.5])) == "steps3000"
    assert designs.mamba_regime(pilot([0.62, 0.5, 0.5])) == "kv2"
    assert designs.mamba_regime(pilot([0.55, 0.36, 0.5])) == "steps3000"
    assert designs.mamba_regime(pilot([0.95, 0.3, 0.95])) == "state2048"  # above 0.9 is no room to move
    assert designs.mamba_regime(pilot([0.5, 0.3, 0.27])) == "steps3000"  # none learns: furthest above 1/kv
    assert designs.mamba_regime(pilot([0.62, 0.5, 0.5])[1:]) is None  # a kv2 pilot run missing
    assert designs.mamba_regime(pilot([0.55, 0.36, 0.5])[:-1]) == "steps3000"  # decided without state2048
    assert designs.mamba_regime(pilot([0.55, 0.3, 0.5])[:-1]) is None
    grid = designs.design_4_mamba("kv2")
    assert len(grid) == len(designs.DT_RANGES) * len(designs.SEEDS_4)
    assert set(designs.design_4_mamba_pilot()) & set(grid) == {
        designs.mamba_id("kv2", *designs.MAMBA_PILOT_DT, s) for s in designs.MAMBA_PILOT_SEEDS
    }
    assert "task.num_kv_pairs=2" in grid[designs.mamba_id("kv2", 1e-3, 1e-1, 0)]


@pytest.mark.slow
def test_registered_designs_smoke(tmp_path):
    """Design 8 (ESS at initialization), the first two runs of designs 1 and 6: a few steps, same code."""
    from experiments.common import read_rows
    from experiments.prereg import run

    csv_path = run.main(["--design", "8", "1", "6", "--smoke", "--out", str(tmp_path)])
    rows = read_rows(csv_path)
    assert [r["run_id"] for r in rows] == [*list(designs.design_1())[:2], "delim_free_s0", "delim_reset_s0"]
    assert all(0 <= float(r["acc_reused"]) <= 1 for r in rows[2:])
    assert "+model.reset_token=-1" in rows[3]["overrides"]
    assert all(not r.get("error") and float(r["val_acc"]) >= 0 for r in rows)
    assert read_rows(tmp_path / "init.csv")


def test_every_design_figure_is_drawn_from_its_rows_and_none_from_no_rows(tmp_path):
    from experiments.prereg import plot
    from experiments.prereg.data import RESULTS, Data

    figures = [getattr(plot, f"design_{d}") for d in range(1, 9)]
    empty = Data({}, [], {})
    assert not any(fig(empty, tmp_path / "x.png") for fig in figures)
    data = Data.load(RESULTS)
    drawn = {fig.__name__ for fig in figures if fig(data, tmp_path / f"{fig.__name__}.png")}
    # every design with a committed row gets its figure
    assert {"design_1", "design_2", "design_3", "design_4", "design_6", "design_8"} <= drawn
    for name in drawn:
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_design_7_reads_the_measurement_after_the_registered_early_step():
    """The loggers file the measurement after 200 optimizer steps at step 199 (beside that batch's loss)."""
    import json

    reg = json.loads((registrations.HERE / "07_hybrid_order.json").read_text())
    assert analysis.EARLY_STEP == reg["thresholds"]["early_step"]
    runs, curves = {}, {}
    for order in ("gla_first", "attention_first"):
        for k, s in enumerate(designs.SEEDS_7):
            rid = f"{order}_s{s}"
            runs[rid] = {"run_id": rid, "val_acc": 0.1 + 0.01 * k, "ess_per_kv": 10 + k}
            curves[(rid, "ess/per_kv", analysis.EARLY_STEP - 1)] = float(k)  # rises with accuracy
            curves[(rid, "ess/per_kv", analysis.EARLY_STEP)] = float(-k)  # a later row: must not be read
    res = analysis.hybrid_early_ess(analysis.Data(runs, [], curves))
    assert res.estimate == pytest.approx(1.0) and res.n == 2 * len(designs.SEEDS_7)
    del curves[("gla_first_s4", "ess/per_kv", analysis.EARLY_STEP - 1)]
    assert "no ESS per kv at step 200" in analysis.hybrid_early_ess(analysis.Data(runs, [], curves)).evidence
