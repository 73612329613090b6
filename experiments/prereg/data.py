"""What the registered tests read and return: the designs' rows (:class:`Data`) and one test's outcome
(:class:`Result`), with the small helpers the tests share (rows by id, pending results, paired tests)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from experiments.common import read_rows
from experiments.prereg import designs
from experiments.stats import sign_flip_p

__all__ = ["Result", "Data", "RESULTS", "LAYER", "N_PERM"]

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LAYER = "blocks.1.mixer"
N_PERM = 10_000


@dataclass
class Result:
    """One registered test's outcome (``p`` is NaN while ``pending``)."""

    estimate: float = math.nan
    p: float = math.nan
    n: int = 0
    done: int = 0
    needed: int = 0
    evidence: str = ""
    # what a follow-up's size is computed from (experiments.prereg.followup): {"kind": "mean", "units": [...]}
    # (one value per resampled unit), {"kind": "stratified", "units": [...], "null_sd": s} (per-stratum
    # statistics under a within-stratum permutation), {"kind": "two_sample", "groups": [[...], [...]]} or
    # {"kind": "correlation", "rho": r, "n": n, "strata": k}, each with "per_seed": units per seed
    extra: dict = field(default_factory=dict)

    @property
    def pending(self) -> bool:
        return self.done < self.needed or math.isnan(self.p)


@dataclass
class Data:
    """The registered designs' rows: trained runs by id, ESS-at-init rows, curves by (run, metric, step);
    ``seeds`` replaces a design's registered seeds and ``gate_doses`` design 4's GLA doses (a follow-up,
    :mod:`experiments.prereg.followup`)."""

    runs: dict[str, dict]
    init: list[dict]
    curves: dict[tuple[str, str, int], float]
    students: dict[str, dict] = field(default_factory=dict)
    seeds: dict[int, list[int]] = field(default_factory=dict)
    gate_doses: list[float] | None = None  # design 4's GLA doses in a follow-up (else the registered)

    def seeds_of(self, design: int) -> list[int]:
        """The seeds a test of ``design`` reads: the follow-up's where given, else the registered ones."""
        return list(self.seeds.get(design, designs.SEEDS[design]))

    def gate_doses_of(self) -> list[float]:
        """The GLA gate normalizers design 4's GLA test reads."""
        return list(self.gate_doses or designs.GATE_NORMALIZERS)

    @classmethod
    def load(cls, results: Path = RESULTS, seeds: dict[int, list[int]] | None = None) -> Data:
        runs = {r["run_id"]: r for r in read_rows(results / "runs.csv") if not r.get("error")}
        curves = {
            (c["run_id"], c["metric"], int(c["step"])): float(c["value"])
            for c in read_rows(results / "runs_curves.csv")
        }
        students = {r["run_id"]: r for r in read_rows(results / "students.csv") if not r.get("error")}
        return cls(runs, read_rows(results / "init.csv"), curves, students, dict(seeds or {}))


def value(row: dict, key: str) -> float:
    return float(row[key])


def have(data: Data, ids: list[str]) -> list[dict]:
    return [data.runs[i] for i in ids if i in data.runs]


def pending(done: int, needed: int, what: str = "runs") -> Result:
    return Result(done=done, needed=needed, evidence=f"running: {done} of {needed} {what}")


def model_tss(row: dict) -> float:
    return sum(float(v) for k, v in row.items() if k.endswith("/tss") and v not in ("", None))


def log_ratio(row: dict) -> float:
    return math.log(value(row, f"ess/{LAYER}/utilization") / value(row, f"ess/{LAYER}/initial_utilization"))


def paired(data: Data, treated: list[str], control: list[str], key: Callable[[dict], float]) -> Result:
    t, c = have(data, treated), have(data, control)
    if len(t) < len(treated) or len(c) < len(control):
        return pending(len(t) + len(c), len(treated) + len(control))
    d = np.array([key(a) - key(b) for a, b in zip(t, c)])
    wins = int(np.sum(d > 0))
    return Result(
        float(d.mean()),
        sign_flip_p(d),
        len(d),
        len(t) + len(c),
        len(treated) + len(control),
        f"mean difference {d.mean():+.3f} (pairs {d.min():+.3f} to {d.max():+.3f}), {wins} of {len(d)} pairs higher",
        {"kind": "mean", "units": d.tolist(), "per_seed": 1},
    )
