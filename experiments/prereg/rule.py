"""The verdict rule of the registered tests (``experiments/verdicts.py`` writes the table with it): Holm over
the whole family, then holds / does not hold / cannot tell at this scale / pending, decided by the adjusted p
and the direction of the estimate, never by hand."""

from __future__ import annotations

import math

from experiments.prereg import analysis, registrations
from experiments.stats import holm

__all__ = ["ALPHA", "HOLDS", "NOT", "CANNOT", "verdict", "decisions"]

ALPHA = 0.05
HOLDS, NOT, CANNOT = "**holds**", "**does not hold**", "**cannot tell at this scale**"


def verdict(result: analysis.Result, adjusted_p: float, direction: int, status: str) -> str:
    """One test's verdict: holds / does not hold when the adjusted p < ALPHA (by the direction of the
    estimate), cannot tell otherwise; pending while its runs are not all in, blocked as registered."""
    if status.startswith("blocked"):
        return "blocked"
    if result.pending:
        return f"pending ({result.done} of {result.needed})" if result.needed > 1 else "not run"
    if adjusted_p < ALPHA:
        return HOLDS if math.copysign(1, result.estimate) == direction else NOT
    return CANNOT


def decisions(results: dict[str, analysis.Result]) -> dict[str, tuple[float, str]]:
    """``test id -> (Holm-adjusted p, verdict)`` over the whole registered family."""
    regs = registrations.load()
    tests = registrations.family(regs)
    status = {r.design: r.status for r in regs}
    adjusted = holm([results[t.id].p if not results[t.id].pending else 1.0 for t in tests])
    return {
        t.id: (adj, verdict(results[t.id], adj, t.direction, status[t.design]))
        for t, adj in zip(tests, adjusted)
    }
