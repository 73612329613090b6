"""Time the synthetic task generators: 100,000 examples each (MQAR at L=256 with 16 kv pairs,
vocab 8192 as in Zoology; MAD tasks at their MAD baselines; delimited recall at its defaults),
plus one full MQAR ``setup()`` (train + test + leakage check).

Usage: ``python benchmarks/bench_tasks.py [--n 100000] [--threads T] [--quick]`` (quick: 2,000 examples).
"""

from __future__ import annotations

import argparse
import time

import torch

from ess_train.tasks import build_task

CASES: list[tuple[str, dict]] = [
    ("mqar", dict(vocab_size=8192, seq_len=256, num_kv_pairs=16)),
    ("in_context_recall", {}),
    ("noisy_in_context_recall", {}),
    ("fuzzy_in_context_recall", {}),
    ("selective_copying", {}),
    ("compression", {}),
    ("memorization", {}),
    ("delimited_recall", {}),
]


def describe(kwargs: dict, dm) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    return shown or f"defaults (V={dm.vocab_size}, L={dm.seq_len})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=100_000, help="examples per task")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--quick", action="store_true", help="2,000 examples per task (seconds)")
    args = ap.parse_args()
    if args.quick:
        args.n = 2000
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.n:,} examples per task\n")
    print("| task | config | seconds | examples/s |\n|---|---|---:|---:|")
    for name, kw in CASES:
        dm = build_task(name, **kw)
        dm.generate_slice(0, 64, "warmup")
        t0 = time.perf_counter()
        x, y = dm.generate_slice(0, args.n, "train")
        dt = time.perf_counter() - t0
        assert x.shape == (args.n, dm.seq_len)
        print(f"| {name} | {describe(kw, dm)} | {dt:.2f} | {args.n / dt:,.0f} |")
    dm = build_task("mqar", vocab_size=8192, seq_len=256, num_kv_pairs=16, num_train=args.n, num_test=1000)
    t0 = time.perf_counter()
    dm.setup()
    dt = time.perf_counter() - t0
    print(
        f"| mqar setup() | train {args.n:,} + test 1,000 + leakage check | {dt:.2f} | "
        f"{(args.n + 1000) / dt:,.0f} |"
    )
    print(f"\nleakage report: {dm.leakage_report}")


if __name__ == "__main__":
    main()
