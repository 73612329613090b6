"""Table and figure of study 5 (distillation against the teacher's ESS) from ``results/students.csv``.

    PYTHONPATH=. .venv/bin/python experiments/distill_ess/plot.py [--results DIR]

Fidelity (top-1 agreement with the teacher; KL over the teacher's entropy) per teacher and student d_k; the
claim's test: students whose key width d_k (their per-operator ESS bound) lies below the teacher's ESS per
operator agree less with the teacher than those above it, with a bootstrap interval over teachers; and
whether d_k relative to the teacher's ESS orders fidelity better than d_k alone (Spearman, pooled). Writes
``table.md``, ``distill.png`` and ``summary.json``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from statistics import mean

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.common import read_rows, write_outputs  # noqa: E402
from experiments.stats import cluster_bootstrap, sign_flip_p, spearman  # noqa: E402

HERE = Path(__file__).resolve().parent


def load(path: Path) -> list[dict]:
    keys = (
        "agreement",
        "kl_over_entropy",
        "kl",
        "val_acc",
        "teacher_acc",
        "teacher_ess_per_op",
        "student_ess_per_op",
    )
    out = []
    for r in read_rows(path):
        if r.get("error"):
            continue
        row = {k: float(r[k]) for k in keys}
        row.update(
            teacher=r["teacher"], teacher_kv=int(r["teacher_kv"]), seed=int(r["seed"]), d_k=int(r["d_k"])
        )
        row["below"] = row["d_k"] < row["teacher_ess_per_op"]
        row["rel"] = row["d_k"] / row["teacher_ess_per_op"]
        out.append(row)
    return out


def teacher_gaps(rows: list[dict]) -> dict[str, float]:
    """Per teacher (with students on both sides): mean agreement of the students below its ESS per operator
    minus that of the students above it."""
    gaps = {}
    for t in sorted({r["teacher"] for r in rows}):
        rs = [r for r in rows if r["teacher"] == t]
        lo = [r["agreement"] for r in rs if r["below"]]
        hi = [r["agreement"] for r in rs if not r["below"]]
        if lo and hi:
            gaps[t] = mean(lo) - mean(hi)
    return gaps


def below_minus_above(rows: list[dict]) -> float:
    """:func:`teacher_gaps` averaged over teachers."""
    gaps = list(teacher_gaps(rows).values())
    return mean(gaps) if gaps else math.nan


def rel_minus_abs(rows: list[dict]) -> float:
    """rho(agreement, d_k / teacher ESS) - rho(agreement, d_k), pooled over teachers."""
    agree = [r["agreement"] for r in rows]
    return spearman([r["rel"] for r in rows], agree) - spearman([r["d_k"] for r in rows], agree)


def tables(rows: list[dict]) -> tuple[str, dict]:
    teacher_of = lambda r: r["teacher"]  # noqa: E731
    gap = cluster_bootstrap(below_minus_above, rows, teacher_of)
    rel = cluster_bootstrap(rel_minus_abs, rows, teacher_of)
    gaps = teacher_gaps(rows)
    summary = {
        "below_minus_above_agreement": gap,
        "gaps_per_teacher": gaps,
        # the unit of replication is the teacher: with few teachers only this exact test is honest
        "gap_sign_flip_p": sign_flip_p(list(gaps.values())),
        "rho_rel_minus_rho_dk": rel,
        "rho_agreement_dk": spearman([r["d_k"] for r in rows], [r["agreement"] for r in rows]),
        "rho_agreement_rel": spearman([r["rel"] for r in rows], [r["agreement"] for r in rows]),
        "teachers": {},
    }
    md = [
        "## Study 5: distillation into conv + GLA students (4 heads, d_v 16) against the teacher's ESS",
        "",
        "| teacher | teacher kv | teacher acc | teacher ESS/op | d_k | student ESS/op | agreement | KL / H(teacher) "
        "| student acc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["teacher_kv"], r["seed"], r["d_k"])):
        md.append(
            f"| {r['teacher']} | {r['teacher_kv']} | {r['teacher_acc']:.3f} | {r['teacher_ess_per_op']:.2f} | "
            f"{r['d_k']}{' (below)' if r['below'] else ''} | {r['student_ess_per_op']:.2f} | {r['agreement']:.3f} | "
            f"{r['kl_over_entropy']:.3f} | {r['val_acc']:.3f} |"
        )
        summary["teachers"].setdefault(
            r["teacher"], {"kv": r["teacher_kv"], "ess_per_op": r["teacher_ess_per_op"]}
        )
    md += [
        "",
        "Agreement of students below the teacher's ESS/op minus above, per teacher: "
        + ", ".join(f"{t} {g:+.3f}" for t, g in gaps.items())
        + f"; mean {gap[0]:+.3f}, exact sign-flip p over teachers {summary['gap_sign_flip_p']:.2f} "
        f"(a bootstrap over {len(gaps)} teachers gives [{gap[1]:+.3f}, {gap[2]:+.3f}], too few to mean much).",
        f"Spearman(agreement, d_k) = {summary['rho_agreement_dk']:.2f}; Spearman(agreement, d_k / teacher ESS) = "
        f"{summary['rho_agreement_rel']:.2f}; difference {rel[0]:+.2f} [{rel[1]:+.2f}, {rel[2]:+.2f}].",
    ]
    return "\n".join(md) + "\n", summary


def plot(rows: list[dict], path: Path) -> None:
    kvs = sorted({r["teacher_kv"] for r in rows})
    fig, axes = plt.subplots(2, len(kvs), figsize=(4.5 * len(kvs), 7), sharex=True, squeeze=False)
    for j, kv in enumerate(kvs):
        for seed in sorted({r["seed"] for r in rows if r["teacher_kv"] == kv}):
            rs = sorted(
                (r for r in rows if r["teacher_kv"] == kv and r["seed"] == seed), key=lambda r: r["d_k"]
            )
            ls = "-" if seed == 0 else "--"
            t_ess = rs[0]["teacher_ess_per_op"]
            for i, (key, label) in enumerate(
                [("agreement", "top-1 agreement"), ("kl_over_entropy", "KL / H(teacher)")]
            ):
                ax = axes[i][j]
                ax.plot(
                    [r["d_k"] for r in rs],
                    [r[key] for r in rs],
                    ls,
                    marker="o",
                    color=f"C{seed}",
                    label=f"teacher seed {seed} (ESS/op {t_ess:.2f})",
                )
                ax.axvline(t_ess, color=f"C{seed}", ls=":", lw=1)
                ax.set_ylabel(label)
                ax.set_xscale("log", base=2)
                ax.set_xticks([r["d_k"] for r in rs], [str(r["d_k"]) for r in rs])
                ax.set_title(f"conv + GLA teacher (kv {kv}) -> conv + GLA students", fontsize=9)
                ax.legend(fontsize=7)
        axes[0][j].axhline(1.0, color="grey", ls=":", lw=1)
        axes[1][j].axhline(0.0, color="grey", ls=":", lw=1)
        axes[1][j].set_xlabel("student d_k (dotted: teacher's ESS per operator)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--csv", default="students.csv")
    args = p.parse_args(argv)
    rows = load(args.results / args.csv)
    md, summary = tables(rows)
    plot(rows, args.results / "distill.png")
    write_outputs(args.results, md, summary)
    return summary


if __name__ == "__main__":
    main()
