"""The pre-registrations (``NN_<name>.json`` beside this file), read and checked.

A registration is committed before its design's runs (git history shows the order) and holds the design's
hypothesis, grid, n and why, thresholds and its tests: each with the claim, the statistic, the claimed
direction (+1 or -1) and the unit of resampling. A change after registration is an entry in its
``amendments`` list (dated, committed before the runs it concerns). The verdict table reads them; a test id must have exactly
one computation in :mod:`experiments.prereg.analysis`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Registration", "Test", "load", "family"]

HERE = Path(__file__).resolve().parent
REQUIRED = {
    "design",
    "name",
    "title",
    "hypothesis",
    "grid",
    "n_reason",
    "thresholds",
    "tests",
    "status",
    "command",
}
TEST_KEYS = {"id", "claim", "statistic", "direction", "unit"}


@dataclass(frozen=True)
class Test:
    id: str
    claim: str
    statistic: str
    direction: int
    unit: str
    design: int


@dataclass(frozen=True)
class Registration:
    design: int
    name: str
    title: str
    status: str
    path: Path
    tests: tuple[Test, ...]

    @property
    def blocked(self) -> bool:
        return self.status.startswith("blocked")


def _check(raw: dict, path: Path) -> None:
    missing = REQUIRED - raw.keys()
    if missing:
        raise ValueError(f"{path.name}: missing keys {sorted(missing)}")
    for t in raw["tests"]:
        if TEST_KEYS - t.keys():
            raise ValueError(f"{path.name}: test {t.get('id')!r} lacks {sorted(TEST_KEYS - t.keys())}")
        if t["direction"] not in (1, -1):
            raise ValueError(
                f"{path.name}: test {t['id']!r} direction must be 1 or -1, got {t['direction']!r}"
            )


def load(folder: Path = HERE) -> list[Registration]:
    """Every registration in ``folder``, by design number."""
    out = []
    for path in sorted(folder.glob("[0-9][0-9]_*.json")):
        raw = json.loads(path.read_text())
        _check(raw, path)
        tests = tuple(Test(**{k: t[k] for k in TEST_KEYS}, design=raw["design"]) for t in raw["tests"])
        out.append(Registration(raw["design"], raw["name"], raw["title"], raw["status"], path, tests))
    return out


def family(regs: list[Registration] | None = None) -> list[Test]:
    """The table's family of tests, which Holm corrects over: every registered test, blocked ones included
    (conservative: a test not yet run counts with p = 1)."""
    return [t for r in (regs if regs is not None else load()) for t in r.tests]
