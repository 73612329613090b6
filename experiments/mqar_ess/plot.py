"""Study 1 figures and tables: Spearman correlation of MQAR accuracy with ESS per kv pair and TSS per kv pair.

Reads ``results/mqar_ess.csv`` (or ``--csv``), writes ``ess_vs_acc.png`` and ``tss_vs_acc.png`` beside it
(or into ``--out``) and prints markdown tables (also written to ``<out>/mqar_ess_tables.md``).

    PYTHONPATH=. .venv/bin/python experiments/mqar_ess/plot.py
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from experiments.common import read_rows  # noqa: E402

HERE = Path(__file__).resolve().parent


def _override(overrides: str, key: str) -> str | None:
    m = re.search(rf"(?:^|\s)\+?{re.escape(key)}=(\S+)", overrides)
    return m.group(1) if m else None


def load(csv_path: Path) -> list[dict]:
    """Finished rows with mixer, d_model, kv, seed, accuracy, ESS/kv and TSS/kv as numbers."""
    out = []
    for row in read_rows(csv_path):
        if row.get("error") or not row.get("val_acc"):
            continue
        ov = row["overrides"]
        kv = int(_override(ov, "task.num_kv_pairs"))
        tss = sum(float(v) for k, v in row.items() if k.startswith("ess/") and k.endswith("/tss") and v)
        ess = sum(float(v) for k, v in row.items() if k.startswith("ess/") and k.endswith("/total") and v)
        out.append(
            {
                "run_id": row["run_id"],
                "mixer": _override(ov, "model"),
                "d_model": int(_override(ov, "model.d_model")),
                "kv": kv,
                "seed": int(_override(ov, "seed") or 0),
                "acc": float(row["val_acc"]),
                "ess_per_kv": float(row["ess_per_kv"]) if row.get("ess_per_kv") else ess / kv,
                "ess_sum_per_kv": ess / kv,
                "tss_per_kv": tss / kv,
                "seconds": float(row.get("seconds") or "nan"),
            }
        )
    return out


def spearman(xs: list[float], ys: list[float]) -> tuple[float, float]:
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return math.nan, math.nan
    r = spearmanr(xs, ys)
    return float(r.statistic), float(r.pvalue)


def tables(rows: list[dict]) -> str:
    mixers = sorted({r["mixer"] for r in rows})
    lines = [
        "| group | n | acc range | rho(acc, ESS/kv) | p | rho(acc, TSS/kv) | p |",
        "|---|---|---|---|---|---|---|",
    ]
    kv_groups = [f"kv={k}" for k in sorted({r["kv"] for r in rows})]
    for name in ["all", *mixers, *kv_groups]:
        if name == "all":
            sub = rows
        elif name.startswith("kv="):  # fixed kv: ESS vs TSS without the shared 1/kv factor
            sub = [r for r in rows if r["kv"] == int(name[3:])]
        else:
            sub = [r for r in rows if r["mixer"] == name]
        acc = [r["acc"] for r in sub]
        re_, pe = spearman([r["ess_per_kv"] for r in sub], acc)
        rt, pt = spearman([r["tss_per_kv"] for r in sub], acc)
        lines.append(
            f"| {name} | {len(sub)} | {min(acc):.3f}-{max(acc):.3f} "
            f"| {re_:.2f} | {pe:.1e} | {rt:.2f} | {pt:.1e} |"
        )
    lines += ["", "Mean accuracy (over seeds) per mixer, d_model and kv pairs:", ""]
    widths = sorted({r["d_model"] for r in rows})
    kvs = sorted({r["kv"] for r in rows})
    lines.append(
        "| mixer | d_model | " + " | ".join(f"kv={k}" for k in kvs) + " | mean ESS/kv | TSS/kv (kv=2) |"
    )
    lines.append("|---|---|" + "---|" * len(kvs) + "---|---|")
    for m in mixers:
        for w in widths:
            sub = [r for r in rows if r["mixer"] == m and r["d_model"] == w]
            if not sub:
                continue
            cells = []
            for k in kvs:
                a = [r["acc"] for r in sub if r["kv"] == k]
                cells.append(f"{sum(a) / len(a):.3f}" if a else "-")
            ess = sum(r["ess_per_kv"] for r in sub) / len(sub)
            tss = [r["tss_per_kv"] for r in sub if r["kv"] == min(kvs)]
            lines.append(
                f"| {m} | {w} | " + " | ".join(cells) + f" | {ess:.2f} | {tss[0] if tss else math.nan:.0f} |"
            )
    total = sum(r["seconds"] for r in rows if math.isfinite(r["seconds"]))
    lines += ["", f"{len(rows)} runs, {total / 60:.1f} min of summed per-run training time."]
    return "\n".join(lines)


def scatter(rows: list[dict], key: str, label: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for m in sorted({r["mixer"] for r in rows}):
        sub = [r for r in rows if r["mixer"] == m]
        ax.scatter([r[key] for r in sub], [r["acc"] for r in sub], label=m, s=18, alpha=0.8)
    rho, _ = spearman([r[key] for r in rows], [r["acc"] for r in rows])
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("MQAR validation accuracy")
    ax.set_title(f"Spearman rho = {rho:.2f} (all runs)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=HERE / "results" / "mqar_ess.csv")
    parser.add_argument("--out", type=Path, default=None, help="figure directory (default: the CSV's)")
    args = parser.parse_args(argv)
    out = args.out or args.csv.parent
    out.mkdir(parents=True, exist_ok=True)
    rows = load(args.csv)
    if not rows:
        raise SystemExit(f"no finished rows in {args.csv}")
    paths = [out / "ess_vs_acc.png", out / "tss_vs_acc.png"]
    scatter(rows, "ess_per_kv", "ESS per kv pair (model total, entropy ESS)", paths[0])
    scatter(rows, "tss_per_kv", "TSS per kv pair (sum of layers)", paths[1])
    text = tables(rows)
    (out / "mqar_ess_tables.md").write_text(text + "\n")
    print(text)
    return paths


if __name__ == "__main__":
    main()
