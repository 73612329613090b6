"""Figures and tables of study 3 from ``results/ess_at_init.csv`` and ``results/init_vs_default.csv``.

PYTHONPATH=. .venv/bin/python experiments/initialization/plot.py [--results DIR]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from statistics import mean, pstdev

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.common import read_rows  # noqa: E402

HERE = Path(__file__).resolve().parent
SWEEP_KEY = {"d_state": "kw_d_state", "head_dim": "kw_expand_k", "num_heads": "kw_num_heads"}


def _f(v) -> float:
    return float(v) if v not in (None, "") else float("nan")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--results", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    res = args.results
    md: list[str] = []
    a = read_rows(res / "ess_at_init.csv")
    if a:  # part (a) (absent from a part-(b)-only results folder, e.g. results/hybrid)
        md += [
            "## ESS at initialization (mean over 2 layers and seeds)",
            "",
            "| family | sweep | setting | per-op bound | TSS/layer | ESS/op | ESS/op / bound | total ESS | total/TSS |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        groups: dict[tuple, list] = defaultdict(list)
        for r in a:
            groups[(r["family"], r["sweep"], r[SWEEP_KEY[r["sweep"]]])].append(r)
        series: dict[tuple, list] = defaultdict(list)
        for (fam, sweep, setting), rs in groups.items():
            tss = _f(rs[0]["tss"])
            vals = {
                k: mean(_f(r[k]) for r in rs)
                for k in ("avg_entropy", "utilization", "total_ess", "total_over_tss")
            }
            series[(fam, sweep)].append((tss, vals))
            md.append(
                f"| {fam} | {sweep} | {setting} | {rs[0]['per_operator_bound']} | {tss:.0f} | "
                f"{vals['avg_entropy']:.2f} | {vals['utilization']:.3f} | {vals['total_ess']:.0f} | "
                f"{vals['total_over_tss']:.3f} |"
            )
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for (fam, sweep), pts in series.items():
            pts.sort(key=lambda t: t[0])
            x = [t for t, _ in pts]
            lab = f"{fam}: {sweep}"
            axes[0].plot(x, [v["total_ess"] for _, v in pts], "o-", label=lab)
            axes[1].plot(x, [v["total_over_tss"] for _, v in pts], "o-", label=lab)
            axes[2].plot(x, [v["utilization"] for _, v in pts], "o-", label=lab)
        lim = [
            min(min(t for t, _ in p) for p in series.values()),
            max(max(t for t, _ in p) for p in series.values()),
        ]
        axes[0].plot(lim, lim, "k:", lw=1, label="ESS = TSS")
        for ax, title in zip(
            axes, ["total ESS per layer", "total ESS / TSS", "per-operator ESS / per-operator bound"]
        ):
            ax.set_xscale("log")
            ax.set_xlabel("TSS per layer")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0].set_yscale("log")
        axes[0].legend(fontsize=8)
        fig.suptitle("Study 3a: entropy-ESS at initialization on MQAR inputs (L=64, 8 kv pairs)")
        fig.tight_layout()
        fig.savefig(res / "ess_at_init.png", dpi=110)
        plt.close(fig)

    b = [r for r in read_rows(res / "init_vs_default.csv") if not r.get("error")]
    md += [
        "",
        "## ESSInitializer vs default initialization (MQAR L=32, 4 kv pairs, fixed step budget)",
        "",
        "| model | init | steps | val acc (per seed) | mean | ESS/op layer0, layer1 (end) | utilization (end) |",
        "|---|---|---|---|---|---|---|",
    ]
    by: dict[tuple, list] = defaultdict(list)
    for r in b:
        m, init, _ = r["run_id"].rsplit("_", 2)
        by[(m, init)].append(r)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, ((m, init), rs) in enumerate(sorted(by.items())):
        accs = [_f(r["val_acc"]) for r in rs]
        ess = [mean(_f(r.get(f"ess/blocks.{k}.mixer/avg_entropy")) for r in rs) for k in (0, 1)]
        util = [mean(_f(r.get(f"ess/blocks.{k}.mixer/utilization")) for r in rs) for k in (0, 1)]
        md.append(
            f"| {m} | {init} | {rs[0]['steps']} | {', '.join(f'{x:.3f}' for x in accs)} | {mean(accs):.3f} | "
            f"{ess[0]:.2f}, {ess[1]:.2f} | {util[0]:.3f}, {util[1]:.3f} |"
        )
        ax.bar(
            i,
            mean(accs),
            yerr=pstdev(accs) if len(accs) > 1 else 0,
            color="C0" if init == "default" else "C1",
            alpha=0.7,
        )
        ax.plot([i] * len(accs), accs, "k.", ms=8)
    labels = [f"{m}\n{init}" for (m, init) in sorted(by)]
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("validation accuracy")
    ax.set_title("Study 3b: ESSInitializer vs default init")
    fig.tight_layout()
    fig.savefig(res / "init_vs_default.png", dpi=110)
    plt.close(fig)
    (res / "table.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
