"""The verdict table that opens ``experiments/RESULTS.md``, built from the studies' ``summary.json`` files.

Each study's ``plot.py`` recomputes its ``summary.json`` from the committed CSVs; this script turns those
numbers into one row per claim, with the verdict decided by a rule fixed before looking (so the wording cannot
drift from the numbers):

- an effect with a 95 % interval: **holds** when the interval excludes 0 in the claimed direction, **does not
  hold** when it excludes 0 in the other direction, **cannot tell at this scale** otherwise;
- a rank correlation with an exact p: the same with p < 0.05 in place of the interval.

    PYTHONPATH=. .venv/bin/python experiments/verdicts.py            # print the table
    PYTHONPATH=. .venv/bin/python experiments/verdicts.py --write    # replace it (and the studies' tables
                                                                     # included by name) in RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

__all__ = ["main", "table", "rows", "render", "by_interval", "by_p"]

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
HOLDS, NOT, CANNOT = "**holds**", "**does not hold**", "**cannot tell at this scale**"


def by_interval(ci: list[float], claimed_sign: int = 1) -> str:
    """The verdict of an effect ``(estimate, low, high)`` whose claimed sign is ``claimed_sign``."""
    _, low, high = ci
    if claimed_sign * low > 0 and claimed_sign * high > 0:
        return HOLDS
    if claimed_sign * low < 0 and claimed_sign * high < 0:
        return NOT
    return CANNOT


def by_p(rho: float, p: float, claimed_sign: int = 1) -> str:
    if p < 0.05:
        return HOLDS if rho * claimed_sign > 0 else NOT
    return CANNOT


def ci(t: list[float], digits: int = 2) -> str:
    return f"{t[0]:+.{digits}f} [{t[1]:+.{digits}f}, {t[2]:+.{digits}f}]"


def span(values: list[float], digits: int = 2) -> str:
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


def load() -> dict[str, dict]:
    missing = [str(p) for p in SOURCES.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"run the studies' plot.py first; missing: {', '.join(missing)}")
    return {k: json.loads(p.read_text()) for k, p in SOURCES.items()}


def rows(s: dict[str, dict]) -> list[tuple[str, str, str, str]]:
    """(claim, evidence, verdict, section) per claim."""
    out = []
    m1 = s["matched"]["study1"]
    pooled = m1["all TSS levels (pooled)"]
    levels = {k: v for k, v in m1.items() if k.startswith("TSS ")}
    within = [by_interval(v["diff_ess_tss"]) for v in levels.values()]
    out.append(
        (
            "ESS per kv predicts MQAR accuracy better than TSS per kv (recurrences at matched TSS)",
            f"pooled over TSS levels (n {pooled['n']}): rho {pooled['rho_ess'][0]:.2f} vs {pooled['rho_tss'][0]:.2f}, "
            f"difference {ci(pooled['diff_ess_tss'])}, partial rho given TSS/kv "
            f"{ci(pooled['partial_ess_given_tss'])}; within one TSS level (n {next(iter(levels.values()))['n']} each): "
            + ", ".join(f"{k} {ci(v['diff_ess_tss'])}" for k, v in levels.items())
            + f"; tolerance-ESS pooled {ci(pooled['diff_tol_tss'])}",
            f"pooled {by_interval(pooled['diff_ess_tss'])}; within a TSS level "
            f"{CANNOT if within.count(HOLDS) < len(within) else HOLDS} "
            f"({within.count(HOLDS)} of {len(within)} levels exclude 0)",
            "1",
        )
    )
    m2 = s["matched"]["study2"]

    def ratios(family: str) -> list[float]:
        return [v["ratio"] for k, v in m2.items() if k.startswith(f"{family}/")]

    gated = ratios("gla") + ratios("decayed_linear_attention")
    la = {k: v for k, v in m2.items() if k.startswith("linear_attention/")}
    la_small = [v for k, v in la.items() if "/tss128/" in k]
    collapse = HOLDS if max(gated) < 1 else (NOT if min(gated) >= 1 else CANNOT)
    out.append(
        (
            "state collapse: utilization falls in training for decaying recurrences; linear attention saturates",
            f"GLA and decayed LA: final / initial utilization {span(gated)} in every cell (deeper with larger TSS); "
            f"linear attention rises instead ({span([v['ratio'] for v in la.values()])}x), at TSS 128 to "
            f"{span([v['util'] for v in la_small])} (saturation)",
            f"collapse {collapse}; saturation of linear attention "
            f"{HOLDS if min(v['util'] for v in la_small) >= 0.9 else CANNOT}",
            "2",
        )
    )
    reg = s["regularizers"]
    fl = reg["floor"]
    out.append(
        (
            "the `floor` regularizer prevents collapse",
            f"GLA utilization at the end, floor - none: {ci(fl['util_diff'])} ({len(fl['seeds'])} paired seeds)",
            by_interval(fl["util_diff"]),
            "3",
        )
    )
    out.append(
        (
            "... and so improves recall",
            f"accuracy floor - none {ci(fl['diff'], 3)}, exact sign-flip p {fl['p']:.2f}, wins "
            f"{sum(a > b for a, b in zip(fl['acc'], reg['none']['acc']))} of {len(fl['acc'])}",
            by_interval(fl["diff"]),
            "3",
        )
    )
    decays = {k: v for k, v in reg.items() if k.startswith("decay_identity")}
    out.append(
        (
            "`decay_identity` (gates pulled to the identity) improves recall, at weights where its term matters",
            "; ".join(
                f"weight {k.rsplit('_w', 1)[1]}: penalty / loss {v['penalty_over_loss']:.2g} at the first step, "
                f"accuracy {span(v['acc'], 3)} (chance 0.016), minus none {ci(v['diff'], 3)}"
                for k, v in decays.items()
            ),
            " / ".join(by_interval(v["diff"]) for v in decays.values()),
            "3",
        )
    )
    ini = s["init"]
    out.append(
        (
            "larger states are under-used at initialization (S6 vs GLA at matched TSS, L = 128 >= 4N)",
            f"log-log slope of total ESS on TSS at init (N 4-32, 3 seeds): S6 {ini['init_slope/mamba']:.2f} "
            f"(seeds {span(ini['init_slope_per_seed/mamba'])}), GLA {ini['init_slope/gla']:.2f} "
            f"(seeds {span(ini['init_slope_per_seed/gla'])}); 1 = ESS grows as fast as the state. After 1,000 "
            f"steps (models still at chance on 16 pairs): S6 {ini['trained_slope/mamba']:.2f}, GLA "
            f"{ini['trained_slope/gla']:.2f}",
            "under-use "
            + (
                HOLDS
                if max(ini["init_slope_per_seed/mamba"] + ini["init_slope_per_seed/gla"]) < 1
                else CANNOT
            )
            + "; S6 under-uses more than GLA: "
            + (
                HOLDS
                if max(ini["init_slope_per_seed/mamba"]) < min(ini["init_slope_per_seed/gla"])
                else CANNOT
            ),
            "4",
        )
    )
    rho, p, n = ini["dose_rho/all"]
    out.append(
        (
            "an initialization with higher initial ESS trains better (dose: GLA gate normalizer, Mamba dt range)",
            f"Spearman(initial utilization, accuracy) {rho:.2f}, exact p {p:.3f}, n {n} (1 seed per dose)",
            by_p(rho, p),
            "4",
        )
    )
    d = s["distill"]
    out.append(
        (
            "students whose state is below the teacher's ESS distil worse",
            "top-1 agreement of students below the teacher's ESS per operator minus those above, per teacher: "
            + ", ".join(f"{g:+.3f}" for g in d["gaps_per_teacher"].values())
            + f" (exact sign-flip p over the {len(d['gaps_per_teacher'])} teachers {d['gap_sign_flip_p']:.2f}; "
            f"teachers' ESS/op {span([t['ess_per_op'] for t in d['teachers'].values()])}, so only d_k = 1 is "
            "below); 300-step first run: students did not fit",
            ("below worse for every teacher; " if max(d["gaps_per_teacher"].values()) < 0 else "")
            + by_p(d["below_minus_above_agreement"][0], d["gap_sign_flip_p"], -1),
            "5",
        )
    )
    dl = s["delimiters"]
    reset = {m: max(v["norm_ratio_eos"]) < 0.5 for m, v in dl.items()}
    resetting = [m for m, r in reset.items() if r]
    others = [m for m, r in reset.items() if not r]
    out.append(
        (
            "models that clear memory at delimiters do better where it matters",
            "norm ratio at the EOS: "
            + ", ".join(f"{m} {span(v['norm_ratio_eos'])}" for m, v in sorted(dl.items()))
            + "; accuracy on reused keys: "
            + ", ".join(f"{m} {span(v['acc_reused'])}" for m, v in sorted(dl.items())),
            f"among recurrences {HOLDS if all(min(dl[r]['acc_reused']) > max(dl['linear_attention']['acc_reused']) for r in resetting) else CANNOT}"
            f" ({', '.join(resetting)} reset); across families {NOT} (non-resetting "
            f"{', '.join(m for m in others if m != 'linear_attention')} is the most accurate)",
            "6",
        )
    )
    h = s["hybrid"]
    rho, p, n = h["rho"]["ESS per kv"]
    accs = {o: v["acc"] for o, v in h["orders"].items()}
    out.append(
        (
            "in a GLA + attention hybrid, ESS explains the effect of layer order (a new claim)",
            "accuracy "
            + ", ".join(f"{o} {span(a, 3)}" for o, a in accs.items())
            + f"; Spearman(accuracy, ESS per kv) {rho:.2f}, p {p:.2f}, n {n}",
            f"ESS tracks accuracy: {by_p(rho, p)}; cause or effect: {CANNOT}",
            "7",
        )
    )
    return out


def table(s: dict[str, dict]) -> str:
    lines = [
        BEGIN,
        "| claim | evidence (95 % intervals) | verdict | section |",
        "|---|---|---|---|",
    ]
    lines += [f"| {c} | {e} | {v} | {sec} |" for c, e, v, sec in rows(s)]
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
