"""The registered tests, computed from the registered designs' CSVs: one function per test id.

Each returns a :class:`~experiments.prereg.data.Result`: the estimate, its p (two-sided, as registered), the
n, the runs done of the runs needed, and one line of evidence. A test whose runs are not all in yet is
``pending`` (no p): the registered n is the n, so a verdict never comes from a partial sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata

from experiments.prereg import designs
from experiments.prereg.data import (
    LAYER,
    N_PERM,
    RESULTS,
    Data,
    Result,
    have,
    log_ratio,
    model_tss,
    paired,
    pending,
    value,
)
from experiments.stats import (
    bootstrap_p,
    sign_flip_p,
    spearman,
    spearman_p,
    stratified_spearman_p,
    two_sample_p,
)

__all__ = ["Result", "TESTS", "compute", "Data", "RESULTS", "LAYER"]


def beyond_kv(data: Data) -> Result:
    ids = list(designs.design_1())
    rows = have(data, ids)
    if len(rows) < len(ids):
        return pending(len(rows), len(ids))
    cells = [r["run_id"].rsplit("_s", 1)[0] for r in rows]
    acc = [value(r, "val_acc") for r in rows]
    ess = [value(r, f"ess/{LAYER}/avg_entropy") for r in rows]
    stat, p = stratified_spearman_p(acc, ess, cells, n_perm=N_PERM)
    per_family = {}
    for family in designs.FAMILIES:
        rhos = []
        for kv in designs.KVS:
            members = [i for i, c in enumerate(cells) if c == f"{family}_kv{kv}"]
            rhos.append(spearman([acc[i] for i in members], [ess[i] for i in members]))
        per_family[family] = np.nanmean(rhos)
    return Result(
        stat,
        p,
        len(rows),
        len(rows),
        len(ids),
        f"mean within-cell Spearman(accuracy, ESS) {stat:+.2f} over {len(set(cells))} cells of "
        f"{len(rows) // len(set(cells))} seeds (per family, mean over kv: "
        + ", ".join(f"{f} {r:+.2f}" for f, r in per_family.items())
        + f"); accuracy {min(acc):.3f}-{max(acc):.3f}",
    )


def _rank_corr(ranks_a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman of ``a`` (given as its ranks) with each row of ``b`` ``[draws, n]`` (average ranks for ties)."""
    rb = rankdata(b, axis=1)
    ra = ranks_a - ranks_a.mean(1, keepdims=True)
    rb = rb - rb.mean(1, keepdims=True)
    return (ra * rb).sum(1) / np.sqrt((ra**2).sum(1) * (rb**2).sum(1))


def ess_vs_tss_per_kv(data: Data) -> Result:
    ids = list(designs.design_1())
    rows = have(data, ids)
    if len(rows) < len(ids):
        return pending(len(rows), len(ids))
    kv = np.array([int(r["run_id"].split("_kv")[1].split("_")[0]) for r in rows], float)
    acc = np.array([value(r, "val_acc") for r in rows])
    ess = np.array([value(r, "ess_total") for r in rows]) / kv
    tss = np.array([model_tss(r) for r in rows]) / kv
    seed_of = [r["run_id"].rsplit("_s", 1)[1] for r in rows]
    seeds = sorted(set(seed_of))
    members = [np.array([i for i, s in enumerate(seed_of) if s == k]) for k in seeds]
    rng = np.random.default_rng(0)
    picks = np.stack(
        [np.concatenate([members[j] for j in rng.integers(0, len(seeds), len(seeds))]) for _ in range(N_PERM)]
    )
    ra = rankdata(acc[picks], axis=1)
    draws = _rank_corr(ra, ess[picks]) - _rank_corr(ra, tss[picks])
    draws = draws[np.isfinite(draws)]
    est = spearman(acc, ess) - spearman(acc, tss)
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return Result(
        est,
        bootstrap_p(draws),
        len(rows),
        len(rows),
        len(ids),
        f"Spearman with accuracy: ESS/kv minus TSS/kv {est:+.2f} [{lo:+.2f}, {hi:+.2f}]",
    )


