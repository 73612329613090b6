"""The follow-ups of undecided tests (experiments/prereg/followup.py): their n against the permutation tests'
simulated power, the follow-up's seeds in the designs, the runner and the analysis, and the committed plan."""

from __future__ import annotations

import json
import math
from statistics import NormalDist

import numpy as np
import pytest

from experiments.prereg import analysis, designs, followup
from experiments.stats import sign_flip_p, spearman, spearman_p, stratified_spearman_p, two_sample_p

ALPHA = 0.05 / 17
N_SIM = 200


def _power(pvalues: list[float]) -> float:
    return float(np.mean(np.asarray(pvalues) < ALPHA))


# 200 draws of a power of 0.8 have a standard error of 0.028: 0.65-0.95 is more than 5 of them wide, and
# the normal approximation is a little off at these small n (the exact tests are a little conservative)
POWER_BAND = (0.65, 0.95)


def test_the_n_for_a_mean_gives_80_percent_power_to_the_sign_flip_test():
    n = followup.needed_units({"kind": "mean", "units": [0.0, 1.2, 0.3, 1.5]}, ALPHA)  # mean 0.75, sd 0.71
    assert n > math.ceil((3.81 * 0.714 / 0.75) ** 2)  # the normal n (z 2.97 + 0.84) is too small at this n
    rng = np.random.default_rng(0)
    assert (
        POWER_BAND[0]
        <= _power([sign_flip_p(rng.normal(0.75, 0.714, n)) for _ in range(N_SIM)])
        <= POWER_BAND[1]
    )


def test_the_n_for_two_means_gives_80_percent_power_to_the_permutation_test():
    groups = [[1.0, 2.0, 3.0, 2.0], [0.0, 1.0, 2.0, 1.0]]  # difference 1, pooled sd 0.816
    n = followup.needed_units({"kind": "two_sample", "groups": groups}, ALPHA)
    assert n > math.ceil(2 * (3.81 * 0.816) ** 2)
    rng = np.random.default_rng(1)
    ps = [two_sample_p(rng.normal(1, 0.816, n), rng.normal(0, 0.816, n), n_perm=4000) for _ in range(N_SIM)]
    assert POWER_BAND[0] <= _power(ps) <= POWER_BAND[1]


def test_the_n_for_a_correlation_gives_80_percent_power_to_spearman():
    n = followup.needed_units({"kind": "correlation", "rho": 0.5, "n": 10}, ALPHA)
    rng = np.random.default_rng(2)
    draws = [rng.multivariate_normal([0, 0], [[1, 0.5], [0.5, 1]], n) for _ in range(N_SIM)]
    assert POWER_BAND[0] <= _power([spearman_p(d[:, 0], d[:, 1]) for d in draws]) <= POWER_BAND[1]


def test_the_n_for_a_stratified_trend_gives_80_percent_power_to_the_within_stratum_permutation():
    """Design 3's statistic: the mean over seeds of Spearman(dose, accuracy) over 4 doses, permuted within
    seeds."""
    rng = np.random.default_rng(3)
    doses = np.arange(4.0)

    def seeds(n):
        return doses + rng.normal(0, 2.0, (n, 4))  # accuracy rising with the dose, noisily

    units = [spearman(doses, a) for a in seeds(4000)]
    n = followup.needed_units({"kind": "stratified", "units": units, "null_sd": 3**-0.5}, ALPHA)
    u = np.asarray(units)
    z_a, z_b = NormalDist().inv_cdf(1 - ALPHA / 2), NormalDist().inv_cdf(0.8)  # 2.97, 0.84
    assert n == math.ceil(((z_a * 3**-0.5 + z_b * u.std(ddof=1)) / u.mean()) ** 2)
    ps = []
    for _ in range(N_SIM):
        acc = seeds(n)
        ps.append(stratified_spearman_p(acc.ravel(), np.tile(doses, n), np.repeat(np.arange(n), 4), 2000)[1])
    assert POWER_BAND[0] <= _power(ps) <= POWER_BAND[1]


def test_a_mean_of_within_stratum_correlations_needs_fewer_per_stratum():
    one = followup.needed_units({"kind": "correlation", "rho": 0.5, "n": 16}, ALPHA)
    two = followup.needed_units({"kind": "correlation", "rho": 0.5, "n": 16, "strata": 2}, ALPHA)
    assert two - 3 == pytest.approx((one - 3) / 2, abs=1)


def test_no_effect_or_no_rule_gives_no_n():
    assert followup.needed_units({"kind": "mean", "units": [0.5, -0.5]}, ALPHA) is None
    assert followup.needed_units({"kind": "correlation", "rho": 0.0, "n": 9}, ALPHA) is None
    assert followup.needed_units({}, ALPHA) is None


def test_a_follow_up_reads_its_own_seeds():
    seeds = list(range(followup.FIRST_SEED, followup.FIRST_SEED + 5))
    runs = {
        rid: {"run_id": rid, "acc_reused": 0.9 if "reset" in rid else 0.6} for rid in designs.design_6(seeds)
    }
    assert analysis.delimiter_reset(analysis.Data(runs, [], {})).pending  # the registered seeds are not there
    res = analysis.delimiter_reset(analysis.Data(runs, [], {}, seeds={6: seeds}))
    assert res.n == 10 and res.estimate == pytest.approx(0.3)
    assert res.extra["kind"] == "two_sample" and len(res.extra["groups"][0]) == 5


def test_only_designs_with_seeds_to_add_take_other_seeds():
    assert len(designs.points(7, seeds=[1000, 1001])) == 6
    with pytest.raises(ValueError, match="design 1's seeds are fixed"):
        designs.points(1, seeds=[1000])


