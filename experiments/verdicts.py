"""The verdict table that opens ``experiments/RESULTS.md``: the registered tests, Holm-corrected.

Every claim the table decides is a test in a pre-registration (``experiments/prereg/NN_<name>.json``,
committed before its runs): its statistic, claimed direction and n. ``experiments/prereg/analysis.py``
computes each from the committed CSVs; this script corrects the p values over the whole family (Holm; a test
not yet run counts with p = 1) and writes one row per test, with the verdict decided by the rule below, so
that no verdict is written by hand:

- **holds**: Holm-adjusted p < 0.05 and the estimate in the claimed direction;
- **does not hold**: Holm-adjusted p < 0.05 and the estimate in the other direction;
- **cannot tell at this scale**: adjusted p >= 0.05 (every registered design can reach p below its Holm
  threshold: ``experiments/prereg/power.md``);
- **pending** (runs k of n) or **blocked** (with the reason) otherwise.

Under the table, each "cannot tell" gets its follow-up (``experiments/prereg/followup.py``: the n at the
observed effect, its runs, CPU hours and command). The exploratory studies that came before the
registrations follow as evidence only (no verdicts).

    PYTHONPATH=. .venv/bin/python experiments/verdicts.py            # print the tables
    PYTHONPATH=. .venv/bin/python experiments/verdicts.py --write    # replace them (and the studies' tables
                                                                     # included by name) in RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

from experiments.prereg import analysis, followup, registrations
from experiments.prereg.rule import ALPHA, CANNOT, HOLDS, NOT, decisions, verdict

__all__ = [
    "main",
    "table",
    "decisions",
    "registered_rows",
    "exploratory_rows",
    "render",
    "verdict",
    "load",
    "HOLDS",
    "NOT",
    "CANNOT",
]

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"
BEGIN, END = "<!-- verdicts:begin -->", "<!-- verdicts:end -->"
SOURCES = {
    "matched": HERE / "matched_tss" / "results" / "summary.json",
    "regularizers": HERE / "regularizers" / "results" / "summary.json",
    "init": HERE / "init_dose" / "results" / "summary.json",
    "distill": HERE / "distill_ess" / "results" / "summary.json",
    "delimiters": HERE / "delimiters" / "results" / "redesigned" / "summary.json",
    "hybrid": HERE / "hybrid_order" / "results" / "summary.json",
}


def _p(p: float) -> str:
    return "-" if math.isnan(p) else (f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}")


def registered_rows(results: dict[str, analysis.Result] | None = None) -> list[tuple[str, ...]]:
    """(design, claim, evidence, p, Holm p, verdict) per registered test."""
    results = results if results is not None else analysis.compute()
    decided = decisions(results)
    out = []
    for t in registrations.family():
        r, (adj, v) = results[t.id], decided[t.id]
        out.append(
            (
                str(t.design),
                t.claim,
                r.evidence + (f" (n {r.n})" if not r.pending else ""),
                _p(r.p),
                "-" if r.pending else _p(adj),
                v,
            )
        )
    return out


def ci(t: list[float], digits: int = 2) -> str:
    return f"{t[0]:+.{digits}f} [{t[1]:+.{digits}f}, {t[2]:+.{digits}f}]"


def span(values: list[float], digits: int = 2) -> str:
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


def load() -> dict[str, dict]:
    """The exploratory studies' ``summary.json`` files."""
    missing = [str(p) for p in SOURCES.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"run the studies' plot.py first; missing: {', '.join(missing)}")
    return {k: json.loads(p.read_text()) for k, p in SOURCES.items()}