def _ratio_test(data: Data, families: list[str], label: str) -> Result:
    ids = [i for i in designs.design_1() if i.rsplit("_kv", 1)[0] in families]
    rows = have(data, ids)
    if len(rows) < len(ids):
        return pending(len(rows), len(ids))
    d = np.array([log_ratio(r) for r in rows])
    ratio = np.exp(d)
    return Result(
        float(d.mean()),
        sign_flip_p(d),
        len(d),
        len(rows),
        len(ids),
        f"{label}: final / initial utilization {ratio.min():.2f}-{ratio.max():.2f} "
        f"(geometric mean {math.exp(d.mean()):.2f}), {int(np.sum(d < 0))} of {len(d)} runs fall",
    )


def collapse(data: Data) -> Result:
    return _ratio_test(data, ["gla", "decayed_linear_attention"], "GLA and decayed linear attention")


def linear_attention_fills(data: Data) -> Result:
    return _ratio_test(data, ["linear_attention"], "linear attention")


def _regime(data: Data) -> int | None:
    return designs.floor_kv(list(data.runs.values()))


def floor_utilization(data: Data) -> Result:
    kv = _regime(data)
    if kv is None:
        return pending(0, 2 * len(data.seeds_of(2)), "runs (waiting for the pilot)")
    return paired(
        data,
        [f"floor_kv{kv}_s{s}" for s in data.seeds_of(2)],
        [f"gla_kv{kv}_s{s}" for s in data.seeds_of(2)],
        lambda r: value(r, f"ess/{LAYER}/utilization"),
    )


def floor_accuracy(data: Data) -> Result:
    kv = _regime(data)
    if kv is None:
        return pending(0, 2 * len(data.seeds_of(2)), "runs (waiting for the pilot)")
    out = paired(
        data,
        [f"floor_kv{kv}_s{s}" for s in data.seeds_of(2)],
        [f"gla_kv{kv}_s{s}" for s in data.seeds_of(2)],
        lambda r: value(r, "val_acc"),
    )
    if not out.pending:
        base = [value(data.runs[f"gla_kv{kv}_s{s}"], "val_acc") for s in data.seeds_of(2)]
        out.evidence += f"; kv {kv}, unregularized accuracy {min(base):.3f}-{max(base):.3f}"
    return out


def decay_identity_trend(data: Data) -> Result:
    kv = _regime(data)
    needed = len(designs.design_3(kv or 4, data.seeds_of(3)))
    if kv is None:
        return pending(0, needed, "runs (waiting for the pilot)")
    ids = designs.design_3(kv, data.seeds_of(3))
    rows = have(data, list(ids))
    if len(rows) < needed:
        return pending(len(rows), needed)
    dose = [
        0.0 if r["run_id"].startswith("gla_") else float(r["run_id"].split("_w")[1].split("_")[0])
        for r in rows
    ]
    seeds = [r["run_id"].rsplit("_s", 1)[1] for r in rows]
    acc = [value(r, "val_acc") for r in rows]
    stat, p = stratified_spearman_p(acc, dose, seeds, n_perm=N_PERM)
    means = {w: np.mean([a for a, d in zip(acc, dose) if d == w]) for w in sorted(set(dose))}
    per_seed = [
        spearman([d for d, s in zip(dose, seeds) if s == seed], [a for a, s in zip(acc, seeds) if s == seed])
        for seed in dict.fromkeys(seeds)
    ]
    return Result(
        stat,
        p,
        len(rows),
        len(rows),
        needed,
        f"mean within-seed Spearman(weight, accuracy) {stat:+.2f}; mean accuracy by weight "
        + ", ".join(f"{w:g}: {m:.3f}" for w, m in means.items())
        + _penalty_share(data, [r["run_id"] for r in rows if not r["run_id"].startswith("gla_")]),
        {"kind": "stratified", "units": per_seed, "null_sd": (len(means) - 1) ** -0.5, "per_seed": 1},
    )


