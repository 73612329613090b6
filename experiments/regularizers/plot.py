"""Tables and figure of study 3 (regularizers) from ``results/runs.csv`` and ``results/runs_curves.csv``.

    PYTHONPATH=. .venv/bin/python experiments/regularizers/plot.py [--results DIR]

Per condition against ``none`` on the same seeds: the mean accuracy difference with a paired bootstrap 95 %
interval and the exact sign-flip p; the final utilization of the GLA layer; and, from the curves, the weighted
penalty at its first logged step against the training loss there (is the term comparable to the loss?).
Writes ``table.md``, ``regularizers.png`` and ``summary.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from statistics import mean

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.common import read_rows, write_outputs  # noqa: E402
from experiments.stats import paired_difference, sign_flip_p  # noqa: E402

HERE = Path(__file__).resolve().parent
LAYER = "blocks.1.mixer"
CHANCE = 1 / 64
WEIGHTS = {"none": 0.0, "floor": 1.0}


def weight_of(cond: str) -> float:
    return WEIGHTS.get(cond, float(cond.rsplit("_w", 1)[-1]) if "_w" in cond else 0.0)


def load(results: Path, csv_name: str) -> tuple[dict[str, dict[int, dict]], dict[str, dict[str, list]]]:
    """``{condition: {seed: row}}`` and ``{run_id: {metric: [(step, value)]}}``."""
    runs: dict[str, dict[int, dict]] = {}
    for r in read_rows(results / csv_name):
        if r.get("error"):
            continue
        cond, seed = r["run_id"].rsplit("_s", 1)
        runs.setdefault(cond, {})[int(seed)] = {
            "acc": float(r["val_acc"]),
            "util": float(r[f"ess/{LAYER}/utilization"]),
            "util0": float(r[f"ess/{LAYER}/initial_utilization"]),
        }
    curves: dict[str, dict[str, list]] = {}
    path = results / csv_name.replace(".csv", "_curves.csv")
    for c in read_rows(path):
        curves.setdefault(c["run_id"], {}).setdefault(c["metric"], []).append(
            (int(c["step"]), float(c["value"]))
        )
    for per_run in curves.values():
        for pts in per_run.values():
            pts.sort()
    return runs, curves


def first_terms(curves: dict, run_id: str, weight: float) -> tuple[float, float]:
    """(weighted penalty, training loss) at the penalty's first logged step (NaN when not logged)."""
    reg = curves.get(run_id, {}).get("ess/reg_loss", [])
    loss = dict(curves.get(run_id, {}).get("train/loss", []))
    if not reg:
        return float("nan"), float("nan")
    step, value = reg[0]
    return weight * value, loss.get(step, float("nan"))


def table(runs: dict, curves: dict) -> tuple[str, dict]:
    base = runs.get("none", {})
    md = [
        "## Study 3: ESS regularizers on conv + GLA (TSS 512), MQAR 8 kv pairs, 1,000 steps",
        "",
        "Differences are paired by seed against `none`; interval: paired bootstrap 95 %; p: exact sign-flip.",
        "",
        "| condition | seeds | val acc mean [min, max] | acc - none (95 % CI) | p | wins | GLA utilization init -> "
        "end | weighted penalty / train loss at the first penalized step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for cond, by_seed in runs.items():
        seeds = sorted(by_seed)
        accs = [by_seed[s]["acc"] for s in seeds]
        paired = [s for s in seeds if s in base]
        cell = p_cell = wins = "-"
        diff = (float("nan"),) * 3
        p = float("nan")
        if cond != "none" and paired:
            diffs = [by_seed[s]["acc"] - base[s]["acc"] for s in paired]
            diff = paired_difference([by_seed[s]["acc"] for s in paired], [base[s]["acc"] for s in paired])
            p = sign_flip_p(diffs)
            cell = f"{diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}]"
            p_cell = f"{p:.3f}"
            wins = f"{sum(d > 0 for d in diffs)}/{len(diffs)}"
        terms = [first_terms(curves, f"{cond}_s{s}", weight_of(cond)) for s in seeds]
        ratios = [t / loss for t, loss in terms if loss == loss and loss > 0]
        ratio = mean(ratios) if ratios else float("nan")
        md.append(
            f"| {cond} | {len(seeds)} | {mean(accs):.3f} [{min(accs):.3f}, {max(accs):.3f}] | {cell} | {p_cell} | "
            f"{wins} | {mean(by_seed[s]['util0'] for s in seeds):.2f} -> {mean(by_seed[s]['util'] for s in seeds):.2f}"
            f" | {'-' if ratio != ratio else f'{ratio:.3g}'} |"
        )
        util_diff = (
            paired_difference([by_seed[s]["util"] for s in paired], [base[s]["util"] for s in paired])
            if cond != "none" and paired
            else (float("nan"),) * 3
        )
        summary[cond] = {
            "seeds": seeds,
            "acc": accs,
            "diff": diff,
            "p": p,
            "util_diff": util_diff,
            "util": [by_seed[s]["util"] for s in seeds],
            "penalty_over_loss": ratio,
        }
    return "\n".join(md) + "\n", summary


def plot(runs: dict, curves: dict, path: Path) -> None:
    conds = list(runs)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    seeds = sorted({s for by in runs.values() for s in by})
    for s in seeds:
        xs = [i for i, c in enumerate(conds) if s in runs[c]]
        ax.plot(
            xs, [runs[conds[i]][s]["acc"] for i in xs], marker="os^Dv<>p"[s % 8], lw=0.8, label=f"seed {s}"
        )
    ax.axhline(CHANCE, color="grey", ls=":", label="chance (1/64)")
    ax.set_xticks(range(len(conds)), conds, rotation=20, fontsize=8)
    ax.set_ylabel("validation accuracy")
    ax.set_title("conv + GLA: accuracy per condition (lines join a seed)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    axes[1].axhline(0.9, color="k", ls="--", lw=0.8, label="floor target 0.9")
    for ax, metric, label in [
        (axes[1], f"ess/model.{LAYER}/utilization", "GLA utilization"),
        (axes[2], "train/loss", "training loss"),
    ]:
        for i, cond in enumerate(conds):
            for s in sorted(runs[cond]):
                pts = curves.get(f"{cond}_s{s}", {}).get(metric, [])
                if pts:
                    ax.plot(
                        *zip(*pts),
                        color=f"C{i}",
                        lw=0.8,
                        alpha=0.7,
                        label=cond if s == min(runs[cond]) else None,
                    )
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(f"conv + GLA: {label} (one line per seed)", fontsize=9)
        ax.legend(fontsize=7)
    axes[1].set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--csv", default="runs.csv")
    args = p.parse_args(argv)
    runs, curves = load(args.results, args.csv)
    md, summary = table(runs, curves)
    plot(runs, curves, args.results / "regularizers.png")
    write_outputs(args.results, md, summary)
    return summary


if __name__ == "__main__":
    main()
