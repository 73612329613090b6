"""Tables and figure of study 4 (initialization) from ``results/{init,bound,dose}.csv``.

    PYTHONPATH=. .venv/bin/python experiments/init_dose/plot.py [--results DIR]

The paper's test: total ESS against TSS for S6 and GLA at matched TSS ``64 N`` (L = 128), at initialization
(3 seeds, no training) and after training (the monitor's step-0 and final measurements), with the log-log
slope of ESS on TSS (1: ESS grows as fast as the state; 0: not at all). The dose: initial utilization
against final accuracy over GLA's gate normalizer and Mamba's dt range (Spearman, exact permutation p).
Writes ``table.md``, ``init_dose.png`` and ``summary.json``.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from statistics import mean

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ess_train.measure import position_bounds  # noqa: E402
from experiments.common import read_rows, write_outputs  # noqa: E402
from experiments.stats import spearman, spearman_p  # noqa: E402

HERE = Path(__file__).resolve().parent
LAYER = "blocks.1.mixer"
NAMES = {"mamba": "S6 (Mamba, expand 1)", "gla": "GLA (4 heads, d_v 16)"}
CHANCE_BOUND = 1 / 128  # vocabulary 256: answers among 128 value tokens
CHANCE_DOSE = 1 / 64


def slope(tss: list[float], ess: list[float]) -> float:
    """Least-squares slope of log ESS on log TSS."""
    if len(set(tss)) < 2:
        return math.nan
    return float(np.polyfit(np.log(tss), np.log(ess), 1)[0])


def full_use_ess(tss: float, seq_len: int = 128, d_model: int = 64) -> float:
    """Total ESS of a fully used layer of TSS ``d_model * N``: every one of its ``d_model`` operators at its
    rank bound ``min(N, i, L - i)`` at every position (the mean over positions, as total ESS is)."""
    n = round(tss / d_model)
    return d_model * sum(position_bounds(n, seq_len, None)) / seq_len


def trained_rows(path: Path) -> list[dict]:
    """One dict per finished run of a trained part; the layer's total ESS at step 0 comes from the curves
    (its ESS per kv pair times kv: utilization is relative to the per-position rank bound, not to TSS)."""
    first: dict[str, float] = {}
    for c in read_rows(path.with_name(path.stem + "_curves.csv")):
        if c["metric"] == f"ess/model.{LAYER}/per_kv" and int(c["step"]) == 0:
            first[c["run_id"]] = float(c["value"])
    out = []
    for r in read_rows(path):
        if r.get("error"):
            continue
        kv = int(re.search(r"task\.num_kv_pairs=(\d+)", r["overrides"])[1])
        out.append(
            {
                "run_id": r["run_id"],
                "family": r["run_id"].split("_", 1)[0],
                "acc": float(r["val_acc"]),
                "tss": float(r[f"ess/{LAYER}/tss"]),
                "ess0": first.get(r["run_id"], math.nan) * kv,
                "ess": float(r[f"ess/{LAYER}/total"]),
                "util0": float(r[f"ess/{LAYER}/initial_utilization"]),
                "util": float(r[f"ess/{LAYER}/utilization"]),
            }
        )
    return out


def _dose_label(run_id: str) -> str:
    m = re.match(r"gla_g(\d+)_s\d+", run_id)
    if m:
        return f"g={m[1]}"
    m = re.match(r"mamba_dt([\d.e-]+?)-([\d.e-]+)_", run_id)
    return f"dt {m[1]}-{m[2]}" if m else run_id


def tables(results: Path, suffix: str = "") -> tuple[str, dict]:
    summary: dict = {}
    md = [
        "## Study 4: ESS against TSS for S6 and GLA at matched TSS (L = 128), and initialization as a dose",
        "",
    ]
    init = read_rows(results / f"init{suffix}.csv")
    if init:
        md += [
            "### At initialization (no training; 3 seeds; 16 MQAR rows, all positions)",
            "",
            "| layer | N | TSS | ESS per operator | total ESS mean [min, max] | utilization |",
            "|---|---|---|---|---|---|",
        ]
        for fam in NAMES:
            rs = [r for r in init if r["family"] == fam]
            for n in sorted({int(r["N"]) for r in rs}):
                cell = [r for r in rs if int(r["N"]) == n]
                tot = [float(r["total_ess"]) for r in cell]
                md.append(
                    f"| {NAMES[fam]} | {n} | {cell[0]['tss']} | {mean(float(r['avg_entropy']) for r in cell):.2f} | "
                    f"{mean(tot):.0f} [{min(tot):.0f}, {max(tot):.0f}] | "
                    f"{mean(float(r['utilization']) for r in cell):.3f} |"
                )
            summary[f"init_slope/{fam}"] = slope(
                [float(r["tss"]) for r in rs], [float(r["total_ess"]) for r in rs]
            )
            summary[f"init_slope_per_seed/{fam}"] = [
                slope([float(r["tss"]) for r in by], [float(r["total_ess"]) for r in by])
                for sd in sorted({r["seed"] for r in rs})
                for by in [[r for r in rs if r["seed"] == sd]]
            ]
        sizes = sorted({float(r["tss"]) for r in init})
        seq_len = int(init[0]["seq_len"])
        summary["full_use_slope"] = slope(sizes, [full_use_ess(t, seq_len) for t in sizes])
        fams = [f for f in NAMES if summary.get(f"init_slope_per_seed/{f}")]
        md += [
            "",
            "log-log slope of total ESS on TSS at initialization (all seeds; range over seeds): "
            + ", ".join(
                f"{NAMES[f]} {summary[f'init_slope/{f}']:.2f} "
                f"({min(summary[f'init_slope_per_seed/{f}']):.2f}-{max(summary[f'init_slope_per_seed/{f}']):.2f})"
                for f in fams
            )
            + f"; a fully used state (every position at its rank bound min(N, i, L - i)) has slope "
            f"{summary['full_use_slope']:.3f}",
            "",
        ]
    bound = trained_rows(results / f"bound{suffix}.csv")
    if bound:
        md += [
            "### Trained (1,000 steps, MQAR 16 kv pairs, 1 seed): ESS at step 0 and at the end",
            "",
            "| run | TSS | val acc | total ESS init -> end | utilization init -> end |",
            "|---|---|---|---|---|",
        ]
        for r in sorted(bound, key=lambda r: (r["family"], r["tss"])):
            md.append(
                f"| {r['run_id']} | {r['tss']:.0f} | {r['acc']:.3f} | {r['ess0']:.0f} -> {r['ess']:.0f} | "
                f"{r['util0']:.3f} -> {r['util']:.3f} |"
            )
        for fam in NAMES:
            rs = [r for r in bound if r["family"] == fam]
            summary[f"trained_slope/{fam}"] = slope([r["tss"] for r in rs], [r["ess"] for r in rs])
        md += [
            "",
            "log-log slope of total ESS on TSS after training: "
            + ", ".join(f"{NAMES[f]} {summary[f'trained_slope/{f}']:.2f}" for f in NAMES),
            "",
        ]
    dose = trained_rows(results / f"dose{suffix}.csv")
    if dose:
        md += [
            "### Dose (MQAR L = 64, 8 kv pairs, 1,000 steps, seed 0)",
            "",
            "| run | initialization | initial utilization | final utilization | val acc |",
            "|---|---|---|---|---|",
        ]
        for r in dose:
            md.append(
                f"| {r['run_id']} | {_dose_label(r['run_id'])} | {r['util0']:.3f} | {r['util']:.3f} | "
                f"{r['acc']:.3f} |"
            )
        groups = {"all": dose, **{f: [r for r in dose if r["family"] == f] for f in NAMES}}
        md.append("")
        for name, rs in groups.items():
            x, y = [r["util0"] for r in rs], [r["acc"] for r in rs]
            rho, p = spearman(x, y), spearman_p(x, y)
            summary[f"dose_rho/{name}"] = (rho, p, len(rs))
            md.append(
                f"- {name}: Spearman(initial utilization, accuracy) = {rho:.2f} (exact p {p:.3f}, n {len(rs)})"
            )
    return "\n".join(md) + "\n", summary


def plot(results: Path, path: Path, suffix: str = "") -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    init = read_rows(results / f"init{suffix}.csv")
    ax = axes[0]
    for i, fam in enumerate(NAMES):
        rs = [r for r in init if r["family"] == fam]
        for seed in sorted({int(r["seed"]) for r in rs}):
            pts = sorted((float(r["tss"]), float(r["total_ess"])) for r in rs if int(r["seed"]) == seed)
            ax.plot(
                *zip(*pts), marker="os^"[seed % 3], color=f"C{i}", lw=0.8, label=f"{NAMES[fam]}, seed {seed}"
            )
    ax.set_title(f"at initialization: total ESS vs TSS (L = 128), n = {len(init)} layers", fontsize=9)
    bound = trained_rows(results / f"bound{suffix}.csv")
    ax = axes[1]
    for i, fam in enumerate(NAMES):
        rs = sorted((r for r in bound if r["family"] == fam), key=lambda r: r["tss"])
        if rs:
            ax.plot(
                [r["tss"] for r in rs],
                [r["ess0"] for r in rs],
                "x--",
                color=f"C{i}",
                label=f"{NAMES[fam]}, init",
            )
            ax.plot(
                [r["tss"] for r in rs],
                [r["ess"] for r in rs],
                "o-",
                color=f"C{i}",
                label=f"{NAMES[fam]}, trained",
            )
            for r in rs:
                ax.annotate(f"acc {r['acc']:.2f}", (r["tss"], r["ess"]), fontsize=6)
    ax.set_title(f"before (x) and after (o) 1,000 steps of MQAR (16 kv), n = {len(bound)} runs", fontsize=9)
    sizes = sorted({float(r["tss"]) for r in init}) or [64.0 * n for n in (4, 8, 16, 32)]
    seq_len = int(init[0]["seq_len"]) if init else 128
    for ax in axes[:2]:
        ax.plot(sizes, sizes, ":", color="lightgrey", label="ESS = TSS")
        ax.plot(
            sizes,
            [full_use_ess(t, seq_len) for t in sizes],
            "--",
            color="grey",
            label="full use (rank bound)",
        )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("TSS of the layer (64 N)")
        ax.set_ylabel("total ESS of the layer")
        ax.legend(fontsize=6)
    dose = trained_rows(results / f"dose{suffix}.csv")
    ax = axes[2]
    for i, fam in enumerate(NAMES):
        rs = [r for r in dose if r["family"] == fam]
        ax.scatter(
            [r["util0"] for r in rs], [r["acc"] for r in rs], color=f"C{i}", label=f"conv + {NAMES[fam]}"
        )
        for r in rs:
            ax.annotate(_dose_label(r["run_id"]), (r["util0"], r["acc"]), fontsize=7)
    ax.axhline(CHANCE_DOSE, color="grey", ls=":", label="chance (1/64)")
    ax.set_xlabel("utilization at initialization")
    ax.set_ylabel("validation accuracy after 1,000 steps")
    ax.set_title(f"dose: GLA gate normalizer g, Mamba dt range, n = {len(dose)} runs", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--smoke", action="store_true", help="read the smoke variant's CSVs (``*_smoke.csv``)")
    args = p.parse_args(argv)
    suffix = "_smoke" if args.smoke else ""
    md, summary = tables(args.results, suffix)
    plot(args.results, args.results / "init_dose.png", suffix)
    write_outputs(args.results, md, summary)
    return summary


if __name__ == "__main__":
    main()
