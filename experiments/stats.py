"""Statistics shared by the studies' ``plot.py``: rank correlations, partial correlations, bootstrap intervals.

Small samples (8-40 runs), so every estimate comes with an interval: a cluster bootstrap (runs of one
configuration, e.g. its seeds, are resampled together, so that seed replicates do not pass for independent
configurations) or a paired bootstrap of differences. Percentile intervals, fixed generator seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence

import numpy as np
from scipy.stats import rankdata, spearmanr

__all__ = [
    "spearman",
    "partial_spearman",
    "cluster_bootstrap",
    "paired_difference",
    "sign_flip_p",
    "spearman_p",
    "interval",
]

N_BOOT = 2000


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rho, NaN when either side is constant or there are fewer than 3 points."""
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return math.nan
    return float(spearmanr(xs, ys).statistic)


def partial_spearman(xs: Sequence[float], ys: Sequence[float], zs: Sequence[float]) -> float:
    """Rank partial correlation of x and y given z: Pearson of the ranks' residuals after a linear fit on z's."""
    if len(xs) < 4:
        return math.nan
    rx, ry, rz = (rankdata(v) for v in (xs, ys, zs))
    design = np.stack([np.ones_like(rz), rz], 1)
    res = [r - design @ np.linalg.lstsq(design, r, rcond=None)[0] for r in (rx, ry)]
    den = float(np.linalg.norm(res[0]) * np.linalg.norm(res[1]))
    return float(res[0] @ res[1] / den) if den > 0 else math.nan


def cluster_bootstrap(
    stat: Callable[[list[dict]], float],
    rows: Sequence[dict],
    cluster: Callable[[dict], Hashable],
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(estimate, low, high)``: ``stat(rows)`` and its 95 % interval, resampling whole clusters of rows."""
    groups: dict[Hashable, list[dict]] = {}
    for r in rows:
        groups.setdefault(cluster(r), []).append(r)
    keys = list(groups)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(keys), len(keys))
        value = stat([r for i in pick for r in groups[keys[i]]])
        if not math.isnan(value):
            draws.append(value)
    low, high = interval(draws)
    return stat(list(rows)), low, high


def paired_difference(
    treated: Sequence[float], control: Sequence[float], n_boot: int = N_BOOT, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean difference, low, high)`` of paired ``treated - control`` with a 95 % bootstrap interval."""
    diff = np.asarray(treated, float) - np.asarray(control, float)
    rng = np.random.default_rng(seed)
    means = [float(diff[rng.integers(0, len(diff), len(diff))].mean()) for _ in range(n_boot)]
    return float(diff.mean()), *interval(means)


def interval(draws: Sequence[float]) -> tuple[float, float]:
    """The 2.5 % and 97.5 % percentiles (NaN when there are no draws)."""
    if not draws:
        return math.nan, math.nan
    low, high = np.percentile(np.asarray(draws, float), [2.5, 97.5])
    return float(low), float(high)


def sign_flip_p(diffs: Sequence[float]) -> float:
    """Two-sided exact p of a paired sign-flip permutation test of mean ``diffs`` = 0 (all 2^n sign patterns)."""
    d = np.asarray(diffs, float)
    if len(d) == 0 or len(d) > 20:
        return math.nan
    signs = np.array(np.meshgrid(*[[-1.0, 1.0]] * len(d))).reshape(len(d), -1).T
    means = np.abs(signs @ d) / len(d)
    return float(np.mean(means >= abs(d.mean()) - 1e-12))


def spearman_p(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Two-sided p of Spearman's rho: exact over all permutations for n <= 8, else scipy's."""
    n = len(xs)
    rho = spearman(xs, ys)
    if math.isnan(rho):
        return math.nan
    if n > 8:
        return float(spearmanr(xs, ys).pvalue)
    from itertools import permutations

    ys = list(ys)
    hits = total = 0
    for perm in permutations(range(n)):
        r = spearman(xs, [ys[i] for i in perm])
        total += 1
        hits += (not math.isnan(r)) and abs(r) >= abs(rho) - 1e-12
    return hits / total
