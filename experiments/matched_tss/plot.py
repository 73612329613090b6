"""Tables and figures of studies 1 and 2 (matched TSS) from ``results/runs.csv`` and ``results/runs_curves.csv``.

    PYTHONPATH=. .venv/bin/python experiments/matched_tss/plot.py [--results DIR]

Study 1: per TSS level and pooled, Spearman rho of accuracy with the recurrence layer's ESS per kv pair
(entropy and tolerance kinds) and with its TSS per kv pair, the difference of the two with a 95 % bootstrap
interval that resamples configurations (a configuration's seeds together), and the rank partial
correlation of accuracy and ESS/kv given TSS/kv. Softmax attention separately. Study 2: utilization at
initialization and at the end against kv and TSS, and the utilization curves. Writes ``table.md``,
``ess_vs_acc.png``, ``utilization.png``, ``curves.png`` and ``summary.json`` (the numbers RESULTS.md quotes).
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
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter  # noqa: E402

from experiments.common import read_rows, write_outputs  # noqa: E402
from experiments.stats import cluster_bootstrap_test, partial_spearman, spearman  # noqa: E402

HERE = Path(__file__).resolve().parent
LAYER = "blocks.1.mixer"
CHANCE = 1 / 64  # the app's MQAR: answers among the 64 value tokens
NAMES = {
    "gla": "GLA",
    "decayed_linear_attention": "decayed LA",
    "linear_attention": "linear attention",
    "attention": "softmax attention (RoPE, 4 heads)",
}
COLORS = {"gla": "C0", "decayed_linear_attention": "C1", "linear_attention": "C2", "attention": "C3"}
RUN_ID = re.compile(r"(?P<family>[a-z_]+?)(?:_tss(?P<tss>\d+))?_kv(?P<kv>\d+)_s(?P<seed>\d+)$")


def load(path: Path) -> list[dict]:
    """One dict per finished run: family, tss, kv, seed, acc, ESS/kv (both kinds), TSS/kv, utilizations."""
    out = []
    for r in read_rows(path):
        if r.get("error"):
            continue
        m = RUN_ID.match(r["run_id"])
        kv = int(m["kv"])
        total = float(r[f"ess/{LAYER}/total"])
        entropy = float(r[f"ess/{LAYER}/avg_entropy"])
        tolerance_total = float(r[f"ess/{LAYER}/avg_tolerance"]) * total / entropy if entropy > 0 else 0.0
        tss = int(r[f"ess/{LAYER}/tss"])
        out.append(
            {
                "run_id": r["run_id"],
                "family": m["family"],
                "tss": tss,
                "kv": kv,
                "seed": int(m["seed"]),
                "acc": float(r["val_acc"]),
                "ess_kv": total / kv,
                "tol_kv": tolerance_total / kv,
                "tss_kv": tss / kv,
                "util": float(r[f"ess/{LAYER}/utilization"]),
                "util0": float(r[f"ess/{LAYER}/initial_utilization"]),
                "ess_per_op": entropy,
                "flags": r.get(f"ess/{LAYER}/flags", ""),
            }
        )
    return out


def _config(r: dict) -> tuple:
    return r["family"], r["tss"], r["kv"]


def correlations(rows: list[dict]) -> dict:
    """rho(acc, ESS/kv), rho(acc, tolerance-ESS/kv), rho(acc, TSS/kv), their differences and the partial rho,
    each ``(estimate, low, high)`` over configurations."""

    def rho(key: str):
        return lambda rs: spearman([r[key] for r in rs], [r["acc"] for r in rs])

    def diff(key: str):
        return lambda rs: rho(key)(rs) - rho("tss_kv")(rs)

    def partial(rs: list[dict]) -> float:
        return partial_spearman([r["acc"] for r in rs], [r["ess_kv"] for r in rs], [r["tss_kv"] for r in rs])

    stats = {
        "rho_ess": rho("ess_kv"),
        "rho_tol": rho("tol_kv"),
        "rho_tss": rho("tss_kv"),
        "diff_ess_tss": diff("ess_kv"),
        "diff_tol_tss": diff("tol_kv"),
        "partial_ess_given_tss": partial,
    }
    tests = {name: cluster_bootstrap_test(fn, rows, _config) for name, fn in stats.items()}
    out: dict = {name: t[:3] for name, t in tests.items()}
    out["p"] = {name: t[3] for name, t in tests.items()}  # two-sided bootstrap p of each estimate's sign
    out["n"] = len(rows)
    return out


def _ci(t: tuple[float, float, float]) -> str:
    est, low, high = t
    return "n/a" if math.isnan(est) else f"{est:+.2f} [{low:+.2f}, {high:+.2f}]"


def tables(rows: list[dict]) -> tuple[str, dict]:
    rec = [r for r in rows if r["family"] != "attention"]
    groups = {f"TSS {t}": [r for r in rec if r["tss"] == t] for t in sorted({r["tss"] for r in rec})}
    groups["all TSS levels (pooled)"] = rec
    summary: dict = {"study1": {}, "study2": {}}
    md = [
        "## Study 1: ESS per kv against TSS per kv at matched TSS (recurrences, conv + mixer)",
        "",
        "rho: Spearman with accuracy; differences and partial rho with 95 % intervals from a bootstrap over "
        "configurations (family x TSS x kv, seeds kept together).",
        "",
        "| group | n | rho(acc, ESS/kv) | rho(acc, tol-ESS/kv) | rho(acc, TSS/kv) | rho_ESS - rho_TSS | "
        "rho_tolESS - rho_TSS | partial rho(acc, ESS/kv given TSS/kv) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in groups.items():
        if len(rs) < 4:
            continue
        c = correlations(rs)
        summary["study1"][name] = c
        md.append(
            f"| {name} | {c['n']} | {c['rho_ess'][0]:.2f} | {c['rho_tol'][0]:.2f} | {c['rho_tss'][0]:.2f} | "
            f"{_ci(c['diff_ess_tss'])} | {_ci(c['diff_tol_tss'])} | {_ci(c['partial_ess_given_tss'])} |"
        )
    att = [r for r in rows if r["family"] == "attention"]
    if att:
        summary["attention"] = {
            "n": len(att),
            "rho_ess": spearman([r["ess_kv"] for r in att], [r["acc"] for r in att]),
            "acc": {kv: [r["acc"] for r in att if r["kv"] == kv] for kv in sorted({r["kv"] for r in att})},
        }
        md += [
            "",
            f"Softmax attention (RoPE, 4 heads; TSS {att[0]['tss']} per layer, not matched): n = {len(att)}, "
            f"rho(acc, ESS/kv) = {summary['attention']['rho_ess']:.2f}.",
        ]
    md += [
        "",
        "## Runs (mean over seeds; [min, max])",
        "",
        "| mixer | TSS/layer | kv | seeds | val acc | ESS/kv | tol-ESS/kv | ESS per operator | utilization "
        "init -> end |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault(_config(r), []).append(r)
    for (family, tss, kv), rs in sorted(cells.items()):
        accs = [r["acc"] for r in rs]
        md.append(
            f"| {NAMES[family]} | {tss} | {kv} | {len(rs)} | {mean(accs):.3f} [{min(accs):.3f}, {max(accs):.3f}] "
            f"| {mean(r['ess_kv'] for r in rs):.1f} | {mean(r['tol_kv'] for r in rs):.1f} | "
            f"{mean(r['ess_per_op'] for r in rs):.2f} | {mean(r['util0'] for r in rs):.2f} -> "
            f"{mean(r['util'] for r in rs):.2f} |"
        )
        summary["study2"][f"{family}/tss{tss}/kv{kv}"] = {
            "acc": mean(accs),
            "util0": mean(r["util0"] for r in rs),
            "util": mean(r["util"] for r in rs),
            "ratio": mean(r["util"] / r["util0"] for r in rs if r["util0"] > 0),
        }
    return "\n".join(md) + "\n", summary


def _marker(r: dict) -> dict:
    """kv by marker shape, seed by fill: every run is told apart."""
    shape = {2: "o", 4: "s", 8: "^", 16: "D"}.get(r["kv"], "x")
    filled = r["seed"] % 2 == 0
    color = COLORS[r["family"]]
    return {"marker": shape, "color": color, "facecolor": color if filled else "none"}


def plot_scatter(rows: list[dict], path: Path) -> None:
    levels = sorted({r["tss"] for r in rows if r["family"] != "attention"})
    fig, axes = plt.subplots(2, len(levels), figsize=(4.2 * len(levels), 7.5), sharey=True, squeeze=False)
    for col, tss in enumerate(levels):
        rs = [r for r in rows if r["tss"] == tss]
        fams = ", ".join(NAMES[f] for f in sorted({r["family"] for r in rs}))
        for row, (key, label) in enumerate([("ess_kv", "ESS per kv pair"), ("tss_kv", "TSS per kv pair")]):
            ax = axes[row][col]
            for r in rs:
                m = _marker(r)
                ax.scatter(
                    r[key], r["acc"], marker=m["marker"], edgecolors=m["color"], facecolors=m["facecolor"]
                )
            ax.axhline(CHANCE, color="grey", ls=":", lw=1)
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(f"{label} (recurrence layer)")
            ax.set_title(f"TSS {tss} per layer: {fams}", fontsize=8)
            if col == 0:
                ax.set_ylabel("validation accuracy")
    handles = [
        plt.Line2D([], [], color=COLORS[f], marker="o", ls="", label=NAMES[f])
        for f in NAMES
        if f != "attention"
    ]
    kvs = sorted({r["kv"] for r in rows})
    handles += [
        plt.Line2D(
            [],
            [],
            color="k",
            marker=_marker({"kv": kv, "seed": 1, "family": "gla"})["marker"],
            ls="",
            mfc="none",
            label=f"kv {kv}",
        )
        for kv in kvs
    ]
    handles += [
        plt.Line2D([], [], color="k", marker="o", ls="", label="seed 0 (filled)"),
        plt.Line2D([], [], color="k", marker="o", ls="", mfc="none", label="seed 1 (open)"),
        plt.Line2D([], [], color="grey", ls=":", label="chance (1/64)"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8)
    fig.suptitle(
        f"Study 1: accuracy against ESS/kv (top) and TSS/kv (bottom) at matched TSS, n = {len(rows)} runs",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pooled(rows: list[dict], path: Path) -> None:
    """The headline's scatter: accuracy against ESS/kv and TSS/kv, all recurrences pooled over TSS levels."""
    rec = [r for r in rows if r["family"] != "attention"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), sharey=True)
    for ax, (key, label) in zip(axes, [("ess_kv", "ESS per kv pair"), ("tss_kv", "TSS per kv pair")]):
        rho = spearman([r[key] for r in rec], [r["acc"] for r in rec])
        for r in rec:
            m = _marker(r)
            ax.scatter(r[key], r["acc"], marker=m["marker"], edgecolors=m["color"], facecolors=m["facecolor"])
        ax.axhline(CHANCE, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"{label} (recurrence layer)")
        ax.set_title(f"{label}: Spearman rho {rho:.2f}, n = {len(rec)} runs", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy")
    handles = [
        plt.Line2D([], [], color=COLORS[f], marker="o", ls="", label=NAMES[f])
        for f in NAMES
        if f != "attention"
    ]
    handles += [
        plt.Line2D(
            [],
            [],
            color="k",
            marker=_marker({"kv": kv, "seed": 1, "family": "gla"})["marker"],
            ls="",
            mfc="none",
            label=f"kv {kv}",
        )
        for kv in sorted({r["kv"] for r in rec})
    ]
    handles.append(plt.Line2D([], [], color="grey", ls=":", label="chance (1/64)"))
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=8)
    levels = "/".join(str(t) for t in sorted({r["tss"] for r in rec}))
    fig.suptitle(f"Study 1, pooled over TSS {levels} per layer (filled: even seeds, open: odd)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_utilization(rows: list[dict], path: Path) -> None:
    fams = [f for f in NAMES if any(r["family"] == f for r in rows)]
    fig, axes = plt.subplots(1, len(fams), figsize=(4 * len(fams), 3.6), sharey=True, squeeze=False)
    for ax, fam in zip(axes[0], fams):
        rs = [r for r in rows if r["family"] == fam]
        for i, tss in enumerate(sorted({r["tss"] for r in rs})):
            for seed in sorted({r["seed"] for r in rs}):
                pts = sorted(
                    (r["kv"], r["util0"], r["util"]) for r in rs if r["tss"] == tss and r["seed"] == seed
                )
                ls = "-" if seed == 0 else "--"
                kvs = [p[0] for p in pts]
                ax.plot(
                    kvs, [p[2] for p in pts], ls, color=f"C{i}", marker="o", label=f"TSS {tss}, seed {seed}"
                )
                ax.plot(kvs, [p[1] for p in pts], ls, color=f"C{i}", marker="x", alpha=0.35)
        ax.axhline(1.0, color="grey", ls=":", lw=1, label="bound (ESS = TSS)")
        ax.set_xscale("log", base=2)
        kvs = sorted({r["kv"] for r in rs})
        ax.set_xticks(kvs, [str(k) for k in kvs])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("kv pairs")
        ax.set_title(f"conv + {NAMES[fam]}", fontsize=9)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("utilization (ESS / rank bound); x: init, o: end")
    fig.suptitle(
        "Study 2: utilization of the mixer layer at initialization (x, faint) and after training (o)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(curves_csv: Path, rows: list[dict], path: Path) -> None:
    metric = f"ess/model.{LAYER}/utilization"
    series: dict[str, list[tuple[int, float]]] = {}
    for c in read_rows(curves_csv):
        if c["metric"] == metric:
            series.setdefault(c["run_id"], []).append((int(c["step"]), float(c["value"])))
    fams = [f for f in NAMES if any(r["family"] == f for r in rows)]
    kvs = sorted({r["kv"] for r in rows})
    fig, axes = plt.subplots(
        len(kvs), len(fams), figsize=(4 * len(fams), 3 * len(kvs)), sharey=True, squeeze=False
    )
    for i, kv in enumerate(kvs):
        for j, fam in enumerate(fams):
            ax = axes[i][j]
            for r in rows:
                if r["family"] != fam or r["kv"] != kv or r["run_id"] not in series:
                    continue
                pts = sorted(series[r["run_id"]])
                color = f"C{sorted({x['tss'] for x in rows if x['family'] == fam}).index(r['tss'])}"
                ax.plot(
                    *zip(*pts),
                    "-" if r["seed"] == 0 else "--",
                    color=color,
                    label=f"TSS {r['tss']} s{r['seed']}",
                )
            ax.set_ylim(0, 1.05)
            ax.set_title(f"conv + {NAMES[fam]}, kv {kv}", fontsize=9)
            ax.set_xlabel("step")
            ax.legend(fontsize=6)
        axes[i][0].set_ylabel("utilization")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--csv", default="runs.csv")
    args = p.parse_args(argv)
    rows = load(args.results / args.csv)
    md, summary = tables(rows)
    plot_scatter(rows, args.results / "ess_vs_acc.png")
    plot_pooled(rows, args.results / "pooled.png")
    plot_utilization([r for r in rows], args.results / "utilization.png")
    curves = args.results / args.csv.replace(".csv", "_curves.csv")
    if curves.exists():
        plot_curves(curves, rows, args.results / "curves.png")
    write_outputs(args.results, md, summary)
    return summary


if __name__ == "__main__":
    main()
