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
    "cluster_bootstrap_test",
    "bootstrap_p",
    "two_sample_p",
    "stratified_spearman_p",
    "block_trend_p",
    "holm",
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
    return cluster_bootstrap_test(stat, rows, cluster, n_boot, seed)[:3]


def cluster_bootstrap_test(
    stat: Callable[[list[dict]], float],
    rows: Sequence[dict],
    cluster: Callable[[dict], Hashable],
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> tuple[float, float, float, float]:
    """:func:`cluster_bootstrap` and the two-sided bootstrap p of the estimate's sign (:func:`bootstrap_p`)
    from the same draws."""
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
    return stat(list(rows)), low, high, bootstrap_p(draws)


def bootstrap_p(draws: Sequence[float]) -> float:
    """Two-sided bootstrap p of "the effect is 0": twice the smaller share of draws on either side of 0
    (at most 1; ``1 / (n + 1)`` resolution, so a p below it reads as that bound)."""
    d = np.asarray(draws, float)
    if len(d) == 0:
        return math.nan
    low, high = (np.sum(d <= 0) + 1) / (len(d) + 1), (np.sum(d >= 0) + 1) / (len(d) + 1)
    return float(min(1.0, 2 * min(low, high)))


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
    """Two-sided p of a paired sign-flip permutation test of mean ``diffs`` = 0: exact over all 2^n sign
    patterns for n <= 16, else from ``2 ** 16`` random patterns (fixed seed; the observed one included)."""
    d = np.asarray(diffs, float)
    if len(d) == 0:
        return math.nan
    if len(d) <= 16:
        signs = np.array(np.meshgrid(*[[-1.0, 1.0]] * len(d))).reshape(len(d), -1).T
    else:
        rng = np.random.default_rng(0)
        signs = np.vstack([np.ones(len(d)), rng.choice([-1.0, 1.0], (2**16 - 1, len(d)))])
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


def two_sample_p(a: Sequence[float], b: Sequence[float], n_perm: int = 2**16) -> float:
    """Two-sided permutation p of mean(a) - mean(b) = 0: exact over every split of the pooled values into
    groups of ``len(a)`` and ``len(b)`` while there are at most ``n_perm`` splits (8 + 8 values: 12,870),
    else from ``n_perm`` random splits (fixed seed; the observed one included)."""
    pooled = np.asarray([*a, *b], float)
    n, k = len(pooled), len(a)
    if k == 0 or k == n:
        raise ValueError(f"two_sample_p needs two non-empty groups, got {k} + {n - k} values")
    observed = abs(pooled[:k].mean() - pooled[k:].mean())
    total = pooled.sum()
    if math.comb(n, k) <= n_perm:
        from itertools import combinations

        sums = np.array([pooled[list(idx)].sum() for idx in combinations(range(n), k)])
    else:
        rng = np.random.default_rng(0)
        picks = np.argsort(rng.random((n_perm - 1, n)), axis=1)[:, :k]
        sums = np.concatenate([[pooled[:k].sum()], pooled[picks].sum(1)])
    diffs = np.abs(sums / k - (total - sums) / (n - k))
    return float(np.mean(diffs >= observed - 1e-12))


def stratified_spearman_p(
    xs: Sequence[float], ys: Sequence[float], strata: Sequence[Hashable], n_perm: int = 4000, seed: int = 0
) -> tuple[float, float]:
    """``(statistic, p)``: the mean over strata of Spearman(x, y) within each stratum, and its two-sided p
    from permuting y within strata (``n_perm`` random permutations, the observed one included). Strata with
    a constant side are left out of the mean (they carry no ranking)."""
    cells: dict[Hashable, list[int]] = {}
    for i, s in enumerate(strata):
        cells.setdefault(s, []).append(i)
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    rng = np.random.default_rng(seed)
    observed, null = [], np.zeros(n_perm - 1)
    for members in cells.values():
        if len(members) < 3:
            continue
        rx, ry = (rankdata(v[members]) for v in (x, y))
        rx, ry = rx - rx.mean(), ry - ry.mean()
        den = float(np.linalg.norm(rx) * np.linalg.norm(ry))
        if den == 0:
            continue  # a constant side: no ranking in this stratum
        observed.append(float(rx @ ry) / den)
        perms = np.argsort(rng.random((n_perm - 1, len(members))), axis=1)
        null += ry[perms] @ rx / den
    if not observed:
        return math.nan, math.nan
    stat = float(np.mean(observed))
    null /= len(observed)
    return stat, float((1 + np.sum(np.abs(null) >= abs(stat) - 1e-12)) / n_perm)


def block_trend_p(
    doses: Sequence[float], ys: Sequence[float], blocks: Sequence[Hashable], n_perm: int = 4000, seed: int = 0
) -> tuple[float, float]:
    """``(statistic, p)`` of a dose trend in a blocked design (every block, e.g. a seed, sees every dose):
    the mean over blocks of Spearman(dose, y), p from permuting doses within blocks (:func:`stratified_spearman_p`)."""
    return stratified_spearman_p(ys, doses, blocks, n_perm, seed)


def holm(ps: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p values (same order as ``ps``; NaN stays NaN and is not counted)."""
    valid = [(p, i) for i, p in enumerate(ps) if not math.isnan(p)]
    m = len(valid)
    out = [math.nan] * len(ps)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(valid)):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out
