"""Figures of the registered designs, from the committed CSVs; every title gives its n (runs so far).

- ``design1.png``: accuracy against the recurrent layer's final entropy-ESS, one panel per family, colour by kv
  (the within-cell association that the registered test ranks), and its final / initial utilization;
- ``design2.png``: accuracy and utilization with and without ``floor``, one line per paired seed;
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
    for name, fig in [("design1", design_1), ("design2", design_2), ("design8", design_8)]:
        path = results / f"{name}.png"
        if fig(data, path):
            written.append(path)
            print(path)
    return written


if __name__ == "__main__":
    main()
