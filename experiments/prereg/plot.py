"""Figures of the registered designs, from the committed CSVs; every title gives its n (runs so far).

- ``design1.png``: accuracy against the recurrent layer's final entropy-ESS, one panel per family, colour by kv
  (the within-cell association that the registered test ranks), and its final / initial utilization;
- ``design2.png``: accuracy and utilization with and without ``floor``, one line per paired seed;
- ``design3.png``: accuracy against ``decay_identity``'s weight, one line per seed, and the mean;
- ``design4.png``: accuracy against initial utilization per dose (GLA gate normalizer, Mamba dt range), runs
  and dose means (the registered test ranks the means);
- ``design5.png``: students' agreement with their teacher against student d_k, one panel per teacher type,
  one line per teacher, with each teacher's ESS per operator marked;
- ``design6.png``: accuracy by query type with the gate shut at the EOS and free, one point per run;
- ``design7.png``: accuracy against final ESS per kv and against ESS per kv at step 200, by layer order, and
  attention-first with and without ``floor`` on its attention layer, one line per paired seed;
- ``design8.png``: total ESS against TSS at initialization on log-log axes, one line per seed, with the
  slope-1 line (ESS growing as fast as the state).

    PYTHONPATH=. .venv/bin/python experiments/prereg/plot.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.prereg import designs  # noqa: E402
from experiments.prereg.analysis import EARLY_STEP  # noqa: E402
from experiments.prereg.data import LAYER, RESULTS, Data  # noqa: E402

__all__ = ["main"]
KV_COLOURS = {kv: c for kv, c in zip(designs.KVS, ["tab:blue", "tab:green", "tab:orange", "tab:red"])}


def _kv(run_id: str) -> int:
    return int(run_id.split("_kv")[1].split("_")[0])


def design_1(data: Data, path: Path) -> bool:
    rows = [data.runs[i] for i in designs.design_1() if i in data.runs]
    if not rows:
        return False
    fig, axes = plt.subplots(2, len(designs.FAMILIES), figsize=(4 * len(designs.FAMILIES), 7), squeeze=False)
    for j, family in enumerate(designs.FAMILIES):
        rs = [r for r in rows if r["run_id"].rsplit("_kv", 1)[0] == family]
        top, bottom = axes[0][j], axes[1][j]
        for r in rs:
            colour = KV_COLOURS[_kv(r["run_id"])]
            top.scatter(float(r[f"ess/{LAYER}/avg_entropy"]), float(r["val_acc"]), color=colour, s=18)
            bottom.plot(
                [0, 1],
                [float(r[f"ess/{LAYER}/initial_utilization"]), float(r[f"ess/{LAYER}/utilization"])],
                color=colour,
                alpha=0.6,
                marker="o",
                ms=3,
            )
        top.set_title(f"{family} (n = {len(rs)} runs)", fontsize=9)
        top.set_xlabel("final entropy-ESS of the recurrent layer")
        top.set_ylabel("validation accuracy")
        bottom.set_xticks([0, 1], ["initial", "final"])
        bottom.set_ylabel("utilization (ESS / rank bound)")
    for kv, colour in KV_COLOURS.items():
        axes[0][0].scatter([], [], color=colour, label=f"kv {kv}")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Design 1: TSS 512 per layer, {len(rows)} of {len(designs.design_1())} runs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def design_2(data: Data, path: Path) -> bool:
    kv = designs.floor_kv(list(data.runs.values()))
    if kv is None:
        return False
    pairs = [
        (data.runs[f"gla_kv{kv}_s{s}"], data.runs[f"floor_kv{kv}_s{s}"])
        for s in designs.SEEDS_2
        if f"gla_kv{kv}_s{s}" in data.runs and f"floor_kv{kv}_s{s}" in data.runs
    ]
    if not pairs:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    for ax, key, label in [
        (axes[0], "val_acc", "validation accuracy"),
        (axes[1], f"ess/{LAYER}/utilization", "final GLA utilization"),
    ]:
        for none, floor in pairs:
            ax.plot([0, 1], [float(none[key]), float(floor[key])], color="0.4", alpha=0.6, marker="o", ms=3)
        ax.set_xticks([0, 1], ["none", "floor"])
        ax.set_ylabel(label)
    fig.suptitle(f"Design 2: GLA at kv {kv}, {len(pairs)} of {len(designs.SEEDS_2)} pairs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _save(fig: plt.Figure, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _strip(ax: plt.Axes, x: float, ys: list[float], colour: str, label: str | None = None) -> None:
    """Points at ``x`` (spread a little so ties show) and their mean as a bar."""
    spread = np.linspace(-0.12, 0.12, len(ys)) if len(ys) > 1 else np.zeros(1)
    ax.scatter(x + spread, ys, color=colour, s=14, alpha=0.7, label=label)
    ax.hlines(np.mean(ys), x - 0.2, x + 0.2, color=colour, lw=2)


def design_3(data: Data, path: Path) -> bool:
    kv = designs.floor_kv(list(data.runs.values()))
    if kv is None:
        return False
    weights = [0.0, *designs.DECAY_WEIGHTS]
    ids = {
        (w, s): (f"gla_kv{kv}_s{s}" if w == 0 else f"decay_w{w:g}_kv{kv}_s{s}")
        for w in weights
        for s in designs.SEEDS_3
    }
    seeds = [s for s in designs.SEEDS_3 if all(ids[(w, s)] in data.runs for w in weights)]
    if not seeds:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.8))
    xs = range(len(weights))
    for s in seeds:
        ax.plot(
            xs,
            [float(data.runs[ids[(w, s)]]["val_acc"]) for w in weights],
            color="0.5",
            alpha=0.6,
            marker="o",
            ms=3,
        )
    means = [np.mean([float(data.runs[ids[(w, s)]]["val_acc"]) for s in seeds]) for w in weights]
    ax.plot(xs, means, color="k", lw=2, label="mean")
    ax.set_xticks(list(xs), [f"{w:g}" for w in weights])
    ax.set_xlabel("decay_identity weight (0: unregularized)")
    ax.set_ylabel("validation accuracy")
    ax.legend(fontsize=7)
    ax.set_title(
        f"Design 3: GLA at kv {kv}, n = {len(seeds)} of {len(designs.SEEDS_3)} paired seeds", fontsize=10
    )
    return _save(fig, path)


def design_4(data: Data, path: Path) -> bool:
    kv = designs.floor_kv(list(data.runs.values()))
    if kv is None:
        return False
    # Mamba: the amended regime's grid (what its test reads) once the pilot has chosen it
    regime = designs.mamba_regime(list(data.runs.values()))
    gla = {f"{g}": [f"gla_g{g}_kv{kv}_s{s}" for s in designs.SEEDS_4] for g in designs.GATE_NORMALIZERS}
    mamba = {
        f"{lo:g}-{hi:g}": [
            designs.mamba_id(regime, lo, hi, s) if regime else f"mamba_dt{lo:g}-{hi:g}_kv{kv}_s{s}"
            for s in designs.SEEDS_4
        ]
        for lo, hi in designs.DT_RANGES
    }
    mamba_label = f"Mamba dt range, amended regime {regime}" if regime else f"Mamba dt range, kv {kv}"
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    drawn = False
    for ax, doses, label, legend in [
        (axes[0], gla, f"GLA gate normalizer, kv {kv}", "normalizer"),
        (axes[1], mamba, mamba_label, "dt"),
    ]:
        runs = {d: [data.runs[i] for i in ids if i in data.runs] for d, ids in doses.items()}
        runs = {d: rs for d, rs in runs.items() if rs}
        colours = plt.cm.viridis(np.linspace(0, 0.9, len(doses)))
        for colour, (dose, rs) in zip(colours, runs.items()):
            util = [float(r[f"ess/{LAYER}/initial_utilization"]) for r in rs]
            acc = [float(r["val_acc"]) for r in rs]
            ax.scatter(util, acc, color=colour, s=14, alpha=0.6)
            ax.scatter(np.mean(util), np.mean(acc), color=colour, s=70, marker="D", edgecolor="k", label=dose)
            drawn = True
        guess_kv = designs.MAMBA_REGIMES[regime][0] if regime and legend == "dt" else kv
        ax.axhline(1 / guess_kv, color="0.5", ls="--", lw=1, label="guessing (1/kv)")
        ax.set_xlabel("initial utilization of the recurrent layer")
        ax.set_ylabel("validation accuracy")
        n = sum(len(rs) for rs in runs.values())
        ax.set_title(f"{label}: n = {n} runs, {len(runs)} doses", fontsize=9)
        if runs:
            ax.legend(fontsize=6, title=legend, title_fontsize=6)
    if not drawn:
        plt.close(fig)
        return False
    fig.suptitle("Design 4: initialization doses (diamonds: dose means)", fontsize=10)
    return _save(fig, path)


def design_5(data: Data, path: Path) -> bool:
    rows = [data.students[i] for i in designs.design_5_students() if i in data.students]
    if not rows:
        return False
    fig, axes = plt.subplots(
        1, len(designs.TEACHERS_5), figsize=(4 * len(designs.TEACHERS_5), 3.6), squeeze=False
    )
    for ax, name in zip(axes[0], designs.TEACHERS_5):
        teachers = [t for t in designs.design_5_teachers() if t.startswith(f"teacher_{name}_s")]
        n = 0
        for t, colour in zip(teachers, ["tab:blue", "tab:green", "tab:orange", "tab:red"]):
            rs = sorted((r for r in rows if r["run_id"].startswith(f"{t}_dk")), key=lambda r: int(r["d_k"]))
            if not rs:
                continue
            n += len(rs)
            ax.plot(
                [int(r["d_k"]) for r in rs],
                [float(r["agreement"]) for r in rs],
                color=colour,
                marker="o",
                ms=3,
                label=t.rsplit("_", 1)[1],
            )
            ax.axvline(float(rs[0]["teacher_ess_per_op"]), color=colour, ls="--", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("student d_k (dashed: the teacher's ESS per operator)")
        ax.set_ylabel("agreement with the teacher")
        ax.set_title(f"teacher {name}: n = {n} students", fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle(f"Design 5: GLA students, {len(rows)} of {len(designs.design_5_students())}", fontsize=10)
    return _save(fig, path)


def design_6(data: Data, path: Path) -> bool:
    arms = {
        arm: [data.runs[i] for i in designs.design_6() if i.startswith(f"delim_{arm}_") and i in data.runs]
        for arm in ("reset", "free")
    }
    if not all(arms.values()):
        return False
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for k, key in enumerate(["acc_fresh", "acc_reused", "acc_absent"]):
        for arm, colour, shift in [("reset", "tab:green", -0.22), ("free", "tab:grey", 0.22)]:
            label = (
                f"gate {'shut at the EOS' if arm == 'reset' else 'free'} (n = {len(arms[arm])})"
                if k == 0
                else None
            )
            _strip(ax, k + shift, [float(r[key]) for r in arms[arm]], colour, label)
    ax.set_xticks([0, 1, 2], ["fresh keys", "reused keys", "absent keys"])
    ax.set_ylabel("accuracy by query type")
    ax.legend(fontsize=7)
    ax.set_title("Design 6: conv + GLA on delimited recall (bars: means)", fontsize=10)
    return _save(fig, path)


def design_7(data: Data, path: Path) -> bool:
    orders = {"gla_first": "tab:green", "attention_first": "tab:purple"}
    rows = {o: [data.runs[f"{o}_s{s}"] for s in designs.SEEDS_7 if f"{o}_s{s}" in data.runs] for o in orders}
    if not any(rows.values()):
        return False
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for order, colour in orders.items():
        rs = rows[order]
        acc = [float(r["val_acc"]) for r in rs]
        axes[0].scatter(
            [float(r["ess_per_kv"]) for r in rs], acc, color=colour, s=16, label=f"{order} (n = {len(rs)})"
        )
        early = [
            (data.curves.get((r["run_id"], "ess/per_kv", EARLY_STEP - 1)), float(r["val_acc"])) for r in rs
        ]
        early = [(e, a) for e, a in early if e is not None]
        if early:
            axes[1].scatter(*zip(*early), color=colour, s=16, label=f"{order} (n = {len(early)})")
    axes[0].set_xlabel("final ESS per kv")
    axes[1].set_xlabel(f"ESS per kv at step {EARLY_STEP}")
    for ax in axes[:2]:
        ax.set_ylabel("validation accuracy")
        ax.legend(fontsize=7)
    pairs = [
        (data.runs[f"attention_first_s{s}"], data.runs[f"attention_first_floor_s{s}"])
        for s in designs.SEEDS_7
        if f"attention_first_s{s}" in data.runs and f"attention_first_floor_s{s}" in data.runs
    ]
    for none, floor in pairs:
        axes[2].plot(
            [0, 1],
            [float(none["val_acc"]), float(floor["val_acc"])],
            color="0.4",
            alpha=0.6,
            marker="o",
            ms=3,
        )
    axes[2].set_xticks([0, 1], ["none", "floor on attention"])
    axes[2].set_ylabel("validation accuracy")
    axes[2].set_title(f"attention-first: n = {len(pairs)} pairs", fontsize=9)
    fig.suptitle(
        f"Design 7: GLA + attention hybrid, kv 8, {sum(map(len, rows.values()))} of {2 * len(designs.SEEDS_7)} runs by order",
        fontsize=10,
    )
    return _save(fig, path)


def design_8(data: Data, path: Path) -> bool:
    if not data.init:
        return False
    fig, ax = plt.subplots(figsize=(5, 4))
    seeds = sorted({int(r["seed"]) for r in data.init})
    for family, colour in [("mamba", "tab:purple"), ("gla", "tab:green")]:
        for seed in seeds:
            pts = sorted(
                (float(r["tss"]), float(r["total_ess"]))
                for r in data.init
                if r["family"] == family and int(r["seed"]) == seed
            )
            ax.plot(
                *zip(*pts),
                color=colour,
                alpha=0.5,
                lw=1,
                label=("S6" if family == "mamba" else "GLA") if seed == seeds[0] else None,
            )
    tss = np.array(sorted({float(r["tss"]) for r in data.init}))
    start = float(
        np.exp(np.mean([np.log(float(r["total_ess"])) for r in data.init if float(r["tss"]) == tss[0]]))
    )
    ax.plot(tss, start * tss / tss[0], "k--", lw=1, label="slope 1 (ESS grows with the state)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(tss, [f"{t:g}" for t in tss])
    ax.minorticks_off()
    ax.set_yticks([200, 300, 500, 1000], ["200", "300", "500", "1000"])
    ax.set_xlabel("TSS of the layer")
    ax.set_ylabel("total ESS at initialization")
    ax.legend(fontsize=7)
    ax.set_title(f"Design 8: n = {len(seeds)} seeds per family", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(results: Path = RESULTS) -> list[Path]:
    data = Data.load(results)
    written = []
    figures = [design_1, design_2, design_3, design_4, design_5, design_6, design_7, design_8]
    for fig in figures:
        name = fig.__name__.replace("_", "")
        path = results / f"{name}.png"
        if fig(data, path):
            written.append(path)
            print(path)
    return written


if __name__ == "__main__":
    main()
