"""The registered designs' grids: ``run_id -> overrides`` per design, and the pilot rule of design 2.

Every run goes to one CSV (``results/runs.csv``), so a run two designs share (design 1's GLA runs at the
floor regime are design 2's unregularized arm) trains once. The registrations (``NN_<name>.json``) say what
each design tests; this module says which runs it needs. Seed-major order, so that an interrupted queue
holds whole seeds.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from experiments.matched_tss.run import family_kwargs, hybrid_overrides

__all__ = ["DESIGNS", "RESEEDABLE", "SEEDS", "points", "floor_kv", "FAMILIES", "KVS", "SEEDS_1", "SEEDS_2"]

FAMILIES = ["gla", "decayed_linear_attention", "linear_attention"]
TSS = 512  # per layer: 4 heads x d_k 8 x d_v 16, the same for the three families
KVS = [2, 4, 6, 8]
SEEDS_1 = list(range(6))
SEEDS_2 = list(range(24))
STEPS = 1500
PILOT_SEEDS = SEEDS_1[:4]
PILOT_RANGE = (0.3, 0.6)
GLA_LAYER = "model.blocks.1.mixer"
FLOOR = [
    "callbacks=regularized",
    f"+callbacks.regularizer.include=[{GLA_LAYER}]",
    "callbacks.regularizer.mode=floor",
    "callbacks.regularizer.weight=1.0",
    "+callbacks.regularizer.min_utilization=0.9",
]
DECAY_WEIGHTS = [1.0, 4.0, 20.0]
SEEDS_3 = list(range(6))
GATE_NORMALIZERS = [1, 2, 4, 8, 16, 64, 256]
DT_RANGES = [(1e-4, 1e-3), (1e-4, 1e-2), (1e-3, 1e-2), (1e-3, 1e-1), (1e-2, 1e-1), (1e-2, 1.0), (1e-1, 1.0)]
SEEDS_4 = list(range(4))
SEEDS_6 = list(range(8))
SEEDS_7 = list(range(4, 20))
SEEDS_8 = list(range(3, 15))  # design 8 (no training); seeds 0-2 are experiments/init_dose's
TEACHERS_5 = {  # teacher type -> (mixer after the short convolution, its kwargs; None: TSS 512 as in design 1)
    "linear_attention": ("linear_attention", None),
    "attention_rope": ("attention", "{num_heads:4,rotary:true}"),
    "gla": ("gla", None),
}
SEEDS_5 = list(range(4))
STUDENT_DKS = [1, 2, 4, 8, 16, 32, 64]
TEACHER_KV = 4
STUDENT_STEPS = 1000  # seeds 0-3 are the committed pilot (experiments/hybrid_order)


def _run(family: str, kv: int, seed: int, extra: Sequence[str] = (), kwargs: str | None = None) -> list[str]:
    return [
        *hybrid_overrides(
            family, kwargs or family_kwargs(family, TSS), [f"task.num_kv_pairs={kv}"], seed, STEPS
        ),
        *extra,
    ]


def design_1() -> dict[str, list[str]]:
    """ESS beyond kv (and collapse / saturation from the same runs): family x kv x 6 seeds at TSS 512."""
    return {
        f"{family}_kv{kv}_s{seed}": _run(family, kv, seed)
        for seed, kv, family in itertools.product(SEEDS_1, KVS, FAMILIES)
    }


def floor_kv(rows: Sequence[dict]) -> int | None:
    """The registered pilot rule: kv 4 when the unregularized GLA runs of seeds 0-3 at kv 4 average an
    accuracy in [0.3, 0.6]; otherwise the kv whose pilot mean is nearest 0.45. ``None`` until every pilot
    run of design 1's GLA cells is in ``rows``."""
    acc = {r["run_id"]: float(r["val_acc"]) for r in rows if not r.get("error")}
    means = {}
    for kv in KVS:
        ids = [f"gla_kv{kv}_s{s}" for s in PILOT_SEEDS]
        if not all(i in acc for i in ids):
            return None
        means[kv] = sum(acc[i] for i in ids) / len(ids)
    if PILOT_RANGE[0] <= means[4] <= PILOT_RANGE[1]:
        return 4
    return min(KVS, key=lambda kv: abs(means[kv] - sum(PILOT_RANGE) / 2))


