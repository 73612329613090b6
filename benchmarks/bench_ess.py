"""ESS engine benchmark: Gramian entropy-ESS vs the obvious per-position SVD loop vs the eigvalsh floor.

    python benchmarks/bench_ess.py            # L in {256, 1024, 4096}, N in {16, 64}, 64 channels
    python benchmarks/bench_ess.py --quick    # seconds
    python benchmarks/bench_ess.py --device cuda --only-main --obvious-budget 30   # on a GPU

``--device cuda`` runs every column on the GPU (operators, the obvious loop's SVDs, the floor's eigvalsh),
synchronized around each timed region; the peak-memory section (CPU RSS) is skipped there. The last table
puts the speed-up at the largest L measured (64 channels at L = 4096 in the full run) against the
issue's target (>= 100x): PASS or MISS.

Columns (all in one run, same process, same thread count):
- gramian: ``entropy_ess`` on a diagonal ``RecurrentOperator`` (Mamba-like decays), all positions,
  all channels, float32;
- obvious: a python loop of ``torch.linalg.svdvals(T[i:, :i])`` over positions on the dense ``T`` of
  one channel, scaled to all channels (its cost does not depend on N: measured once per L). Where a
  full run of one channel would take more than ``--obvious-budget`` seconds, it is estimated from a few
  positions (interpolated over all positions) and marked ``~``;
- floor: one batched float64 ``torch.linalg.eigvalsh`` on ``[channels, L, N, N]`` (the last step of the
  Gramian path alone, float64 for every operator), in channel slices when the tensor exceeds 1 GiB (the
  CPU kernel loops over the batch, so the sum of slices is the same work);
- speedup = obvious / gramian, vs floor = gramian / floor.
Then the cost of float64 accumulation for float32 operators (the default) against the previous float32 path
(float32 sums and eigenproblems, autograd through the Cholesky factor), forward and forward+backward, scan,
segment path and full (DeltaNet) transitions; and the accuracy table (issue 14): float32 entropy-ESS and
tolerance-ESS (``rtol = 1e-5``) against a float64 SVD of the same operator, for four distributions of
diagonal ``a`` and DeltaNet's ``I - beta k k^T``, Gramian (all positions and 16: segments) and dense
paths, new and previous.
Then, for a few positions (the training-time estimates of the regularizer: 16 of them, or L / 4), the
segment path against the full Gramian scan at the same positions (both exact; ``use_segments`` picks the
segment path there), forward and forward+backward, 16 channels, N = 16.
Then the dense path (softmax attention) at those few positions: crops planned to pad the SVD work at most
2x (the default) against one crop for all positions (``max_waste=inf``), and float32 ``svdvals`` against
the float64 Gram route (the default for float32 blocks), forward and forward+backward.
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

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ess_train.ess.dense_svd as dense  # noqa: E402
import ess_train.ess.gramian as gramian  # noqa: E402
import ess_train.ess.gramian_svals as gramian_svals  # noqa: E402
import ess_train.ess.measures as measures  # noqa: E402
from benchmarks.timing import Target, add_device_argument, describe, resolve_device, target_table  # noqa: E402
from benchmarks.timing import timed as _timed  # noqa: E402
from ess_train.ess import DEFAULT_CHUNK_ELEMENTS, RecurrentOperator, entropy_ess  # noqa: E402
from ess_train.ess.dense_svd import dense_hankel_singular_values, plan_dense_chunks  # noqa: E402
from ess_train.ess.measures import (  # noqa: E402
    entropy_ess_from_singular_values,
    hankel_singular_values,
    tolerance_ess_from_singular_values,
)

SPEEDUP_TARGET = 100.0  # issue 16: entropy-ESS of 64 channels at L = 4096 against the per-position SVD loop


def make_operator(
    channels: int, L: int, N: int, seed: int = 0, device: torch.device | None = None
) -> RecurrentOperator:
    """Diagonal, input-dependent decays ``exp(-dt_t * A_n)`` (Mamba-like), float32 (drawn on the CPU, the
    same values on every device, then moved to ``device``)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.linspace(1.0, float(N), N)
    dt = torch.exp(torch.rand(channels, L, 1, generator=g) * math.log(100.0) + math.log(1e-3))
    a = torch.exp(-dt * A)
    b = torch.randn(channels, L, N, generator=g) * dt
    c = torch.randn(channels, L, N, generator=g)
    return RecurrentOperator(a.to(device), b.to(device), c.to(device))


