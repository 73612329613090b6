"""Study 2 figures and table: ESS utilization and accuracy over training, with and without ESSRegularizer.

Reads ``results/collapse.csv`` and ``results/collapse_curves.csv`` (or ``--csv``; the curves file is
``<stem>_curves.csv`` beside it), writes ``collapse_curves.png`` (utilization, ESS per kv pair and
validation accuracy vs step, one colour per condition, one row per mixer) and ``collapse_final.png``
(final accuracy per condition), and prints a markdown table (also ``<out>/collapse_table.md``).

    PYTHONPATH=. .venv/bin/python experiments/collapse/plot.py
"""

from __future__ import annotations

import argparse
import math
import re
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.common import read_rows  # noqa: E402

HERE = Path(__file__).resolve().parent
CONDITIONS = ["none", "floor", "decay_identity"]
COLORS = {"none": "tab:red", "floor": "tab:blue", "decay_identity": "tab:green"}


def parse_run_id(run_id: str) -> tuple[str, str, int]:
    m = re.fullmatch(r"(.+)_(none|floor|decay_identity)_s(\d+)", run_id)
    if not m:
        raise ValueError(f"unexpected run id {run_id!r}")
    return m.group(1), m.group(2), int(m.group(3))


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def load_curves(path: Path, layer: str | None = None) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``run_id -> metric -> [(step, value)]``; per-layer utilizations are averaged into ``utilization``.

    ``layer`` (a substring such as ``blocks.1.mixer``): only that layer's utilization, and its ESS per kv pair
    in place of the model's ``ess/per_kv``."""
    raw: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for rec in read_rows(path):
        metric = rec["metric"]
        per_layer = "blocks." in metric
        if layer and (metric == "ess/per_kv" or (per_layer and layer not in metric)):
            continue
        if layer and per_layer and metric.endswith("/per_kv"):
            metric = "ess/per_kv"
        elif metric.endswith("/utilization"):
            metric = "utilization"
        raw[rec["run_id"]][metric][int(rec["step"])].append(float(rec["value"]))
    return {
        rid: {k: sorted((s, _mean(v)) for s, v in d.items()) for k, d in m.items()} for rid, m in raw.items()
    }


def table(rows: list[dict], curves: dict, layer: str | None = None) -> str:
    which = f"layer {layer}" if layer else "mean of layers"
    lines = [
        f"| mixer | condition | seeds | final acc (mean) | per seed | final utilization ({which}) | "
        "min utilization over training | final ESS/kv |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        mixer, cond, _ = parse_run_id(r["run_id"])
        groups[(mixer, cond)].append(r)
    for mixer in sorted({k[0] for k in groups}):
        for cond in CONDITIONS:
            sub = groups.get((mixer, cond))
            if not sub:
                continue
            acc = [float(r["val_acc"]) for r in sub]
            util = [
                _mean(
                    [
                        float(v)
                        for k, v in r.items()
                        if k.endswith("/utilization") and v and (not layer or layer in k)
                    ]
                )
                for r in sub
            ]
            mins = [
                min((v for _, v in curves.get(r["run_id"], {}).get("utilization", [])), default=math.nan)
                for r in sub
            ]
            kv_key = f"ess/{layer}/per_kv" if layer else "ess_per_kv"
            ess = [float(r[kv_key]) for r in sub if r.get(kv_key)]
            lines.append(
                f"| {mixer} | {cond} | {len(sub)} | {_mean(acc):.3f} | {', '.join(f'{a:.3f}' for a in acc)} "
                f"| {_mean(util):.3f} | {_mean(mins):.3f} | {_mean(ess):.2f} |"
            )
    total = sum(float(r.get("seconds") or 0) for r in rows)
    lines += ["", f"{len(rows)} runs, {total / 60:.1f} min of summed per-run training time."]
    return "\n".join(lines)


def plot_curves(rows: list[dict], curves: dict, path: Path, layer: str | None = None) -> None:
    mixers = sorted({parse_run_id(r["run_id"])[0] for r in rows})
    panels = [
        ("utilization", f"ESS utilization ({layer or 'mean of layers'})"),
        ("ess/per_kv", f"ESS per kv pair ({layer or 'model'})"),
        ("val/acc", "validation accuracy"),
    ]
    fig, axes = plt.subplots(
        len(mixers), len(panels), figsize=(4.2 * len(panels), 3.2 * len(mixers)), squeeze=False
    )
    for i, mixer in enumerate(mixers):
        for j, (key, label) in enumerate(panels):
            ax = axes[i][j]
            for r in rows:
                mx, cond, seed = parse_run_id(r["run_id"])
                pts = curves.get(r["run_id"], {}).get(key, [])
                if mx != mixer or not pts:
                    continue
                ax.plot(
                    [s for s, _ in pts],
                    [v for _, v in pts],
                    color=COLORS[cond],
                    alpha=0.85,
                    ls="-" if seed == 0 else "--",
                    label=cond if seed == 0 else None,
                    marker="." if key == "val/acc" else None,
                )
            ax.set_title(f"{mixer}: {label}", fontsize=9)
            ax.set_xlabel("step")
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_final(rows: list[dict], path: Path) -> None:
    mixers = sorted({parse_run_id(r["run_id"])[0] for r in rows})
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    width = 0.8 / len(CONDITIONS)
    for k, cond in enumerate(CONDITIONS):
        for i, mixer in enumerate(mixers):
            acc = [float(r["val_acc"]) for r in rows if parse_run_id(r["run_id"])[:2] == (mixer, cond)]
            if not acc:
                continue
            x = i + (k - 1) * width
            ax.bar(x, _mean(acc), width, color=COLORS[cond], label=cond if i == 0 else None)
            ax.scatter([x] * len(acc), acc, color="k", s=8, zorder=3)
    ax.set_xticks(range(len(mixers)), mixers)
    ax.set_ylabel("final validation accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=HERE / "results" / "collapse.csv")
    parser.add_argument("--out", type=Path, default=None, help="figure directory (default: the CSV's)")
    parser.add_argument(
        "--layer", default=None, help="one layer's utilization and ESS/kv only (e.g. blocks.1.mixer)"
    )
    args = parser.parse_args(argv)
    out = args.out or args.csv.parent
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in read_rows(args.csv) if not r.get("error") and r.get("val_acc")]
    if not rows:
        raise SystemExit(f"no finished rows in {args.csv}")
    curves = load_curves(args.csv.with_name(f"{args.csv.stem}_curves.csv"), args.layer)
    paths = [out / "collapse_curves.png", out / "collapse_final.png"]
    plot_curves(rows, curves, paths[0], args.layer)
    plot_final(rows, paths[1])
    text = table(rows, curves, args.layer)
    (out / "collapse_table.md").write_text(text + "\n")
    print(text)
    return paths


if __name__ == "__main__":
    main()