def test_the_runner_parses_seed_ranges_and_refuses_fixed_designs(capsys):
    from experiments.prereg import run

    assert run.seed_range("1000-1003") == [1000, 1001, 1002, 1003]
    with pytest.raises(SystemExit):
        run.main(["--design", "1", "--seeds", "1000-1001"])
    assert "--seeds applies to designs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.main(["--design", "6", "--seeds", "ten"])
    assert "seeds are FIRST-LAST" in capsys.readouterr().err
    for bad in (["--design", "6", "--seeds", "1000-1001", "--doses", "9"], ["--design", "4", "--doses", "9"]):
        with pytest.raises(SystemExit):
            run.main(bad)
        assert "--doses N (N >= 3) goes with --design 4 and --seeds" in capsys.readouterr().err


def test_design_4s_gla_follow_up_adds_doses_on_fresh_seeds():
    assert designs.gate_doses(3) == [1.0, 16.0, 256.0]
    with pytest.raises(ValueError, match="at least 3 doses"):
        designs.gate_doses(2)
    rows = list(analysis.Data.load().runs.values())
    grid = designs.points(4, rows, seeds=[1000, 1001], doses=5)
    assert len(grid) == 10 and all(i.startswith("gla_g") and i.endswith(("_s1000", "_s1001")) for i in grid)
    assert any("gate_logit_normalizer:4}" in " ".join(ov) for ov in grid.values())
    with pytest.raises(ValueError, match="doses apply to design 4"):
        designs.points(6, seeds=[1000], doses=5)
    kv = designs.floor_kv(rows)
    runs = {}
    for g in designs.gate_doses(5):
        for s in (1000, 1001):
            rid = designs.gla_dose_id(g, kv, s)
            runs[rid] = {
                "run_id": rid,
                "val_acc": 0.1 * g**0.5,
                f"ess/{analysis.LAYER}/initial_utilization": g / 300,
            }
    data = analysis.Data({**{r["run_id"]: r for r in rows}, **runs}, [], {}, seeds={4: [1000, 1001]})
    data.gate_doses = designs.gate_doses(5)
    res = analysis.init_gla_gate(data)
    assert res.n == 5 and res.estimate == pytest.approx(1.0) and res.extra["unit"] == "dose"


def test_the_committed_plan_is_what_the_committed_results_give():
    """``followup.json`` (what followup_gpu.sh runs) is the plan of the table's undecided tests."""
    planned = [p.__dict__ for p in followup.plans(*followup._context()) if isinstance(p, followup.Plan)]
    assert json.loads(followup.PLAN_JSON.read_text()) == planned, (
        "followup.json is out of date: run `PYTHONPATH=. python experiments/prereg/followup.py --plan`"
    )
    assert all(
        p["seeds"] >= 1 and p["runs"] >= p["seeds"] and not math.isnan(p["cpu_hours"]) for p in planned
    )
    assert all(p["runs"] == p["doses"] * p["seeds"] for p in planned if p["doses"])


def test_a_follow_up_is_analysed_on_its_own_folder_with_the_registered_pilot(tmp_path, capsys):
    """Design 3 needs design 1's pilot (committed), the follow-up folder only its new seeds; each planned
    test reads its own seeds."""
    from experiments.common import write_rows

    kv = designs.floor_kv(list(analysis.Data.load().runs.values()))
    seeds = list(range(followup.FIRST_SEED, followup.FIRST_SEED + 3))
    rows = []
    for rid in designs.design_3(kv, seeds):
        w = 0.0 if rid.startswith("gla_") else float(rid.split("_w")[1].split("_")[0])
        rows.append({"run_id": rid, "val_acc": 0.3 + 0.01 * w, "seconds": 1})
    for rid in designs.design_6(seeds[:2]):
        rows.append(
            {"run_id": rid, "val_acc": 0.5, "acc_reused": 0.9 if "reset" in rid else 0.5, "seconds": 1}
        )
    write_rows(tmp_path / "runs.csv", rows)
    plan = tmp_path / "followup.json"
    plan.write_text(
        json.dumps(
            [
                {"test": "decay_identity_trend", "design": 3, "seeds": 3},
                {"test": "delimiter_reset", "design": 6, "seeds": 2},
            ]
        )
    )
    out = followup.analyse(tmp_path, plan)
    assert out["decay_identity_trend"].n == 12 and out["decay_identity_trend"].estimate == pytest.approx(1.0)
    assert out["delimiter_reset"].n == 4 and out["delimiter_reset"].estimate == pytest.approx(0.4)
    assert "Holm p over the follow-up" in capsys.readouterr().out


def test_a_registered_follow_up_whose_runs_began_is_not_replanned(tmp_path, monkeypatch):
    from experiments.common import write_rows

    entry = {
        "test": "delimiter_reset",
        "design": 6,
        "effect": "",
        "units": 3,
        "seeds": 3,
        "runs": 6,
        "cpu_hours": 0.1,
    }
    monkeypatch.setattr(followup, "PLAN_JSON", tmp_path / "followup.json")
    followup.PLAN_JSON.write_text(json.dumps([entry]))
    followup._refuse_changing_started([{**entry, "seeds": 9}], tmp_path)  # no runs yet: it may change
    write_rows(tmp_path / "runs.csv", [{"run_id": "delim_free_s1001", "val_acc": 0.5}])
    followup._refuse_changing_started([entry], tmp_path)  # unchanged: fine
    with pytest.raises(SystemExit, match="delimiter_reset's follow-up has runs"):
        followup._refuse_changing_started([{**entry, "seeds": 9}], tmp_path)