def design_2(kv: int, seeds: Sequence[int] | None = None) -> dict[str, list[str]]:
    """``floor`` against none on GLA at the pilot's kv: 24 paired seeds (none = design 1's GLA runs)."""
    out = {}
    for seed in SEEDS_2 if seeds is None else seeds:
        out[f"gla_kv{kv}_s{seed}"] = _run("gla", kv, seed)
        out[f"floor_kv{kv}_s{seed}"] = _run("gla", kv, seed, FLOOR)
    return out


def design_3(kv: int, seeds: Sequence[int] | None = None) -> dict[str, list[str]]:
    """``decay_identity`` at weights 1, 4, 20 (0.03-1 % of the loss) in design 2's regime, 6 paired seeds."""
    out = {}
    for seed in SEEDS_3 if seeds is None else seeds:
        out[f"gla_kv{kv}_s{seed}"] = _run("gla", kv, seed)
        for w in DECAY_WEIGHTS:
            out[f"decay_w{w:g}_kv{kv}_s{seed}"] = _run(
                "gla",
                kv,
                seed,
                [
                    "callbacks=regularized",
                    f"+callbacks.regularizer.include=[{GLA_LAYER}]",
                    "callbacks.regularizer.mode=decay_identity",
                    f"callbacks.regularizer.weight={w:g}",
                ],
            )
    return out


def gate_doses(n: int) -> list[float]:
    """``n`` GLA gate normalizers evenly spaced in log over the registered range 1-256 (3 significant digits):
    a follow-up's doses of design 4's GLA test."""
    if n < 3:
        raise ValueError(f"a dose trend needs at least 3 doses, got {n}")
    return [float(f"{256 ** (i / (n - 1)):.3g}") for i in range(n)]


def gla_dose_id(g: float, kv: int, seed: int) -> str:
    return f"gla_g{g:g}_kv{kv}_s{seed}"


def _gla_dose(g: float, kv: int, seed: int) -> list[str]:
    return _run(
        "gla", kv, seed, kwargs=f"{{num_heads:4,expand_k:0.5,expand_v:1.0,gate_logit_normalizer:{g:g}}}"
    )


def design_4_gla(kv: int, normalizers: Sequence[float], seeds: Sequence[int]) -> dict[str, list[str]]:
    """Design 4's GLA grid at other doses and seeds (a follow-up of its GLA test)."""
    return {gla_dose_id(g, kv, s): _gla_dose(g, kv, s) for s in seeds for g in normalizers}


def design_4(kv: int) -> dict[str, list[str]]:
    """Initialization doses in design 2's regime: GLA gate normalizer (7) and Mamba dt range (7), 4 seeds."""
    out = {}
    for seed in SEEDS_4:
        for g in GATE_NORMALIZERS:
            out[gla_dose_id(g, kv, seed)] = _gla_dose(g, kv, seed)
        for lo, hi in DT_RANGES:
            kw = f"{{d_state:8,expand:1,dt_min:{lo:g},dt_max:{hi:g}}}"
            out[f"mamba_dt{lo:g}-{hi:g}_kv{kv}_s{seed}"] = _run("mamba", kv, seed, kwargs=kw)
    return out


# Design 4's amendment 1 (04_initialization_dose.json): Mamba's dose grid again, in a regime where it learns.
# Candidates in the pilot rule's order (cheapest first): name -> (kv, steps, d_state, expand).
MAMBA_REGIMES = {
    "kv2": (2, STEPS, 8, 1),
    "steps3000": (4, 3000, 8, 1),
    "state2048": (4, STEPS, 16, 2),
}
MAMBA_PILOT_SEEDS = [0, 1]
MAMBA_PILOT_DT = (1e-3, 1e-1)  # the layer's default range, the grid's middle dose
MAMBA_LEARNS_BY = 0.1  # "learns": pilot mean accuracy at least 1/kv + this (above guessing among kv values)
MAMBA_LEARNS_BELOW = 0.9  # and below this (room to move either way)


