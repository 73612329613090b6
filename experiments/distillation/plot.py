"""Figures and table of study 4 from ``results/distill.csv`` (and ``results/teachers.csv``).

PYTHONPATH=. .venv/bin/python experiments/distillation/plot.py [--results DIR]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.common import read_rows  # noqa: E402

HERE = Path(__file__).resolve().parent


def _f(v) -> float:
    return float(v) if v not in (None, "") else float("nan")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--results", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    res = args.results
    rows = read_rows(res / "distill.csv")
    by: dict[str, list] = defaultdict(list)
    for r in rows:
        by[r["teacher"]].append(r)
    md = [
        "## Teachers",
        "",
        "| teacher | val acc | ESS/op (entropy, mean of layers) | per-op bound | total ESS/layer | TSS/layer |",
        "|---|---|---|---|---|---|",
    ]
    for t, rs in by.items():
        if t == "none":
            continue
        r = rs[0]
        md.append(
            f"| {t} | {_f(r['teacher_acc']):.3f} | {_f(r['teacher_ess_per_op']):.2f} | {r.get('teacher_tss_per_op', '')} | "
            f"{_f(r['teacher_ess_total']):.0f} | {_f(r['teacher_tss']):.0f} |"
        )
    md += [
        "",
        "## Students (GLA, 1 head, d_v = 8; state size = TSS/layer = d_k x d_v)",
        "",
        "| teacher | d_k | student TSS | val KL(teacher‖student) | val acc | val CE | student ESS/op | student total ESS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t, rs in by.items():
        for r in sorted(rs, key=lambda r: int(r["d_k"])):
            md.append(
                f"| {t} | {r['d_k']} | {r['student_tss']} | {_f(r['val_kl']):.3f} | {_f(r['val_acc']):.3f} | "
                f"{_f(r['val_ce']):.3f} | {_f(r['student_ess_per_op']):.2f} | {_f(r['student_ess_total']):.0f} |"
            )
    md.append("")
    md.append(
        "(teacher `none`: CE-only control trained on the labels; its KL column is measured against the plain teacher.)"
    )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (t, rs) in enumerate(by.items()):
        rs = sorted(rs, key=lambda r: int(r["d_k"]))
        x = [int(r["d_k"]) for r in rs]
        axes[0].plot(x, [_f(r["val_kl"]) for r in rs], "o-", color=f"C{i}", label=f"teacher: {t}")
        axes[1].plot(x, [_f(r["val_acc"]) for r in rs], "o-", color=f"C{i}", label=f"teacher: {t}")
        if t != "none":
            te = _f(rs[0]["teacher_ess_per_op"])
            for ax in axes:
                ax.axvline(te, color=f"C{i}", ls="--", lw=1)
            axes[1].axhline(_f(rs[0]["teacher_acc"]), color=f"C{i}", ls=":", lw=1)
    axes[0].set_ylabel("validation KL(teacher || student) per answer")
    axes[1].set_ylabel("validation accuracy")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("student d_k (per-operator state; TSS/layer = 8 d_k)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        "Study 4: distillation vs student state (dashed: teacher ESS per operator; dotted: teacher acc)"
    )
    fig.tight_layout()
    fig.savefig(res / "distill.png", dpi=110)
    plt.close(fig)
    (res / "table.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