def exploratory_rows(s: dict[str, dict]) -> list[tuple[str, str, str]]:
    """(claim, evidence, section) of the studies run before the registrations."""
    m1 = s["matched"]["study1"]
    pooled = m1["all TSS levels (pooled)"]
    levels = {k: v for k, v in m1.items() if k.startswith("TSS ")}
    m2 = s["matched"]["study2"]
    gated = [v["ratio"] for k, v in m2.items() if k.startswith(("gla/", "decayed_linear_attention/"))]
    la = {k: v for k, v in m2.items() if k.startswith("linear_attention/")}
    la_small = [v for k, v in la.items() if "/tss128/" in k]
    reg = s["regularizers"]
    fl = reg["floor"]
    decays = {k: v for k, v in reg.items() if k.startswith("decay_identity")}
    ini = s["init"]
    d = s["distill"]
    dl = s["delimiters"]
    h = s["hybrid"]
    rho_d, p_d, n_d = ini["dose_rho/all"]
    rho_h, p_h, n_h = h["rho"]["ESS per kv"]
    return [
        (
            "ESS per kv predicts MQAR accuracy better than TSS per kv (recurrences at matched TSS)",
            f"pooled over TSS levels (n {pooled['n']}): rho {pooled['rho_ess'][0]:.2f} vs {pooled['rho_tss'][0]:.2f}, "
            f"difference {ci(pooled['diff_ess_tss'])}, partial rho given TSS/kv {ci(pooled['partial_ess_given_tss'])}; "
            "within one TSS level: " + ", ".join(f"{k} {ci(v['diff_ess_tss'])}" for k, v in levels.items()),
            "1",
        ),
        (
            "state collapse for decaying recurrences; linear attention saturates",
            f"GLA and decayed LA: final / initial utilization {span(gated)}; linear attention "
            f"{span([v['ratio'] for v in la.values()])}x, at TSS 128 to {span([v['util'] for v in la_small])}",
            "2",
        ),
        (
            "the `floor` regularizer prevents collapse and improves recall",
            f"utilization floor - none {ci(fl['util_diff'])}; accuracy {ci(fl['diff'], 3)}, sign-flip p "
            f"{fl['p']:.2f} ({len(fl['seeds'])} pairs, the unregularized runs near chance)",
            "3",
        ),
        (
            "`decay_identity` improves recall",
            "; ".join(
                f"weight {k.rsplit('_w', 1)[1]}: accuracy {span(v['acc'], 3)}, minus none {ci(v['diff'], 3)}"
                for k, v in decays.items()
            ),
            "3",
        ),
        (
            "larger states are under-used at initialization (S6 vs GLA)",
            f"log-log slope of ESS on TSS at init (3 seeds): S6 {span(ini['init_slope_per_seed/mamba'])}, GLA "
            f"{span(ini['init_slope_per_seed/gla'])}",
            "4",
        ),
        (
            "an initialization with higher initial ESS trains better",
            f"Spearman(initial utilization, accuracy) {rho_d:.2f}, exact p {p_d:.3f}, n {n_d} (1 seed per dose)",
            "4",
        ),
        (
            "students below the teacher's ESS distil worse",
            "agreement below minus above, per teacher: "
            + ", ".join(f"{g:+.3f}" for g in d["gaps_per_teacher"].values())
            + f" (sign-flip p over {len(d['gaps_per_teacher'])} teachers {d['gap_sign_flip_p']:.2f})",
            "5",
        ),
        (
            "models that clear memory at delimiters do better where it matters",
            "norm ratio at the EOS: "
            + ", ".join(f"{m} {span(v['norm_ratio_eos'])}" for m, v in sorted(dl.items()))
            + "; accuracy on reused keys: "
            + ", ".join(f"{m} {span(v['acc_reused'])}" for m, v in sorted(dl.items())),
            "6",
        ),
        (
            "in a GLA + attention hybrid, ESS explains the effect of layer order",
            "accuracy "
            + ", ".join(f"{o} {span(v['acc'], 3)}" for o, v in h["orders"].items())
            + f"; Spearman(accuracy, ESS per kv) {rho_h:.2f}, exact p {p_h:.3f}, n {n_h}",
            "7",
        ),
    ]


def table(s: dict[str, dict], data: analysis.Data | None = None) -> str:
    data = data or analysis.Data.load()
    results = analysis.compute(data)
    undecided = [tid for tid, (_, v) in decisions(results).items() if v == CANNOT]
    lines = [
        BEGIN,
        f"Registered tests (Holm over all {len(registrations.family())}; a test not yet run counts with p = 1):",
        "",
        "| design | claim | evidence | p | Holm p | verdict |",
        "|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in registered_rows(results)]
    follow = followup.rows(data, results, undecided, ALPHA / len(registrations.family()))
    lines += ["", *follow] if follow else []
    figures = sorted((HERE / "prereg" / "results").glob("design*.png"))
    if figures:
        lines += ["", "Figures: " + ", ".join(f"[{p.stem}](prereg/results/{p.name})" for p in figures) + "."]
    lines += [
        "",
        "Exploratory studies before the registrations (evidence only, not tested; sections below):",
        "",
        "| claim | evidence (95 % intervals) | section |",
        "|---|---|---|",
    ]
    lines += [f"| {c} | {e} | {sec} |" for c, e, sec in exploratory_rows(s)]
    lines.append(END)
    return "\n".join(lines)


INCLUDE = re.compile(r"<!-- include: (?P<path>\S+) -->\n.*?<!-- /include -->", re.S)


def render(text: str, block: str) -> str:
    """``text`` with the verdict block replaced by ``block`` and every ``<!-- include: <path> -->`` ...
    ``<!-- /include -->`` section replaced by that file (a study's ``table.md``, relative to this folder)."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"{RESULTS_MD} has no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    text = head + block + tail

    def include(m: re.Match) -> str:
        body = (HERE / m["path"]).read_text().strip()
        body = re.sub(r"^## ", "#### ", body, flags=re.M)  # the tables' own titles sit below the section
        return f"<!-- include: {m['path']} -->\n{body}\n<!-- /include -->"

    return INCLUDE.sub(include, text)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help=f"replace the table in {RESULTS_MD.name}")
    args = p.parse_args(argv)
    block = table(load())
    if args.write:
        RESULTS_MD.write_text(render(RESULTS_MD.read_text(), block))
    print(block)
    return block


if __name__ == "__main__":
    main()