def mamba_id(regime: str, lo: float, hi: float, seed: int) -> str:
    return f"mamba_dt{lo:g}-{hi:g}_{regime}_s{seed}"


def _mamba(regime: str, lo: float, hi: float, seed: int) -> list[str]:
    kv, steps, d_state, expand = MAMBA_REGIMES[regime]
    kw = f"{{d_state:{d_state},expand:{expand},dt_min:{lo:g},dt_max:{hi:g}}}"
    return hybrid_overrides("mamba", kw, [f"task.num_kv_pairs={kv}"], seed, steps)


def design_4_mamba_pilot() -> dict[str, list[str]]:
    """Every candidate regime at the middle dose, seeds 0-1: what :func:`mamba_regime` chooses from."""
    return {
        mamba_id(regime, *MAMBA_PILOT_DT, seed): _mamba(regime, *MAMBA_PILOT_DT, seed)
        for seed in MAMBA_PILOT_SEEDS
        for regime in MAMBA_REGIMES
    }


def mamba_regime(rows: Sequence[dict]) -> str | None:
    """The amendment's pilot rule: the first candidate whose pilot mean accuracy is in [1/kv + 0.1, 0.9);
    if none, the one furthest above 1/kv. ``None`` until ``rows`` decide it (the pilot runs of every candidate
    up to the chosen one; of all of them when none learns)."""
    acc = {r["run_id"]: float(r["val_acc"]) for r in rows if not r.get("error")}
    acc = {k: (v if v == v else 0.0) for k, v in acc.items()}  # a NaN accuracy learned nothing
    above = {}
    for regime, (kv, *_) in MAMBA_REGIMES.items():
        ids = [mamba_id(regime, *MAMBA_PILOT_DT, s) for s in MAMBA_PILOT_SEEDS]
        if not all(i in acc for i in ids):
            return None
        mean = sum(acc[i] for i in ids) / len(ids)
        if 1 / kv + MAMBA_LEARNS_BY <= mean < MAMBA_LEARNS_BELOW:
            return regime
        above[regime] = mean - 1 / kv
    return max(above, key=above.get)


def design_4_mamba(regime: str) -> dict[str, list[str]]:
    """The amended Mamba grid: the 7 dt ranges x 4 seeds in ``regime`` (its pilot runs among them)."""
    return {mamba_id(regime, lo, hi, s): _mamba(regime, lo, hi, s) for s in SEEDS_4 for lo, hi in DT_RANGES}


def design_5_teachers() -> dict[str, list[str]]:
    """Design 5's teachers: 3 types x 4 seeds at kv 4, trained as design 1's runs, their checkpoints kept."""
    out = {}
    for seed in SEEDS_5:
        for name, (mixer, kw) in TEACHERS_5.items():
            out[f"teacher_{name}_s{seed}"] = hybrid_overrides(
                mixer,
                kw or family_kwargs(mixer, TSS),
                [f"task.num_kv_pairs={TEACHER_KV}"],
                seed,
                STEPS,
                keep_checkpoint=True,
            )
    return out


def design_5_students() -> dict[str, tuple[str, str, int]]:
    """``student run id -> (teacher run id, teacher's mixer, student d_k)``: GLA students (4 heads, d_v 16)
    of every d_k for every teacher, student seed = teacher seed."""
    return {
        f"{tid}_dk{d_k}": (tid, TEACHERS_5[tid.split("_", 1)[1].rsplit("_s", 1)[0]][0], d_k)
        for tid in design_5_teachers()
        for d_k in STUDENT_DKS
    }


