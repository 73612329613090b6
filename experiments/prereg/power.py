"""Power of the registered tests, by simulation, from effect sizes and spreads of the committed runs.

Each registered design states its n with the power computed here (``power.md``): the chance that its test
reaches p below the Holm threshold of the smallest p in the table's family (0.05 / 17) and below 0.05, at
the effect the committed pilot runs suggest. Gaussian data, fixed generator seed.

    PYTHONPATH=. .venv/bin/python experiments/prereg/power.py     # writes experiments/prereg/power.md
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from experiments.stats import sign_flip_p, spearman, stratified_spearman_p

HERE = Path(__file__).resolve().parent
FAMILY_SIZE = 17
ALPHAS = (0.05 / FAMILY_SIZE, 0.05)
N_SIM = 200


def _power(pvalues: list[float]) -> tuple[float, float]:
    p = np.asarray(pvalues)
    return tuple(float(np.mean(p < a)) for a in ALPHAS)


def within_cell_spearman(rho: float, cells: int, per_cell: int, seed: int = 0) -> tuple[float, float]:
    """Design 1: the stratified Spearman permutation test with true within-cell correlation ``rho``."""
    rng = np.random.default_rng(seed)
    cov = [[1, rho], [rho, 1]]
    ps = []
    for _ in range(N_SIM):
        xy = rng.multivariate_normal([0, 0], cov, cells * per_cell)
        strata = np.repeat(np.arange(cells), per_cell)
        ps.append(
            stratified_spearman_p(xy[:, 0], xy[:, 1], strata, n_perm=2000, seed=int(rng.integers(1e9)))[1]
        )
    return _power(ps)


def paired_sign_flip(effect: float, sd_diff: float, n: int, seed: int = 0) -> tuple[float, float]:
    """Designs 2, 7 (intervention), 8: a paired sign-flip test of mean difference ``effect``."""
    rng = np.random.default_rng(seed)
    return _power([sign_flip_p(rng.normal(effect, sd_diff, n)) for _ in range(N_SIM)])


def dose_means_spearman(rho: float, doses: int, seed: int = 0) -> tuple[float, float]:
    """Design 4: exact Spearman over ``doses`` dose means with true correlation ``rho`` (the exact null of
    :func:`experiments.stats.spearman_p`, vectorized: continuous data have no ties)."""
    rng = np.random.default_rng(seed)
    cov = [[1, rho], [rho, 1]]
    perms = np.array(list(itertools.permutations(range(doses))), float)
    null = 1 - 6 * ((perms - np.arange(doses)) ** 2).sum(1) / (doses * (doses**2 - 1))
    ps = []
    for _ in range(N_SIM):
        xy = rng.multivariate_normal([0, 0], cov, doses)
        r = spearman(xy[:, 0], xy[:, 1])
        ps.append(float(np.mean(np.abs(null) >= abs(r) - 1e-12)))
    return _power(ps)


def rows() -> list[tuple[str, str, tuple[float, float]]]:
    return [
        ("1 beyond kv", "12 cells x 6 seeds, within-cell rho 0.5", within_cell_spearman(0.5, 12, 6)),
        ("1 beyond kv", "12 cells x 6 seeds, within-cell rho 0.3", within_cell_spearman(0.3, 12, 6)),
        ("1 beyond kv", "12 cells x 4 seeds, within-cell rho 0.5", within_cell_spearman(0.5, 12, 4)),
        ("1 beyond kv", "12 cells x 8 seeds, within-cell rho 0.5", within_cell_spearman(0.5, 12, 8)),
        ("2 floor accuracy", "16 pairs, +0.10, sd of differences 0.13", paired_sign_flip(0.10, 0.13, 16)),
        ("2 floor accuracy", "24 pairs, +0.10, sd of differences 0.13", paired_sign_flip(0.10, 0.13, 24)),
        ("2 floor accuracy", "32 pairs, +0.10, sd of differences 0.13", paired_sign_flip(0.10, 0.13, 32)),
        ("2 floor accuracy", "32 pairs, +0.05, sd of differences 0.13", paired_sign_flip(0.05, 0.13, 32)),
        ("3 decay_identity trend", "6 seeds x 4 doses, within-seed rho 0.5", within_cell_spearman(0.5, 6, 4)),
        ("4 initialization dose", "7 dose means, rho 0.8", dose_means_spearman(0.8, 7)),
        ("4 initialization dose", "7 dose means, rho 0.6", dose_means_spearman(0.6, 7)),
        ("5 distillation", "12 teachers, gap -0.15, sd 0.10", paired_sign_flip(-0.15, 0.10, 12)),
        ("7 hybrid intervention", "16 pairs, +0.2, sd of differences 0.4", paired_sign_flip(0.2, 0.4, 16)),
        ("8 under-use at init", "12 seeds, slope - 1 = -0.5, sd 0.05", paired_sign_flip(-0.5, 0.05, 12)),
        ("8 S6 below GLA", "12 seeds, -0.25, sd 0.05", paired_sign_flip(-0.25, 0.05, 12)),
    ]


def main() -> str:
    lines = [
        "# Power of the registered tests (simulated, 200 draws each)",
        "",
        f"Holm threshold of the smallest p in a family of {FAMILY_SIZE}: {ALPHAS[0]:.4f}.",
        "",
        f"| design | scenario | power at p < {ALPHAS[0]:.4f} | power at p < 0.05 |",
        "|---|---|---|---|",
    ]
    for d, s, (a, b) in rows():
        lines.append(f"| {d} | {s} | {a:.2f} | {b:.2f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    (HERE / "power.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
