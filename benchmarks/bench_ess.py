"""ESS engine benchmark: Gramian entropy-ESS vs the obvious per-position SVD loop vs the eigvalsh floor.

    python benchmarks/bench_ess.py            # L in {256, 1024, 4096}, N in {16, 64}, 64 channels
    python benchmarks/bench_ess.py --quick    # seconds

Columns (all in one run, same process, same thread count):
- gramian: ``entropy_ess`` on a diagonal ``RecurrentOperator`` (Mamba-like decays), all positions,
  all channels, float32;
- obvious: a python loop of ``torch.linalg.svdvals(T[i:, :i])`` over positions on the dense ``T`` of
  one channel, scaled to all channels (its cost does not depend on N: measured once per L). Where a
  full run of one channel would take more than ``--obvious-budget`` seconds, it is estimated from a few
  positions (interpolated over all positions) and marked ``~``;
- floor: one batched ``torch.linalg.eigvalsh`` on ``[channels, L, N, N]`` (the last step of the
  Gramian path alone), in channel slices when the tensor exceeds 1 GiB (the CPU kernel loops over the
  batch, so the sum of slices is the same work);
- speedup = obvious / gramian, vs floor = gramian / floor.
Then, for a few positions (the training-time estimates of the regularizer: 16 of them, or L / 4), the
segment path against the full Gramian scan at the same positions (both exact; ``use_segments`` picks the
segment path there), forward and forward+backward, 16 channels, N = 16.
Then the dense path (softmax attention) at those few positions: crops planned to pad the SVD work at most
2x (the default) against one crop for all positions (``max_waste=inf``), forward and forward+backward.
Then the peak memory of the dense path at the largest L, measured in a subprocess (peak RSS, VmHWM after
resetting it, minus the RSS before) on its largest chunk of positions, which bounds the peak of a full run.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import subprocess
import sys
import time

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ess_train.ess.gramian as gramian  # noqa: E402
from ess_train.ess import DEFAULT_CHUNK_ELEMENTS, RecurrentOperator, entropy_ess  # noqa: E402
from ess_train.ess.dense import dense_hankel_singular_values, plan_dense_chunks  # noqa: E402
from ess_train.ess.measures import entropy_ess_from_singular_values  # noqa: E402


def make_operator(channels: int, L: int, N: int, seed: int = 0) -> RecurrentOperator:
    """Diagonal, input-dependent decays ``exp(-dt_t * A_n)`` (Mamba-like), float32."""
    g = torch.Generator().manual_seed(seed)
    A = torch.linspace(1.0, float(N), N)
    dt = torch.exp(torch.rand(channels, L, 1, generator=g) * math.log(100.0) + math.log(1e-3))
    a = torch.exp(-dt * A)
    b = torch.randn(channels, L, N, generator=g) * dt
    c = torch.randn(channels, L, N, generator=g)
    return RecurrentOperator(a, b, c)


def dense_T(op: RecurrentOperator, channel: int, block: int = 256) -> torch.Tensor:
    """``T`` of one channel, materialized by blocks of columns (bounded memory)."""
    one = RecurrentOperator(op.a[channel], op.b[channel], op.c[channel], validate=False)
    L = one.seq_len
    T = torch.empty(L, L)
    eye = torch.eye(L)
    for s0 in range(0, L, block):
        T[:, s0 : s0 + block] = one.apply(eye[:, s0 : s0 + block])
    return torch.tril(T)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def obvious_loop(T: torch.Tensor, positions) -> None:
    for i in positions:
        if i:
            torch.linalg.svdvals(T[i:, :i])


def obvious_seconds(T: torch.Tensor, budget_s: float) -> tuple[float, bool]:
    """Seconds for all positions of one channel; (value, estimated?)."""
    L = T.shape[-1]
    # a few positions spread over the sequence, interpolated (cost peaks around L / 2)
    sample = sorted(
        {max(1, min(L - 1, round(L * f))) for f in (0.02, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 0.98)}
    )
    per = []
    for i in sample:
        per.append(timed(lambda i=i: obvious_loop(T, [i])))
    est = 0.0
    pts = [(0, 0.0), *zip(sample, per), (L, 0.0)]
    for (i0, t0), (i1, t1) in zip(pts[:-1], pts[1:]):
        est += 0.5 * (t0 + t1) * (i1 - i0)
    if est > budget_s:
        return est, True
    return timed(lambda: obvious_loop(T, range(L))), False


def floor_seconds(channels: int, L: int, N: int) -> float:
    g = torch.Generator().manual_seed(1)
    per_slice = max(1, min(channels, (1 << 28) // (L * N * N)))
    total = 0.0
    for c0 in range(0, channels, per_slice):
        n = min(per_slice, channels - c0)
        X = torch.randn(n, L, N, N, generator=g)
        X = X + X.mT
        total += timed(lambda X=X: torch.linalg.eigvalsh(X))
        del X
    return total


def fmt_s(x: float, est: bool = False) -> str:
    s = f"{x:.3g}s" if x < 600 else f"{x / 60:.3g}min" if x < 36000 else f"{x / 3600:.3g}h"
    return ("~" if est else "") + s


MEM_SNIPPET = r"""
import ctypes
import torch
torch.set_num_threads({threads})
from ess_train.ess import DenseOperator, hankel_singular_values


