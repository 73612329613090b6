"""What would decide the tests the table cannot: the n that the observed effect needs, the runs and CPU time
that takes, and the command that runs it (here, or on a GPU with ``followup_gpu.sh``).

For each registered test whose verdict is "cannot tell", the observed effect is taken as the true one and
the n is the one that gives the test 80 % power at two-sided p < 0.05 / 17 (the Holm threshold of the
smallest p of the table's family, so a follow-up of that n decides alone, whatever the other tests):
- a mean of per-unit values (paired differences, per-seed rank correlations): n = ((t_a + t_b) sd / mean)^2;
- a difference of two means: n per group = 2 ((t_a + t_b) sd_pooled / difference)^2;
- a mean of per-stratum statistics under a within-stratum permutation (per-seed Spearman over doses):
  n = ((z_a sd_0 + z_b sd) / mean)^2, with sd_0 the statistic's known sd under no effect (1 / sqrt(k - 1) for
  a Spearman over k doses);
- a Spearman correlation: n = ((z_a + z_b) / atanh(rho))^2 * 1.06 / strata + 3 per stratum (Fisher's z,
  Spearman's variance; a mean over ``strata`` within-stratum correlations divides the variance);
with t quantiles at the n's degrees of freedom (iterated) and z the normal ones. Where two undecided tests
share a design, each plan has its own seeds (all from ``FIRST_SEED``: the larger includes the smaller) and
each test reads its own.
``tests/experiments/test_prereg.py`` checks these against the permutation tests' simulated power.

A test whose unit is a dose (design 4's GLA test: a Spearman over dose means) gets more doses instead
(``designs.gate_doses``: evenly spaced in log over the registered range), each with the registered number of
seeds. A follow-up draws fresh seeds (from ``FIRST_SEED``), independent of the runs that left the test undecided,
so that stopping on a p is not what decides it; it is a new registration, committed before its runs.

    PYTHONPATH=. .venv/bin/python experiments/prereg/followup.py --plan      # writes followup.json
    PYTHONPATH=. .venv/bin/python experiments/prereg/followup.py --analyse DIR   # its tests on DIR's runs
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
from scipy.stats import t as student_t

from experiments.common import read_rows
from experiments.prereg import analysis, designs, registrations
from experiments.prereg.data import Data, Result
from experiments.prereg.rule import ALPHA, CANNOT, decisions
from experiments.stats import holm

__all__ = ["FIRST_SEED", "Plan", "needed_units", "plans", "rows", "main"]

HERE = Path(__file__).resolve().parent
PLAN_JSON = HERE / "followup.json"
FOLLOWUP_RESULTS = HERE / "followup_results"
FIRST_SEED = 1000
POWER = 0.8
GPU_OVERRIDES = ["trainer=gpu", "trainer.precision=32-true"]  # the registered runs are float32


def _t_n(ratio: float, alpha: float, groups: int = 1) -> int:
    """The smallest n whose t test (df ``groups * (n - 1)``) reaches ``alpha`` with 80 % power at
    ``ratio`` = effect / sd: ``n = groups ((t_a + t_b) / ratio)^2``, iterated from the normal n (at small n
    the normal approximation promises much more power than the tests have: 0.58 instead of 0.8 at n 14)."""
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(POWER)
    n = max(2, math.ceil(groups * (z / ratio) ** 2))
    seen = {n}
    while True:
        df = groups * (n - 1)
        t = student_t.ppf(1 - alpha / 2, df) + student_t.ppf(POWER, df)
        nxt = max(2, math.ceil(groups * (t / ratio) ** 2))
        if nxt in seen:  # converged, or flipping between two values: the larger is the safe one
            return max(n, nxt)
        seen.add(nxt)
        n = nxt


def needed_units(extra: dict, alpha: float) -> int | None:
    """The n (units of the test's resampling, per group for two samples) at which the observed effect in
    ``extra`` (:class:`~experiments.prereg.data.Result`'s) reaches ``alpha`` with 80 % power; ``None`` when
    there is no rule for the statistic or no effect to detect."""
    kind = extra.get("kind")
    if kind == "mean":
        u = np.asarray([v for v in extra["units"] if not math.isnan(v)], float)
        if len(u) < 2 or u.mean() == 0 or u.std(ddof=1) == 0:
            return None
        return _t_n(abs(u.mean()) / u.std(ddof=1), alpha)
    if kind == "stratified":
        u = np.asarray([v for v in extra["units"] if not math.isnan(v)], float)
        if len(u) < 2 or u.mean() == 0:
            return None
        z_a, z_b = NormalDist().inv_cdf(1 - alpha / 2), NormalDist().inv_cdf(POWER)
        return math.ceil(((z_a * extra["null_sd"] + z_b * u.std(ddof=1)) / abs(u.mean())) ** 2)
    if kind == "two_sample":
        a, b = (np.asarray(g, float) for g in extra["groups"])
        pooled = math.sqrt(
            ((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2)
        )
        diff = abs(a.mean() - b.mean())
        return None if diff == 0 or pooled == 0 else _t_n(diff / pooled, alpha, groups=2)
    if kind == "correlation":
        rho = abs(extra["rho"])
        if not 0 < rho < 1:
            return None
        z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(POWER)
        return math.ceil((z / math.atanh(rho)) ** 2 * 1.06 / extra.get("strata", 1) + 3)
    return None


@dataclass(frozen=True)
class Plan:
    """One undecided test's follow-up: the seeds its design needs and what they cost."""

    test: str
    design: int
    effect: str
    units: int
    seeds: int
    runs: int
    cpu_hours: float
    doses: int = 0  # design 4's GLA test: its unit is a dose (then ``units`` doses of ``seeds`` seeds each)

    @property
    def seed_range(self) -> str:
        return f"{FIRST_SEED}-{FIRST_SEED + self.seeds - 1}"

    def command(self, extra: str = "") -> str:
        doses = f" --doses {self.doses}" if self.doses else ""
        return (
            f"PYTHONPATH=. .venv/bin/python experiments/prereg/run.py --design {self.design} "
            f"--seeds {self.seed_range}{doses}{extra} --out experiments/prereg/followup_results"
        )


def _effect(extra: dict, estimate: float) -> str:
    if extra["kind"] in ("mean", "stratified"):
        u = np.asarray([v for v in extra["units"] if not math.isnan(v)], float)
        return f"mean {u.mean():+.3g}, sd {u.std(ddof=1):.3g} over {len(u)} units"
    if extra["kind"] == "two_sample":
        a, b = (np.asarray(g, float) for g in extra["groups"])
        sd = np.std(np.concatenate([a - a.mean(), b - b.mean()]), ddof=2)
        return f"difference {estimate:+.3g}, pooled sd {sd:.3g}, {len(a)} + {len(b)} runs"
    return f"rho {extra['rho']:+.3g} (n {extra['n']} {extra.get('unit', 'run')}s)"


def _seconds_per_run(data: Data, ids: list[str]) -> float:
    times = [float(data.runs[i]["seconds"]) for i in ids if i in data.runs and data.runs[i].get("seconds")]
    return float(np.mean(times)) if times else math.nan


def plans(data: Data, results: dict[str, Result], undecided: list[str], alpha: float) -> list[Plan | str]:
    """A :class:`Plan` per test id in ``undecided`` (or a line saying why there is none)."""
    tests = {t.id: t for t in registrations.family()}
    rows = list(data.runs.values())
    out: list[Plan | str] = []
    for tid in undecided:
        r, design = results[tid], tests[tid].design
        units = needed_units(r.extra, alpha) if r.extra else None
        if units is None:
            out.append(f"{tid}: no follow-up rule for its statistic")
            continue
        if design not in designs.RESEEDABLE:
            out.append(f"{tid}: needs {units} units; design {design}'s grid has no seed to add")
            continue
        if r.extra.get("unit") == "dose":  # more doses, each with as many (fresh) seeds as registered
            seeds, doses = len(designs.SEEDS[design]), units
        else:
            seeds, doses = math.ceil(units / r.extra.get("per_seed", 1)), 0
        grid = designs.points(design, rows, seeds=range(FIRST_SEED, FIRST_SEED + seeds), doses=doses or None)
        registered = designs.points(design, rows, seeds=designs.SEEDS[design])
        hours = len(grid) * _seconds_per_run(data, list(registered)) / 3600
        effect = _effect(r.extra, r.estimate)
        out.append(Plan(tid, design, effect, units, seeds, len(grid), round(hours, 1), doses))
    return out


def rows(data: Data, results: dict[str, Result], undecided: list[str], alpha: float) -> list[str]:
    """The lines of the table under the verdicts: what would decide each undecided test."""
    found = plans(data, results, undecided, alpha)
    if not found:
        return []
    lines = [
        f"What would decide the undecided tests (`experiments/prereg/followup.py`): at the observed effect, the n "
        f"for {POWER * 100:.0f} % power at p < {alpha:.4f} (t approximation), on fresh seeds from {FIRST_SEED}; "
        "CPU hours at one thread per run (two workers halve the wall time); `followup_gpu.sh` runs the same "
        "grid on a GPU:",
        "",
        "| test | observed effect | n | new runs | CPU hours | command |",
        "|---|---|---|---|---|---|",
    ]
    for p in found:
        if isinstance(p, str):
            lines.append(f"| {p.split(':')[0]} | {p.split(': ', 1)[1]} | - | - | - | - |")
        else:
            lines.append(
                f"| {p.test} | {p.effect} | {p.units} | {p.runs} | {p.cpu_hours:g} | `{p.command()}` |"
            )
    return lines


def _context() -> tuple[Data, dict[str, Result], list[str], float]:
    data = Data.load()
    results = analysis.compute(data)
    undecided = [tid for tid, (_, v) in decisions(results).items() if v == CANNOT]
    return data, results, undecided, ALPHA / len(registrations.family())


def analyse(folder: Path, plan_json: Path = PLAN_JSON) -> dict[str, Result]:
    """The planned tests on a follow-up's runs in ``folder`` (its seeds from ``plan_json``), Holm over them."""
    planned = json.loads(plan_json.read_text())
    data = Data.load(folder)
    # the registered runs give what a design's grid depends on (design 1's pilot for designs 2-4); the
    # follow-up's seeds are new, so a test reads only the follow-up's runs
    data.runs = {**Data.load().runs, **data.runs}
    results = {}
    for p in planned:
        data.seeds = {p["design"]: list(range(FIRST_SEED, FIRST_SEED + p["seeds"]))}
        data.gate_doses = designs.gate_doses(p["doses"]) if p.get("doses") else None
        results[p["test"]] = analysis.TESTS[p["test"]](data)
    adjusted = holm([r.p if not r.pending else 1.0 for r in results.values()])
    for (tid, r), adj in zip(results.items(), adjusted):
        print(f"{tid}: {r.evidence} (n {r.n}); p {r.p:.3g}, Holm p over the follow-up {adj:.3g}")
    return results


def main(argv: list[str] | None = None) -> list[Plan | str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--plan", action="store_true", help=f"write {PLAN_JSON.name} (the GPU script reads it)"
    )
    parser.add_argument("--analyse", type=Path, help="a follow-up's results folder (its runs.csv)")
    args = parser.parse_args(argv)
    if args.analyse:
        analyse(args.analyse)
        return []
    found = plans(*_context())
    for p in found:
        print(p if isinstance(p, str) else f"{p.test}: {p.command()}  # {p.runs} runs, {p.cpu_hours:g} CPU h")
    if args.plan:
        planned = [p.__dict__ for p in found if isinstance(p, Plan)]
        _refuse_changing_started(planned)
        PLAN_JSON.write_text(json.dumps(planned, indent=2) + "\n")
    return found


def _refuse_changing_started(planned: list[dict], folder: Path = FOLLOWUP_RESULTS) -> None:
    """``followup.json`` is a registration: an entry whose runs have begun (in ``folder``) stays as it is."""
    old = {p["test"]: p for p in json.loads(PLAN_JSON.read_text())} if PLAN_JSON.exists() else {}
    new = {p["test"]: p for p in planned}
    started = {r["run_id"] for r in read_rows(folder / "runs.csv")}
    rows = list(Data.load().runs.values())
    for tid, entry in old.items():
        seeds = range(FIRST_SEED, FIRST_SEED + entry["seeds"])
        grid = designs.points(entry["design"], rows, seeds=seeds, doses=entry.get("doses") or None)
        if new.get(tid) != entry and started & set(grid):
            raise SystemExit(
                f"followup.json: {tid}'s follow-up has runs in {folder}; its registered plan stays: {entry}"
            )


if __name__ == "__main__":
    main()
