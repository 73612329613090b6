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

from experiments.common import dump_json, read_rows  # noqa: E402

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
        "| run | val acc | acc fresh / reused / absent | stale (reused) | modulation (entropy) | dip (entropy) "
        "| dip (tolerance) | " + " | ".join(f"ESS before→after {n}" for n in layer_names) + " |",
        "|---" * (7 + len(layer_names)) + "|",
    ]
    for r in rows:
        md.append(
            f"| {r['run_id']} | {float(r['val_acc']):.3f} | {float(r['acc_fresh']):.3f} / "
            f"{float(r['acc_reused']):.3f} / {float(r['acc_absent']):.3f} | {float(r['stale_reused']):.3f} | "
            f"{float(r['modulation_mean']):.3f} | {float(r['dip_mean']):.3f} | {float(r['dip_tol_mean']):.3f} | "
            + " | ".join(
                f"{float(r[f'ess_before/{n}']):.2f}→{float(r[f'ess_after/{n}']):.2f}" for n in layer_names
            )
            + " |"
        )
    summary: dict = {}
    if rows and "norm_ratio_eos" in rows[0]:
        keys = ("norm_ratio_eos", "norm_ratio_other", "dip_tol_mean", "acc_reused", "stale_reused", "val_acc")
        summary = {
            m: {k: [float(r[k]) for r in rows if r["model"] == m] for k in keys}
            for m in {r["model"] for r in rows}
        }
        md += [
            "",
            "Per model over seeds (mean, [min, max]): the threshold-free reset measure ``norm_ratio_eos`` "
            "(||H_e|| / ||H_e-1|| at the EOS; ``norm_ratio_other``: the same step elsewhere), the tolerance "
            "dip, accuracy on reused keys and the share of stale answers.",
            "",
            "| model | seeds | norm ratio at EOS | norm ratio elsewhere | dip (tolerance) | acc reused | stale |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in sorted({r["model"] for r in rows}):
            rs = [r for r in rows if r["model"] == m]

            def cell(key: str, rs: list = rs) -> str:
                v = [float(r[key]) for r in rs]
                return f"{mean(v):.3g} [{min(v):.3g}, {max(v):.3g}]"

            md.append(
                f"| {m} | {len(rs)} | {cell('norm_ratio_eos')} | {cell('norm_ratio_other')} | "
                f"{cell('dip_tol_mean')} | {cell('acc_reused')} | {cell('stale_reused')} |"
            )
    md += [
        "",
        "modulation, dip: mean over the non-conv layers; ESS before→after: entropy-ESS at offsets 0 and +1; "
        f"tolerance-ESS threshold: {next(iter(prof['runs'].values()))['tol_rtol']} x the operator's largest "
        "singular value.",
    ]
    # panel titles name the layer's mixer(s) across the runs (layer 0 of a hybrid: the short convolution)
    kinds_of = {
        n: " / ".join(
            sorted({run["layers"][n]["mixer"] for run in prof["runs"].values() if n in run["layers"]})
        )
        for n in layer_names
    }
    # aligned profiles (entropy, tolerance), averaged over seeds, per model and layer
    models = sorted({r["model"] for r in rows})
    kinds = [("aligned", "entropy-ESS"), ("aligned_tol", "tolerance-ESS")]
    fig, axes = plt.subplots(2, len(layer_names) + 1, figsize=(5 * (len(layer_names) + 1), 8), squeeze=False)
    for ki, (key, label) in enumerate(kinds):
        for mi, m in enumerate(models):
            runs = [rid for rid in prof["runs"] if rid.rsplit("_s", 1)[0] == m]
            for li, n in enumerate(layer_names):
                curves = [prof["runs"][rid]["layers"][n][key] for rid in runs]
                avg = [mean(c[i] for c in curves) for i in range(len(offsets))]
                axes[ki][li].plot(offsets, avg, "o-", color=f"C{mi}", label=m)
        for li, n in enumerate(layer_names):
            ax = axes[ki][li]
            ax.axvline(0, color="k", ls=":", lw=1)
            ax.set_title(f"{n} ({kinds_of[n]})\n{label} around the EOS, mean over seeds", fontsize=9)
            ax.set_ylim(bottom=0)
            ax.set_xlabel("position - EOS index (offset 0: H_e, past = before the EOS)", fontsize=8)
            ax.set_ylabel(f"{label} per operator")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    scatters = [
        ("dip_tol_mean", "val_acc", "dip (tolerance-ESS) vs accuracy"),
        ("dip_tol_mean", "acc_reused", "dip (tolerance-ESS) vs accuracy on reused keys"),
    ]
    if rows and "norm_ratio_eos" in rows[0]:  # threshold-free: the norm ratio at the EOS
        scatters[1] = (
            "norm_ratio_eos",
            "acc_reused",
            "||H_e|| / ||H_e-1|| at the EOS vs accuracy on reused keys",
        )
    for ki, (xk, yk, title) in enumerate(scatters):
        ax = axes[ki][-1]
        for mi, m in enumerate(models):
            rs = [r for r in rows if r["model"] == m]
            ax.scatter([float(r[xk]) for r in rs], [float(r[yk]) for r in rs], color=f"C{mi}", label=m, s=40)
        if xk == "norm_ratio_eos":
            ax.set_xscale("log")
            ax.axvline(1.0, color="k", ls=":", lw=1)
            ax.set_xlabel("norm ratio at the EOS (log; 1: nothing damped; non-conv layers)", fontsize=8)
        else:
            ax.set_xlabel("dip = 1 - ESS[e] / max ESS[e-4..e-1] (non-conv layers)", fontsize=8)
        ax.set_ylabel(yk.replace("_", " "))
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(res / "delim.png", dpi=100)
    plt.close(fig)
    # full profiles of seed-0 runs (entropy, tolerance)
    fig, axes = plt.subplots(2, len(layer_names), figsize=(6 * len(layer_names), 7.6), squeeze=False)
    for ki, (key, label) in enumerate([("profile", "entropy-ESS"), ("profile_tol", "tolerance-ESS")]):
        for mi, m in enumerate(models):
            rid = next((r for r in prof["runs"] if r.rsplit("_s", 1)[0] == m), None)
            if rid is None:
                continue
            run = prof["runs"][rid]
            for li, n in enumerate(layer_names):
                y = run["layers"][n][key]
                axes[ki][li].plot(range(1, len(y) + 1), y, color=f"C{mi}", label=rid)
        for li, n in enumerate(layer_names):
            for e in next(iter(prof["runs"].values()))["eos_positions"]:
                axes[ki][li].axvline(e, color="k", ls=":", lw=1)
            axes[ki][li].set_title(
                f"{n} ({kinds_of[n]})\n{label} by position, seed 0 (dotted: EOS)", fontsize=9
            )
            axes[ki][li].set_xlabel("position i")
            axes[ki][li].set_ylabel(f"{label} per operator")
            axes[ki][li].set_ylim(bottom=0)
            axes[ki][li].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(res / "delim_profiles.png", dpi=100)
    plt.close(fig)
    (res / "table.md").write_text("\n".join(md) + "\n")
    if summary:
        dump_json(summary, res / "summary.json")
    print("\n".join(md))


if __name__ == "__main__":
    main()