def dense_T(op: RecurrentOperator, channel: int, block: int = 256) -> torch.Tensor:
    """``T`` of one channel, materialized by blocks of columns (bounded memory)."""
    one = RecurrentOperator(op.a[channel], op.b[channel], op.c[channel], validate=False)
    L = one.seq_len
    T = torch.empty(L, L, device=op.a.device)
    eye = torch.eye(L, device=op.a.device)
    for s0 in range(0, L, block):
        T[:, s0 : s0 + block] = one.apply(eye[:, s0 : s0 + block])
    return torch.tril(T)


DEVICE = torch.device("cpu")  # set by main (--device): the timers synchronize CUDA around a timed region


def timed(fn) -> float:
    """Seconds of one ``fn()`` on ``DEVICE`` (benchmarks/timing.py: synchronized on CUDA)."""
    return _timed(fn, DEVICE)


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
    g = torch.Generator(device=DEVICE).manual_seed(1)
    per_slice = max(1, min(channels, (1 << 27) // (L * N * N)))
    total = 0.0
    for c0 in range(0, channels, per_slice):
        n = min(per_slice, channels - c0)
        X = torch.randn(n, L, N, N, generator=g, dtype=torch.float64, device=DEVICE)
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
            op = make_operator(channels, L, N, device=DEVICE)
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
    header = (
        f"{'L':>5} | {'one fwd':>9} {'planned':>9} {'x':>6} {'svd':>9} {'x':>6} | "
        f"{'one f+b':>9} {'planned':>9} {'x':>6} {'svd':>9} {'x':>6}"
    )
    print(header)
    print("-" * len(header))
    for L in Ls:
        gen = torch.Generator().manual_seed(0)
        scores = torch.randn(operators, L, L, generator=gen)
        T0 = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
        T0 = T0.to(DEVICE)
        pos = torch.linspace(1, L - 1, n_pos).round().long().unique()
        row = {}
        for name, waste, old in (("one", math.inf, False), ("planned", 2.0, False), ("svd", 2.0, True)):
            with _float32_sums(old):
                dense_entropy(T0, pos, waste, False)  # warm-up
                row[name] = tuple(
                    min(timed(functools.partial(dense_entropy, T0, pos, waste, b)) for _ in range(reps))
                    for b in (False, True)
                )
        (of, ob), (pf, pb), (sf, sb) = row["one"], row["planned"], row["svd"]
        print(
            f"{L:>5} | {fmt_s(of):>9} {fmt_s(pf):>9} {of / pf:>5.1f}x {fmt_s(sf):>9} {sf / pf:>5.1f}x | "
            f"{fmt_s(ob):>9} {fmt_s(pb):>9} {ob / pb:>5.1f}x {fmt_s(sb):>9} {sb / pb:>5.1f}x"
        )
    print("one / planned: float32 blocks via a float64 Gram + eigvalsh (the default); svd: float32 svdvals")


ACCURACY_CASES = (
    "a ~ U(0.79, 0.99)",
    "a ~ U(0, 1)",
    "Mamba-like rates",
    "a ~ U(0.99, 1)",
    "DeltaNet (full A)",
)


def accuracy_operator(case: str, channels: int, L: int, N: int, seed: int = 0) -> RecurrentOperator:
    """Float32 operators of issue 14's accuracy table: random ``b``, ``c`` and the named transitions
    (Mamba-like: ``exp(-dt_t r_n)``, rates ``r_n`` from 1e-3 to 1 across the state; DeltaNet: ``A_t = I -
    beta_t k_t k_t^T``, unit ``k_t``, ``beta_t ~ U(0, 1)``)."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(channels, L, N, generator=g)
    c = torch.randn(channels, L, N, generator=g)
    u = torch.rand(channels, L, N, generator=g)
    if case == ACCURACY_CASES[0]:
        a = 0.79 + 0.2 * u
    elif case == ACCURACY_CASES[1]:
        a = u
    elif case == ACCURACY_CASES[2]:
        dt = torch.exp(0.5 * torch.randn(channels, L, 1, generator=g))
        a = torch.exp(-dt * torch.logspace(-3, 0, N))
    elif case == ACCURACY_CASES[3]:
        a = 0.99 + 0.01 * u
    else:
        k = torch.nn.functional.normalize(torch.randn(channels, L, N, generator=g), dim=-1)
        beta = torch.rand(channels, L, 1, 1, generator=g)
        a = torch.eye(N) - beta * k.unsqueeze(-1) * k.unsqueeze(-2)
    return RecurrentOperator(a, b, c)


def _float32_sums(on: bool):
    """Context: the previous float32 path when ``on``: sums and eigenproblems in float32, autograd through
    the Cholesky factor, float32 ``svdvals`` for dense blocks."""

    class Ctx:
        def __enter__(self) -> None:
            self.saved = (
                measures.GRAMIAN_ACCUMULATE,
                dense.GRAM_FOR_FLOAT32,
                gramian_svals.CLOSED_FORM_GRADIENT,
            )
            if on:
                measures.GRAMIAN_ACCUMULATE = None
                dense.GRAM_FOR_FLOAT32 = gramian_svals.CLOSED_FORM_GRADIENT = False

        def __exit__(self, *exc: object) -> None:
            measures.GRAMIAN_ACCUMULATE, dense.GRAM_FOR_FLOAT32, gramian_svals.CLOSED_FORM_GRADIENT = (
                self.saved
            )

    return Ctx()


def accuracy_table(channels: int, L: int, N: int, n_pos: int = 16, rtol: float = 1e-5) -> None:
    """Table: float32 ESS against a float64 SVD of the same (float32) operator, both paths, old and new.

    ``ent``: max relative error of entropy-ESS over positions 1..L-1 (all positions: the scan; ``n_pos``
    positions: the segment path for diagonal ``a``); ``tol=``: fraction of positions where tolerance-ESS
    at ``rtol`` (scale: the float64 peak) equals the float64 count."""
    print(
        f"\naccuracy, float32 vs float64 SVD of the same operator, {channels} channels, L={L}, N={N}: max "
        f"rel. error of entropy-ESS over positions (all / {n_pos} positions), tolerance-ESS agreement "
        f"at rtol={rtol:g}"
    )
    header = (
        f"{'transitions':<19} | {'gramian ent':>11} {'tol=':>6} {'16 pos':>8} | {'dense ent':>9} {'tol=':>6} "
        f"|| {'old gramian':>11} {'tol=':>6} {'16 pos':>8} | {'old dense':>9} {'tol=':>6}"
    )
    print(header)
    print("-" * len(header))
    pos = torch.linspace(1, L - 1, n_pos).round().long().unique()
    for case in ACCURACY_CASES:
        op = accuracy_operator(case, channels, L, N)
        op64 = RecurrentOperator(op.a.double(), op.b.double(), op.c.double(), validate=False)
        T64 = op64.dense()
        s64 = hankel_singular_values(T64)
        e64 = entropy_ess_from_singular_values(s64)
        scale = s64.amax(dim=(-2, -1))
        t64 = tolerance_ess_from_singular_values(s64, rtol, scale=scale)
        cells = []
        for old in (False, True):
            with _float32_sums(old):
                s_g = hankel_singular_values(op)
                s_p = hankel_singular_values(op, pos)
                s_d = hankel_singular_values(T64.float())
            for s, idx in ((s_g, None), (s_p, pos), (s_d, None)):
                ref = e64 if idx is None else e64[:, idx]
                # as entropy_ess returns it (evaluated in float64 now, in float32 before)
                e = entropy_ess_from_singular_values(s if old else s.double()).float().double()
                err = (e - ref).abs() / ref.clamp_min(1e-300)
                err = err[:, 1:] if idx is None else err
                cells.append(f"{float(err.max()):.1e}")
                if idx is None:
                    t = tolerance_ess_from_singular_values(s.double(), rtol, scale=scale)
                    cells.append(f"{float((t == t64).double().mean()):.3f}")
        g, gt, gp, d, dt, og, ogt, ogp, od, odt = cells
        print(
            f"{case:<19} | {g:>11} {gt:>6} {gp:>8} | {d:>9} {dt:>6} || {og:>11} {ogt:>6} {ogp:>8} | "
            f"{od:>9} {odt:>6}"
        )
    print("old = float32 sums and eigenproblems (the previous path), float32 SVD for dense blocks.")


def accumulation_cost(configs: list[tuple[int, int, int, int | None, bool]], reps: int = 3) -> None:
    """Table: time of the float32 path with float64 accumulation (new) against float32 sums (old), forward
    and forward+backward, scan (all positions), segment path (few positions) and full transitions."""
    print(f"\nfloat32 operators: float64 accumulation (new) vs float32 sums (old), best of {reps}")
    header = (
        f"{'path':<9} {'ch':>3} {'L':>5} {'N':>3} {'pos':>5} | {'old fwd':>9} {'new fwd':>9} {'x':>5} | "
        f"{'old f+b':>9} {'new f+b':>9} {'x':>5}"
    )
    print(header)
    print("-" * len(header))
    for ch, L, N, n_pos, full in configs:
        op = accuracy_operator(ACCURACY_CASES[4] if full else ACCURACY_CASES[2], ch, L, N)
        op = RecurrentOperator(op.a.to(DEVICE), op.b.to(DEVICE), op.c.to(DEVICE), validate=False)
        pos = None if n_pos is None else torch.linspace(1, L - 1, n_pos).round().long().unique()
        leaves = [x.clone().requires_grad_() for x in (op.a, op.b, op.c)]

        def fwd(leaves: list[torch.Tensor] = leaves, pos: torch.Tensor | None = pos) -> None:
            with torch.no_grad():
                entropy_ess(RecurrentOperator(*leaves, validate=False), pos)

        def fwd_bwd(leaves: list[torch.Tensor] = leaves, pos: torch.Tensor | None = pos) -> None:
            entropy_ess(RecurrentOperator(*leaves, validate=False), pos).sum().backward()

        row = {}
        for old in (True, False):
            with _float32_sums(old):
                fwd_bwd()
                row[old] = [min(timed(f) for _ in range(reps)) for f in (fwd, fwd_bwd)]
        (of, ob), (nf, nb) = row[True], row[False]
        segments = pos is not None and not full and gramian.use_segments(len(pos), L)
        path = "full" if full else "segments" if segments else "scan"
        print(
            f"{path:<9} {ch:>3} {L:>5} {N:>3} {len(pos) if pos is not None else L:>5} | {fmt_s(of):>9} "
            f"{fmt_s(nf):>9} {nf / of:>4.2f}x | {fmt_s(ob):>9} {fmt_s(nb):>9} {nb / ob:>4.2f}x"
        )


def main(argv: list[str] | None = None) -> None:
    global DEVICE
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="L = 256, 8 channels, memory at L = 1024 (seconds)")
    p.add_argument("--channels", type=int, default=None, help="default 64 (8 with --quick)")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="L of the main table")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fair and quiet)")
    p.add_argument(
        "--obvious-budget", type=float, default=600.0, help="estimate the obvious loop above this (s)"
    )
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--only-main", action="store_true", help="the main table and the target table only")
    add_device_argument(p)
    args = p.parse_args(argv)
    DEVICE = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    Ls = args.lengths or ([256] if args.quick else [256, 1024, 4096])
    Ns = [16, 64]
    C = args.channels or (8 if args.quick else 64)
    # warm-up (allocator, LAPACK / cuSOLVER handles)
    entropy_ess(make_operator(2, 64, 8, device=DEVICE))
    torch.linalg.eigvalsh(torch.eye(8, dtype=torch.float64, device=DEVICE).expand(4, 8, 8))
    torch.linalg.svdvals(torch.randn(64, 32, device=DEVICE))

    header = (
        f"{'L':>5} {'N':>3} | {'gramian':>9} | {'obvious/ch':>11} {'obvious x' + str(C):>12} | "
        f"{'eigvalsh floor':>14} | {'speedup':>8} | {'vs floor':>8}"
    )
    print(
        f"entropy-ESS, {C} channels, diagonal A, float32, all positions, torch threads={args.threads}, "
        f"device {DEVICE.type}: {describe(DEVICE)}"
    )
    print(header)
    print("-" * len(header))
    obvious_cache: dict[int, tuple[float, bool]] = {}
    speedups: dict[tuple[int, int], tuple[float, bool]] = {}
    for L in Ls:
        for N in Ns:
            op = make_operator(C, L, N, device=DEVICE)
            if DEVICE.type == "cuda":  # first call at a shape: allocator, kernels' setup
                entropy_ess(op)
            t_gram = timed(lambda op=op: entropy_ess(op))
            if L not in obvious_cache:
                T = dense_T(op, 0)
                obvious_cache[L] = obvious_seconds(T, args.obvious_budget)
                del T
            t_obv, est = obvious_cache[L]
            t_floor = floor_seconds(C, L, N)
            speedups[L, N] = (t_obv * C / t_gram, est)
            print(
                f"{L:>5} {N:>3} | {fmt_s(t_gram):>9} | {fmt_s(t_obv, est):>11} {fmt_s(t_obv * C, est):>12} | "
                f"{fmt_s(t_floor):>14} | {t_obv * C / t_gram:>7.0f}x | {t_gram / t_floor:>7.2f}x"
            )
            del op
    print("~ = estimated from 9 positions (a full run of one channel would exceed the budget);")
    print("obvious/ch measured once per L on channel 0 (its cost does not depend on N).")
    L_top = max(Ls)
    targets = [
        Target(
            f"entropy-ESS vs per-position SVD, {C} ch, L={L_top}, N={N}" + (" (obvious est.)" if est else ""),
            x,
            SPEEDUP_TARGET,
        )
        for (L, N), (x, est) in speedups.items()
        if L == L_top
    ]
    print()
    print(
        target_table(
            targets,
            f"targets (issue 16: 64 channels at L = 4096, >= {SPEEDUP_TARGET:.0f}x), device {DEVICE.type}:",
        )
    )
    if args.only_main:
        return
    if args.quick:
        quick = [(8, 256, 16, None, False), (8, 256, 16, 16, False), (4, 128, 8, None, True)]
        accumulation_cost(quick, reps=2)
    else:
        accumulation_cost(
            [(64, 256, 16, None, False), (64, 1024, 16, None, False), (64, 256, 64, None, False)]
            + [(16, 1024, 16, 16, False), (16, 1024, 16, 256, False), (16, 4096, 16, 16, False)]
            + [(16, 256, 16, None, True), (16, 1024, 16, None, True)]
        )
    accuracy_table(4, 128, 16) if args.quick else accuracy_table(8, 256, 16)  # on the CPU
    segment_vs_scan([256] if args.quick else [128, 1024, 4096])
    dense_few_positions([128] if args.quick else [128, 256, 1024])
    if DEVICE.type != "cpu" and not args.no_memory:
        print("dense path peak memory: CPU RSS, skipped on", DEVICE.type)
    elif not args.no_memory:
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
