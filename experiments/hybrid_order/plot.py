"""Figure and table of study 7 (hybrid layer order) from ``results/runs.csv``.

    PYTHONPATH=. .venv/bin/python experiments/hybrid_order/plot.py [--results DIR]

Per order: accuracy and each layer's final utilization and total ESS (mean [min, max] over seeds); over all
runs, Spearman correlations of accuracy with the model's ESS per kv pair and with each mixer's utilization
(p exact over all permutations for n <= 8, ``experiments.stats.spearman_p``; scipy's t approximation gave 0.028
where the exact p is 0.037), and a figure: accuracy by order (one marker per seed, chance line) and accuracy against ESS per kv.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from statistics import mean

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.common import dump_json, read_rows  # noqa: E402
from experiments.stats import spearman, spearman_p  # noqa: E402

HERE = Path(__file__).resolve().parent
CHANCE = 1 / 64  # MQAR with the app's vocabulary (128): answers drawn from the 64 value tokens
MARKERS = "osD^v<>p"


def _by_mixer(row: dict[str, str], key: str) -> dict[str, float]:
    """``{mixer class: value}`` of a per-layer ESS key (``utilization``, ``total``) in one run."""
    out = {}
    for col, value in row.items():
        if col.startswith("ess/") and col.endswith("/mixer"):
            layer = col.split("/")[1]
            out[value] = float(row[f"ess/{layer}/{key}"])
    return out


def _cell(values: list[float]) -> str:
    return f"{mean(values):.3g} [{min(values):.3g}, {max(values):.3g}]"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--csv", default="runs.csv")
    args = p.parse_args(argv)
    rows = [r for r in read_rows(args.results / args.csv) if not r.get("error")]
    orders = sorted({r["run_id"].rsplit("_s", 1)[0] for r in rows})
    mixers = sorted({m for r in rows for m in _by_mixer(r, "utilization")})
    md = [
        "| order | seeds | val acc | ESS per kv | "
        + " | ".join(f"{m} utilization | {m} total ESS" for m in mixers)
        + " |",
        "|---" * (4 + 2 * len(mixers)) + "|",
    ]
    for order in orders:
        rs = [r for r in rows if r["run_id"].rsplit("_s", 1)[0] == order]
        cells = [_cell([float(r["val_acc"]) for r in rs]), _cell([float(r["ess_per_kv"]) for r in rs])]
        for m in mixers:
            cells += [_cell([_by_mixer(r, k)[m] for r in rs]) for k in ("utilization", "total")]
        md.append(f"| {order} | {len(rs)} | " + " | ".join(cells) + " |")
    acc = [float(r["val_acc"]) for r in rows]
    md += ["", f"Spearman correlation with validation accuracy over all runs (n = {len(rows)}):", ""]
    predictors = {"ESS per kv": [float(r["ess_per_kv"]) for r in rows]}
    for m in mixers:
        predictors[f"{m} utilization"] = [_by_mixer(r, "utilization")[m] for r in rows]
    summary: dict = {"orders": {}, "rho": {}}
    for name, xs in predictors.items():
        rho, pval = spearman(xs, acc), spearman_p(xs, acc)
        md.append(f"- {name}: rho = {rho:.2f} (exact p = {pval:.2g})")
        summary["rho"][name] = (float(rho), float(pval), len(xs))
    summary["rho_within_order"] = {}
    for order in orders:
        rs = [r for r in rows if r["run_id"].rsplit("_s", 1)[0] == order]
        xs, ys = [float(r["ess_per_kv"]) for r in rs], [float(r["val_acc"]) for r in rs]
        summary["rho_within_order"][order] = (spearman(xs, ys), spearman_p(xs, ys), len(rs))
        md.append(f"- ESS per kv within {order}: rho = {spearman(xs, ys):.2f} (n = {len(rs)})")
        summary["orders"][order] = {
            "acc": [float(r["val_acc"]) for r in rs],
            "ess_per_kv": [float(r["ess_per_kv"]) for r in rs],
        }
    (args.results / "table.md").write_text("\n".join(md) + "\n")
    dump_json(summary, args.results / "summary.json")
    print("\n".join(md))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for oi, order in enumerate(orders):
        rs = sorted((r for r in rows if r["run_id"].rsplit("_s", 1)[0] == order), key=lambda r: r["run_id"])
        for si, r in enumerate(rs):
            seed = r["run_id"].rsplit("_s", 1)[1]
            kw = {"color": f"C{oi}", "marker": MARKERS[si % len(MARKERS)], "s": 50}
            axes[0].scatter(
                [oi + 0.06 * (si - 1.5)],
                [float(r["val_acc"])],
                label=f"seed {seed}" if oi == 0 else None,
                **kw,
            )
            axes[1].scatter([float(r["ess_per_kv"])], [float(r["val_acc"])], label=f"{order} s{seed}", **kw)
    axes[0].set_xticks(range(len(orders)), orders)
    axes[0].set_title(
        f"MQAR (8 kv pairs): accuracy by layer order (GLA + attention, RoPE, 4 heads), n = {len(rows)}",
        fontsize=9,
    )
    axes[1].set_title(
        f"accuracy against the model's ESS per kv pair (final), n = {len(rows)} runs", fontsize=9
    )
    axes[1].set_xlabel("ESS per kv pair (sum over layers of total entropy-ESS / kv)")
    for ax in axes:
        ax.axhline(CHANCE, color="k", ls=":", lw=1, label="chance (1/64)")
        ax.set_ylabel("validation accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.results / "hybrid_order.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