def design_6(seeds: Sequence[int] | None = None) -> dict[str, list[str]]:
    """Delimited recall (experiments/delimiters' redesigned settings: conv + GLA, 1,000 steps, lr 3e-3), GLA
    with its gate shut at the EOS (``reset_token=-1``) against the same GLA with a free gate, 8 seeds each."""
    from experiments.delimiters.run import points as delimiter_points

    seeds = SEEDS_6 if seeds is None else seeds
    free = delimiter_points(False, 1000, seeds, lr=3e-3, hybrid=True, models=["gla"])
    out = {}
    for seed in seeds:
        out[f"delim_free_s{seed}"] = free[f"gla_s{seed}"]
        out[f"delim_reset_s{seed}"] = [*free[f"gla_s{seed}"], "+model.reset_token=-1"]
    return out


def design_7(seeds: Sequence[int] | None = None) -> dict[str, list[str]]:
    """Hybrid order from step 0 (16 new seeds per order) and ``floor`` on the attention layer of
    attention-first (16 paired seeds)."""
    common = [
        "model=gla",
        "+model.mixer_kwargs.attention={num_heads:4,rotary:true}",
        "task.num_kv_pairs=8",
        "logger=csv",
        "save_plots=false",
        "checkpoint=none",
    ]
    out = {}
    for seed in SEEDS_7 if seeds is None else seeds:
        out[f"gla_first_s{seed}"] = [*common, "model.mixer=[gla,attention]", f"seed={seed}"]
        out[f"attention_first_s{seed}"] = [*common, "model.mixer=[attention,gla]", f"seed={seed}"]
        out[f"attention_first_floor_s{seed}"] = [
            *common,
            "model.mixer=[attention,gla]",
            f"seed={seed}",
            "callbacks=regularized",
            "+callbacks.regularizer.include=[model.blocks.0.mixer]",
            "callbacks.regularizer.mode=floor",
            "callbacks.regularizer.weight=1.0",
            "+callbacks.regularizer.min_utilization=0.9",
        ]
    return out


DESIGNS = {
    1: "design_1",
    2: "design_2",
    3: "design_3",
    4: "design_4",
    5: "design_5",
    6: "design_6",
    7: "design_7",
}


# the designs whose seeds a follow-up can change (``points(seeds=...)``; design 4: its GLA grid, whose
# doses a follow-up can change too, ``points(doses=...)``) and their registered seeds
RESEEDABLE = (2, 3, 4, 6, 7)
SEEDS = {2: SEEDS_2, 3: SEEDS_3, 4: SEEDS_4, 6: SEEDS_6, 7: SEEDS_7}


def points(
    design: int, rows: Sequence[dict] = (), seeds: Sequence[int] | None = None, doses: int | None = None
) -> dict[str, list[str]]:
    """The trained runs of ``design`` (design 5: its teachers; designs 2-4 need design 1's pilot in ``rows``:
    empty until it is there); ``seeds`` replaces the registered seeds of a design in ``RESEEDABLE`` (design 4:
    its GLA grid alone, at ``doses`` gate normalizers, :func:`gate_doses`, or the registered 7)."""
    if seeds is not None and design not in RESEEDABLE:
        raise ValueError(
            f"design {design}'s seeds are fixed; a follow-up can change those of designs {RESEEDABLE}"
        )
    if doses is not None and (design != 4 or seeds is None):
        raise ValueError("doses apply to design 4's follow-up (with its seeds) only")
    if design == 1:
        return design_1()
    if design == 7:
        return design_7(seeds)
    if design == 5:
        return design_5_teachers()
    if design == 6:
        return design_6(seeds)
    kv = floor_kv(rows)
    if kv is None:
        return {}
    if design == 4 and seeds is not None:
        return design_4_gla(kv, gate_doses(doses) if doses else GATE_NORMALIZERS, seeds)
    if design == 4:  # the registered grid, the amendment's pilot, and its grid once the pilot has chosen
        regime = mamba_regime(rows)
        return {**design_4(kv), **design_4_mamba_pilot(), **(design_4_mamba(regime) if regime else {})}
    return {2: design_2, 3: design_3}[design](kv, seeds)
