"""Cost of ``ess_train.analyze`` on a tiny random model of each attention family measured by mechanism (2
layers, hidden 32, 4 query heads; ``benchmarks/tiny_families.py``), at L = 1024 with 16 positions, batch 1
(nothing downloaded). Prints, per family: ``analyze`` (forward, capture, first-capture exactness check, ESS),
the plain forward, and their ratio. Timings: best of ``--repeats``.

    python benchmarks/bench_families.py             # L = 1024, every family
    python benchmarks/bench_families.py --quick     # L = 128, three families
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import tiny_families  # noqa: E402
from benchmarks.timing import best_of  # noqa: E402
from ess_train import analyze  # noqa: E402


def row(family: str, L: int, positions: int, repeats: int) -> dict[str, object]:
    model = tiny_families.model(family, max_len=max(L, 256))
    ids = tiny_families.tokens(batch=1, length=L)
    with torch.no_grad():
        forward = best_of(lambda: model(ids, use_cache=False), repeats)
    report = None

    def run() -> None:
        nonlocal report
        report = analyze(model, ids, positions=positions)

    seconds = best_of(run, repeats)
    assert report is not None
    error = max((r.exactness_error or 0.0) for r in report.layers.values())
    return {
        "family": family,
        "layers": len(report.layers),
        "analyze": seconds,
        "forward": forward,
        "ratio": seconds / forward if forward > 0 else float("nan"),
        "error": error,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="L = 128, three families, one repeat")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--positions", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    families = ["gemma2", "bloom", "qwen2_moe"] if args.quick else tiny_families.FAMILIES
    L = 128 if args.quick else args.seq_len
    repeats = 1 if args.quick else args.repeats
    start = time.perf_counter()
    threads = torch.get_num_threads()
    print(f"analyze on tiny models, L = {L}, {args.positions} positions, batch 1, {threads} thread(s)")
    print()
    print("| family | attention layers | `analyze` (s) | forward (s) | ratio | max exactness error |")
    print("|---|---|---|---|---|---|")
    for family in families:
        r = row(family, L, args.positions, repeats)
        print(
            f"| {r['family']} | {r['layers']} | {r['analyze']:.3f} | {r['forward']:.4f} | {r['ratio']:.0f}x "
            f"| {r['error']:.1e} |"
        )
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
