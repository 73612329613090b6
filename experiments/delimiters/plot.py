"""Figures and table of study 5 from ``results/delim_modulation.csv`` and ``results/delim_profiles.json``.

PYTHONPATH=. .venv/bin/python experiments/delimiters/plot.py [--results DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.common import read_rows  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--results", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    res = args.results
    rows = read_rows(res / "delim_modulation.csv")
    prof = json.loads((res / "delim_profiles.json").read_text())
    offsets = prof["offsets"]
    layer_names = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith("modulation/")})
    md = [
        "| run | val acc | modulation (mean) | "
        + " | ".join(f"mod {n}" for n in layer_names)
        + " | "
        + " | ".join(f"ESS before→after {n}" for n in layer_names)
        + " |",
        "|---" * (3 + 2 * len(layer_names)) + "|",
    ]
    for r in rows:
        md.append(
            f"| {r['run_id']} | {float(r['val_acc']):.3f} | {float(r['modulation_mean']):.3f} | "
            + " | ".join(f"{float(r[f'modulation/{n}']):.3f}" for n in layer_names)
            + " | "
            + " | ".join(
                f"{float(r[f'ess_before/{n}']):.2f}→{float(r[f'ess_after/{n}']):.2f}" for n in layer_names
            )
            + " |"
        )
    # aligned profiles, averaged over seeds, per model and layer
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(layer_names) + 1, figsize=(5 * (len(layer_names) + 1), 4))
    for mi, m in enumerate(models):
        runs = [rid for rid in prof["runs"] if rid.rsplit("_s", 1)[0] == m]
        for li, n in enumerate(layer_names):
            curves = [prof["runs"][rid]["layers"][n]["aligned"] for rid in runs]
            avg = [mean(c[i] for c in curves) for i in range(len(offsets))]
            axes[li].plot(offsets, avg, "o-", color=f"C{mi}", label=m)
    for li, n in enumerate(layer_names):
        axes[li].axvline(0.5, color="k", ls=":", lw=1)
        axes[li].set_title(f"{n}: entropy-ESS around EOS")
        axes[li].set_xlabel("position - EOS index (EOS enters the past between 0 and +1)")
        axes[li].set_ylabel("ESS per operator")
        axes[li].set_yscale("log")
        axes[li].grid(alpha=0.3)
        axes[li].legend(fontsize=8)
    ax = axes[-1]
    for mi, m in enumerate(models):
        rs = [r for r in rows if r["model"] == m]
        ax.scatter(
            [float(r["modulation_mean"]) for r in rs],
            [float(r["val_acc"]) for r in rs],
            color=f"C{mi}",
            label=m,
            s=40,
        )
    ax.set_xlabel("modulation score (ESS[e] - ESS[e+1]) / ESS[e], mean of layers")
    ax.set_ylabel("validation accuracy")
    ax.set_title("modulation vs accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(res / "delim.png", dpi=110)
    plt.close(fig)
    # full profiles of seed-0 runs
    fig, axes = plt.subplots(1, len(layer_names), figsize=(6 * len(layer_names), 3.8))
    axes = axes if len(layer_names) > 1 else [axes]
    for mi, m in enumerate(models):
        rid = next((r for r in prof["runs"] if r.rsplit("_s", 1)[0] == m), None)
        if rid is None:
            continue
        run = prof["runs"][rid]
        for li, n in enumerate(layer_names):
            y = run["layers"][n]["profile"]
            axes[li].plot(range(1, len(y) + 1), y, color=f"C{mi}", label=rid)
    for li, n in enumerate(layer_names):
        for e in next(iter(prof["runs"].values()))["eos_positions"]:
            axes[li].axvline(e + 0.5, color="k", ls=":", lw=1)
        axes[li].set_title(f"{n}: ESS by position (dotted: EOS)")
        axes[li].set_xlabel("position i")
        axes[li].set_yscale("log")
        axes[li].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(res / "delim_profiles.png", dpi=110)
    plt.close(fig)
    (res / "table.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