def _penalty_share(data: Data, run_ids: list[str]) -> str:
    """``; weighted penalty / loss at the first logged step a-b`` over ``run_ids`` (``decay_w<weight>_...``;
    the curves log the unweighted penalty ``ess/reg_loss``), or nothing."""
    shares = []
    for rid in run_ids:
        steps = sorted(s for (r, m, s) in data.curves if r == rid and m == "ess/reg_loss")
        if steps and (rid, "train/loss", steps[0]) in data.curves:
            weight = float(rid.split("_w", 1)[1].split("_", 1)[0])
            penalty = weight * data.curves[(rid, "ess/reg_loss", steps[0])]
            shares.append(penalty / data.curves[(rid, "train/loss", steps[0])])
    return (
        f"; weighted penalty / loss at the first logged step {min(shares):.2g}-{max(shares):.2g}"
        if shares
        else ""
    )


def _dose_means(data: Data, doses: dict[str, list[str]], guess: float) -> Result:
    """Spearman over dose means of (initial utilization, accuracy); ``doses``: dose -> its run ids;
    ``guess``: the accuracy of guessing among the kv values in context (1/kv), reported beside the range."""
    ids = [i for group in doses.values() for i in group]
    rows = have(data, ids)
    if len(rows) < len(ids):
        return pending(len(rows), len(ids))
    util = [
        np.mean([value(data.runs[i], f"ess/{LAYER}/initial_utilization") for i in g]) for g in doses.values()
    ]
    acc = [np.mean([value(data.runs[i], "val_acc") for i in g]) for g in doses.values()]
    runs_acc = [value(r, "val_acc") for r in rows]
    rho = spearman(util, acc)
    return Result(
        rho,
        spearman_p(util, acc),
        len(util),
        len(rows),
        len(ids),
        f"Spearman over {len(util)} dose means {rho:+.2f}; initial utilization {min(util):.2f}-{max(util):.2f}, "
        f"accuracy of the means {min(acc):.3f}-{max(acc):.3f}, of the runs {min(runs_acc):.3f}-"
        f"{max(runs_acc):.3f} (guessing among the kv values: {guess:.2f})",
    )


def init_gla_gate(data: Data) -> Result:
    kv = _regime(data)
    if kv is None:
        return pending(0, len(data.gate_doses_of()) * len(data.seeds_of(4)), "runs (waiting for the pilot)")
    doses = {
        f"{g:g}": [designs.gla_dose_id(g, kv, s) for s in data.seeds_of(4)] for g in data.gate_doses_of()
    }
    out = _dose_means(data, doses, 1 / kv)
    # a follow-up adds doses (its n is the number of dose means), each with the registered seeds per dose
    if not out.pending:
        out.extra = {"kind": "correlation", "rho": out.estimate, "n": out.n, "unit": "dose"}
    return out


def init_mamba_dt(data: Data) -> Result:
    """Amendment 1: the dose grid in the regime the pilot chose (the registered regime's Mamba runs all sat
    at guessing among the kv values); the registered regime's accuracy range is reported beside it."""
    regime = designs.mamba_regime(list(data.runs.values()))
    if regime is None:
        pilot = designs.design_4_mamba_pilot()
        return pending(len(have(data, list(pilot))), len(pilot), "pilot runs (amendment 1)")
    kv, steps, d_state, expand = designs.MAMBA_REGIMES[regime]
    doses: dict[str, list[str]] = {}
    for lo, hi in designs.DT_RANGES:
        doses[f"{lo:g}-{hi:g}"] = [designs.mamba_id(regime, lo, hi, s) for s in designs.SEEDS_4]
    out = _dose_means(data, doses, 1 / kv)
    out.evidence = (
        f"regime {regime} (kv {kv}, {steps} steps, d_state {d_state}, expand {expand}; the pilot's choice); "
        + out.evidence
    )
    base_kv = _regime(data)
    base = have(data, [i for i in designs.design_4(base_kv or 4) if i.startswith("mamba_dt")])
    if base:
        acc = [value(r, "val_acc") for r in base]
        out.evidence += f"; the registered regime (kv {base_kv}): runs {min(acc):.3f}-{max(acc):.3f}"
    return out