def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


L = {L}
op = DenseOperator(torch.randn(L, L).tril_(), validate=False)
hankel_singular_values(op, [1])  # warm-up: allocator, LAPACK
ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back: they would hide new allocations
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
before = status("VmRSS")
hankel_singular_values(op, {positions})
print(status("VmHWM") - before)
"""


def dense_peak_memory(L: int, threads: int) -> tuple[int, list[int]]:
    """Peak RSS increase (bytes) of the dense path on its largest chunk of positions at length L."""
    budget = DEFAULT_CHUNK_ELEMENTS
    chunks = plan_dense_chunks(list(range(L)), L, budget)
    lo, hi = max(chunks, key=lambda c: c[1] - c[0] if (c[0] <= L // 2 < c[1]) else -1)
    positions = list(range(lo, hi))
    code = MEM_SNIPPET.format(L=L, threads=threads, positions=positions)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    return int(out.stdout.strip().splitlines()[-1]), positions


def segment_vs_scan(Ls: list[int], channels: int = 16, N: int = 16, reps: int = 3) -> None:
    """Table: the segment path against the full scan at the same few positions (best of ``reps``)."""
    print(f"\nfew positions, {channels} channels, N={N}, float32: segment path vs full scan (best of {reps})")
    header = (
        f"{'L':>5} {'positions':>9} | {'scan fwd':>9} {'segments':>9} {'x':>6} | "
        f"{'scan f+b':>9} {'segments':>9} {'x':>6}"
    )
    print(header)
    print("-" * len(header))
    real = gramian.use_segments
    try:
        for L in Ls:
            op = make_operator(channels, L, N)
            leaves = [x.clone().requires_grad_() for x in (op.a, op.b, op.c)]
            for n_pos in sorted({16, L // 4}):
                pos = torch.linspace(1, L - 1, n_pos).round().long().unique()
                row = {}
                for name, force in (("scan", False), ("segments", True)):
                    gramian.use_segments = lambda n, L, force=force: force  # noqa: E731

                    def fwd(leaves: list[torch.Tensor] = leaves, pos: torch.Tensor = pos) -> None:
                        with torch.no_grad():
                            entropy_ess(RecurrentOperator(*leaves, validate=False), pos)

                    def fwd_bwd(leaves: list[torch.Tensor] = leaves, pos: torch.Tensor = pos) -> None:
                        entropy_ess(RecurrentOperator(*leaves, validate=False), pos).sum().backward()

                    fwd()
                    row[name] = (
                        min(timed(fwd) for _ in range(reps)),
                        min(timed(fwd_bwd) for _ in range(reps)),
                    )
                (sf, sb), (gf, gb) = row["scan"], row["segments"]
                print(
                    f"{L:>5} {len(pos):>9} | {fmt_s(sf):>9} {fmt_s(gf):>9} {sf / gf:>5.1f}x | "
                    f"{fmt_s(sb):>9} {fmt_s(gb):>9} {sb / gb:>5.1f}x"
                )
    finally:
        gramian.use_segments = real


def dense_entropy(T0: torch.Tensor, pos: torch.Tensor, max_waste: float, backward: bool) -> None:
    """Entropy-ESS of a dense ``T0 [ops, L, L]`` at ``pos`` (and its backward) with the given crop plan."""
    T = T0.clone().requires_grad_(backward)
    s = dense_hankel_singular_values(
        T, positions=pos, K=T.shape[-1] // 2, chunk_elements=DEFAULT_CHUNK_ELEMENTS, max_waste=max_waste
    )
    ess = entropy_ess_from_singular_values(s)
    if backward:
        ess.sum().backward()


def dense_few_positions(Ls: list[int], operators: int = 8, n_pos: int = 16, reps: int = 3) -> None:
    """Table: the dense path at ``n_pos`` positions, planned crops against one crop (best of ``reps``)."""
    print(
        f"\nfew positions, dense (attention-like) T, {operators} operators, {n_pos} positions, float32: "
        f"planned crops vs one crop (best of {reps})"
    )
    header = f"{'L':>5} | {'one fwd':>9} {'planned':>9} {'x':>6} | {'one f+b':>9} {'planned':>9} {'x':>6}"
    print(header)
    print("-" * len(header))
    for L in Ls:
        gen = torch.Generator().manual_seed(0)
        scores = torch.randn(operators, L, L, generator=gen)
        T0 = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
        pos = torch.linspace(1, L - 1, n_pos).round().long().unique()
        row = {}
        for name, waste in (("one", math.inf), ("planned", 2.0)):
            dense_entropy(T0, pos, waste, False)  # warm-up
            row[name] = tuple(
                min(timed(functools.partial(dense_entropy, T0, pos, waste, b)) for _ in range(reps))
                for b in (False, True)
            )
        (of, ob), (pf, pb) = row["one"], row["planned"]
        print(
            f"{L:>5} | {fmt_s(of):>9} {fmt_s(pf):>9} {of / pf:>5.1f}x | "
            f"{fmt_s(ob):>9} {fmt_s(pb):>9} {ob / pb:>5.1f}x"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="L = 256, 8 channels, memory at L = 1024 (seconds)")
    p.add_argument("--channels", type=int, default=None, help="default 64 (8 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fair and quiet)")
    p.add_argument(
        "--obvious-budget", type=float, default=600.0, help="estimate the obvious loop above this (s)"
    )
    p.add_argument("--no-memory", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    Ls = [256] if args.quick else [256, 1024, 4096]
    Ns = [16, 64]
    C = args.channels or (8 if args.quick else 64)
    # warm-up (allocator, LAPACK)
    entropy_ess(make_operator(2, 64, 8))
    torch.linalg.eigvalsh(torch.eye(8).expand(4, 8, 8))

    header = (
        f"{'L':>5} {'N':>3} | {'gramian':>9} | {'obvious/ch':>11} {'obvious x' + str(C):>12} | "
        f"{'eigvalsh floor':>14} | {'speedup':>8} | {'vs floor':>8}"
    )
    print(f"entropy-ESS, {C} channels, diagonal A, float32, all positions, torch threads={args.threads}")
    print(header)
    print("-" * len(header))
    obvious_cache: dict[int, tuple[float, bool]] = {}
    for L in Ls:
        for N in Ns:
            op = make_operator(C, L, N)
            t_gram = timed(lambda op=op: entropy_ess(op))
            if L not in obvious_cache:
                T = dense_T(op, 0)
                obvious_cache[L] = obvious_seconds(T, args.obvious_budget)
                del T
            t_obv, est = obvious_cache[L]
            t_floor = floor_seconds(C, L, N)
            print(
                f"{L:>5} {N:>3} | {fmt_s(t_gram):>9} | {fmt_s(t_obv, est):>11} {fmt_s(t_obv * C, est):>12} | "
                f"{fmt_s(t_floor):>14} | {t_obv * C / t_gram:>7.0f}x | {t_gram / t_floor:>7.2f}x"
            )
            del op
    print("~ = estimated from 9 positions (a full run of one channel would exceed the budget);")
    print("obvious/ch measured once per L on channel 0 (its cost does not depend on N).")
    segment_vs_scan([256] if args.quick else [128, 1024, 4096])
    dense_few_positions([128] if args.quick else [128, 256, 1024])
    if not args.no_memory:
        L = 1024 if args.quick else max(Ls)
        peak, positions = dense_peak_memory(L, args.threads)
        T_bytes = L * L * 4
        chunk = len(positions) * (L - positions[0]) * positions[-1] * 4
        measured = f"{peak / 2**20:.0f} MiB"
        print(
            f"dense path, L={L}, one channel, float32: peak RSS increase {measured} on its largest "
            f"chunk ({len(positions)} positions {positions[0]}..{positions[-1]}; "
            f"chunk tensor {chunk / 2**20:.0f} MiB, "
            f"T {T_bytes / 2**20:.0f} MiB; a [L, L, L] tensor would be {L**3 * 4 / 2**30:.0f} GiB)"
        )


if __name__ == "__main__":
    main()