def distill_below_ess(data: Data) -> Result:
    ids = designs.design_5_students()
    rows = [data.students[i] for i in ids if i in data.students]
    if len(rows) < len(ids):
        return pending(len(rows), len(ids), "students")
    gaps, left_out = [], []
    for tid in designs.design_5_teachers():
        rs = [r for r in rows if r["run_id"].startswith(f"{tid}_dk")]
        ess = float(rs[0]["teacher_ess_per_op"])
        below = [float(r["agreement"]) for r in rs if int(r["d_k"]) < ess]
        above = [float(r["agreement"]) for r in rs if int(r["d_k"]) > ess]
        if below and above:
            gaps.append(np.mean(below) - np.mean(above))
        else:
            left_out.append(tid)
    if not gaps:
        return Result(
            done=len(rows), needed=len(ids), evidence="no teacher has students on both sides of its ESS"
        )
    g = np.array(gaps)
    note = f"; left out (no student on one side): {', '.join(left_out)}" if left_out else ""
    return Result(
        float(g.mean()),
        sign_flip_p(g),
        len(g),
        len(rows),
        len(ids),
        f"agreement below minus above the teacher's ESS per operator {g.mean():+.3f} "
        f"(teachers {g.min():+.3f} to {g.max():+.3f}), {int(np.sum(g < 0))} of {len(g)} teachers below worse{note}",
    )


def delimiter_reset(data: Data) -> Result:
    ids = designs.design_6(data.seeds_of(6))
    rows = have(data, list(ids))
    if len(rows) < len(ids):
        return pending(len(rows), len(ids))
    fixed = [value(r, "acc_reused") for r in rows if r["run_id"].startswith("delim_reset")]
    free = [value(r, "acc_reused") for r in rows if r["run_id"].startswith("delim_free")]
    diff = float(np.mean(fixed) - np.mean(free))
    return Result(
        diff,
        two_sample_p(fixed, free),
        len(rows),
        len(rows),
        len(ids),
        f"accuracy on reused keys: reset {min(fixed):.3f}-{max(fixed):.3f}, free {min(free):.3f}-{max(free):.3f}, "
        f"difference of means {diff:+.3f}",
        {"kind": "two_sample", "groups": [fixed, free], "per_seed": 1},
    )


# design 7's early step (its registration's thresholds.early_step): the measurement after 200 optimizer steps,
# which the loggers file at step 199 (Lightning logs a batch's metrics at the steps before it:
# ess_train/callbacks/lightning_glue.logger_step), beside that batch's loss
EARLY_STEP = 200


def _hybrid_rows(data: Data) -> tuple[list[dict], int]:
    ids = [f"{o}_s{s}" for o in ("gla_first", "attention_first") for s in data.seeds_of(7)]
    return have(data, ids), len(ids)


def hybrid_ess_tracks_acc(data: Data) -> Result:
    rows, needed = _hybrid_rows(data)
    if len(rows) < needed:
        return pending(len(rows), needed)
    acc, ess = [value(r, "val_acc") for r in rows], [value(r, "ess_per_kv") for r in rows]
    rho = spearman(acc, ess)
    return Result(
        rho,
        spearman_p(acc, ess),
        len(rows),
        len(rows),
        needed,
        f"Spearman(accuracy, ESS per kv) {rho:+.2f}",
        {"kind": "correlation", "rho": rho, "n": len(rows), "per_seed": 2},
    )


def hybrid_early_ess(data: Data) -> Result:
    rows, needed = _hybrid_rows(data)
    if len(rows) < needed:
        return pending(len(rows), needed)
    step = EARLY_STEP
    early = [data.curves.get((r["run_id"], "ess/per_kv", step - 1), math.nan) for r in rows]
    if any(math.isnan(e) for e in early):
        return Result(needed=needed, done=len(rows), evidence=f"no ESS per kv at step {step} in the curves")
    orders = [r["run_id"].rsplit("_s", 1)[0] for r in rows]
    stat, p = stratified_spearman_p(early, [value(r, "val_acc") for r in rows], orders, n_perm=N_PERM)
    return Result(
        stat,
        p,
        len(rows),
        len(rows),
        needed,
        f"mean within-order Spearman(ESS per kv at step {step}, accuracy) {stat:+.2f}",
        {"kind": "correlation", "rho": stat, "n": len(rows) // 2, "strata": 2, "per_seed": 1},
    )


def hybrid_floor_attention(data: Data) -> Result:
    return paired(
        data,
        [f"attention_first_floor_s{s}" for s in data.seeds_of(7)],
        [f"attention_first_s{s}" for s in data.seeds_of(7)],
        lambda r: value(r, "val_acc"),
    )


def _slopes(data: Data) -> dict[str, dict[int, float]] | None:
    by: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in data.init:
        by.setdefault((r["family"], int(r["seed"])), []).append((float(r["tss"]), float(r["total_ess"])))
    if any((f, s) not in by for f in ("mamba", "gla") for s in designs.SEEDS_8):
        return None
    out: dict[str, dict[int, float]] = {"mamba": {}, "gla": {}}
    for (family, seed), pts in by.items():
        tss, ess = zip(*pts)
        out[family][seed] = float(np.polyfit(np.log(tss), np.log(ess), 1)[0])
    return out


def _slope_test(data: Data, diff: Callable[[dict, int], float], label: str) -> Result:
    s = _slopes(data)
    if s is None:
        return pending(0, len(designs.SEEDS_8), "seeds")
    d = np.array([diff(s, seed) for seed in designs.SEEDS_8])
    return Result(
        float(d.mean()),
        sign_flip_p(d),
        len(d),
        len(d),
        len(d),
        f"{label} {d.mean():+.2f} (seeds {d.min():+.2f} to {d.max():+.2f}); slopes S6 "
        f"{min(s['mamba'].values()):.2f}-{max(s['mamba'].values()):.2f}, GLA "
        f"{min(s['gla'].values()):.2f}-{max(s['gla'].values()):.2f}",
    )


def underuse_s6(data: Data) -> Result:
    return _slope_test(data, lambda s, seed: s["mamba"][seed] - 1, "S6 slope - 1")


def underuse_gla(data: Data) -> Result:
    return _slope_test(data, lambda s, seed: s["gla"][seed] - 1, "GLA slope - 1")


def s6_below_gla(data: Data) -> Result:
    return _slope_test(data, lambda s, seed: s["mamba"][seed] - s["gla"][seed], "slope S6 - GLA")


TESTS: dict[str, Callable[[Data], Result]] = {
    "beyond_kv": beyond_kv,
    "ess_vs_tss_per_kv": ess_vs_tss_per_kv,
    "collapse": collapse,
    "linear_attention_fills": linear_attention_fills,
    "floor_utilization": floor_utilization,
    "floor_accuracy": floor_accuracy,
    "decay_identity_trend": decay_identity_trend,
    "init_gla_gate": init_gla_gate,
    "init_mamba_dt": init_mamba_dt,
    "distill_below_ess": distill_below_ess,
    "delimiter_reset": delimiter_reset,
    "hybrid_ess_tracks_acc": hybrid_ess_tracks_acc,
    "hybrid_early_ess": hybrid_early_ess,
    "hybrid_floor_attention": hybrid_floor_attention,
    "underuse_s6": underuse_s6,
    "underuse_gla": underuse_gla,
    "s6_below_gla": s6_below_gla,
}


def compute(data: Data | None = None) -> dict[str, Result]:
    """Every registered test's :class:`Result` from the committed CSVs."""
    data = data or Data.load()
    return {name: test(data) for name, test in TESTS.items()}
