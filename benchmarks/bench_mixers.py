"""Benchmark every registered mixer: training speed, operator extraction, entropy-ESS, fast vs reference.

Per mixer (``d_model``, ``L``, ``batch``; defaults 128, 256, 32):
- forward+backward time of one mixer layer on ``[batch, L, d_model]``;
- time to extract the operators of all layers of a 2-layer ``SequenceModel`` (one forward, no grad);
- time of ``entropy_ess`` over all layers' operators (``--ess-batch`` sequences, ``--ess-positions`` evenly
  spaced positions: the dense path of attention/Hyena costs ``O(L^3)`` per position and operator);
- for Mamba, GLA and S4D: the fast forward vs a token-by-token reference at ``--ref-len`` (1024), forward
  (no grad) and forward+backward, and the largest relative difference of their outputs.

Usage: ``python benchmarks/bench_mixers.py [--quick] [--mixers mamba gla ...] [--threads N]``.
Prints one markdown table (times are medians of ``--reps`` runs after one warm-up).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ess_train.ess import RecurrentOperator, entropy_ess
from ess_train.models import SequenceModel, build_mixer, mixer_names
from ess_train.models.mixers.mamba import SelectiveSSMOperator, selective_scan_reference
from ess_train.models.protocol import OperatorView


def timeit(fn: Callable[[], Any], reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fwd_bwd(
    module: nn.Module, x: Tensor, forward: Callable[[nn.Module, Tensor], Tensor] | None = None
) -> None:
    module.zero_grad(set_to_none=True)
    out = module(x) if forward is None else forward(module, x)
    out.float().square().mean().backward()


# ---------------------------------------------------------------------------------- token-by-token refs
def mamba_reference_forward(m: nn.Module, x: Tensor) -> Tensor:
    """The Mamba mixer with its scan replaced by the token-by-token recurrence."""
    f = m._features(x)
    log_a = f["dt"][..., None] * f["A"][:, None, :]
    h = selective_scan_reference(log_a, (f["dt"] * f["u"])[..., None] * f["B"][:, None])
    y = torch.einsum("bdln,bln->bdl", h, f["C"])
    op = SelectiveSSMOperator(f["dt"], f["A"], f["B"], f["C"])
    return m.readout(OperatorView(op=op, u=f["u"], y=y, extras={"z": f["z"]}), x)


def gla_reference_forward(m: nn.Module, x: Tensor) -> Tensor:
    """GLA with its chunked kernel replaced by ``S_t = diag(a_t) S_{t-1} + k_t v_t^T`` token by token."""
    f = m._features(x)
    q, k, v, gk = f["q"], f["k"], f["v"], f["gk"]
    S = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])
    ys = []
    for q_t, k_t, v_t, g_t in zip(q.unbind(-2), k.unbind(-2), v.unbind(-2), gk.unbind(-2)):
        S = g_t.exp()[..., None] * S + k_t[..., None] * v_t[..., None, :]
        ys.append((q_t[..., None] * S).sum(-2) * m.scale)
    y = torch.stack(ys, dim=-2)
    op = RecurrentOperator(gk.exp(), k, q * m.scale, validate=False)
    return m.readout(OperatorView(op=op, u=v, y=y), x)


def s4d_reference_forward(m: nn.Module, x: Tensor) -> Tensor:
    """S4D with the FFT convolution replaced by its recurrence."""
    log_a, b, c = m.ssm(torch.float32)
    a = log_a.exp()
    s = x.new_zeros(x.shape[0], m.d_model, m.d_state)
    ys = []
    for x_t in x.unbind(1):
        s = a * s + b * x_t[..., None]
        ys.append((c * s).sum(-1))
    u = x.transpose(1, 2)
    y = torch.stack(ys, dim=-1)
    return m.readout(OperatorView(op=None, u=u, y=y), x)  # type: ignore[arg-type]


REFERENCES: dict[str, Callable[[nn.Module, Tensor], Tensor]] = {
    "mamba": mamba_reference_forward,
    "gla": gla_reference_forward,
    "s4d": s4d_reference_forward,
}


# ----------------------------------------------------------------------------------------------------
def bench_mixer(name: str, args: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {"mixer": name}
    torch.manual_seed(0)
    m = build_mixer(name, d_model=args.d_model)
    x = torch.randn(args.batch, args.seq_len, args.d_model)
    row["fwd_bwd"] = timeit(lambda: fwd_bwd(m, x), args.reps)
    size = m.state_size(args.seq_len)
    row["tss"] = size.total
    row["per_op"] = size.per_operator

    model = SequenceModel(64, args.d_model, 2, mixer=name)
    ids = torch.randint(0, 64, (args.batch, args.seq_len))
    with torch.no_grad():
        row["extract"] = timeit(lambda: model.ess_operators(ids), args.reps)
        views = model.ess_operators(ids[: args.ess_batch])
        op0 = next(iter(views.values())).op
        row["op"] = f"{type(op0).__name__} {tuple(op0.batch_shape)[1:]}"
        L = args.seq_len
        positions = torch.linspace(1, L - 1, min(args.ess_positions, L - 1)).round().long().unique()
        t0 = time.perf_counter()
        ess_vals = [entropy_ess(v.op, positions) for v in views.values()]
        row["ess"] = time.perf_counter() - t0
        row["avg_ess"] = statistics.mean(float(e.mean()) for e in ess_vals)

    ref = REFERENCES.get(name)
    if ref is not None:
        torch.manual_seed(0)
        m = build_mixer(name, d_model=args.d_model)
        xr = torch.randn(args.ref_batch, args.ref_len, args.d_model)
        with torch.no_grad():
            fast_out, ref_out = m(xr), ref(m, xr)
            row["ref_err"] = float((fast_out - ref_out).abs().max() / ref_out.abs().max())
            row["fast_fwd"] = timeit(lambda: m(xr), args.reps)
            row["ref_fwd"] = timeit(lambda: ref(m, xr), args.reps)
        row["fast_fb"] = timeit(lambda: fwd_bwd(m, xr), args.reps)
        row["ref_fb"] = timeit(lambda: fwd_bwd(m, xr, ref), max(1, args.reps // 2))
    return row


def ms(v: float | None) -> str:
    return "–" if v is None else f"{1e3 * v:.0f}"


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = (
        "| mixer | operator (per layer) | TSS (N per op) | fwd+bwd ms | extract ops ms (2 layers) "
        "| entropy-ESS s (2 layers) | avg ESS | fast fwd ms | ref fwd ms | fwd x | fast f+b ms "
        "| ref f+b ms | f+b x | max rel diff |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        has_ref = "fast_fwd" in r
        cells = [
            r["mixer"],
            r["op"],
            f"{r['tss']} ({r['per_op']})",
            ms(r["fwd_bwd"]),
            ms(r["extract"]),
            f"{r['ess']:.2f}",
            f"{r['avg_ess']:.2f}",
            ms(r.get("fast_fwd")),
            ms(r.get("ref_fwd")),
            f"{r['ref_fwd'] / r['fast_fwd']:.1f}" if has_ref else "–",
            ms(r.get("fast_fb")),
            ms(r.get("ref_fb")),
            f"{r['ref_fb'] / r['fast_fb']:.1f}" if has_ref else "–",
            f"{r['ref_err']:.1e}" if has_ref else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: runs in seconds")
    p.add_argument("--mixers", nargs="*", default=None, help="registry names (default: all)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--ess-batch", type=int, default=1)
    p.add_argument("--ess-positions", type=int, default=16)
    p.add_argument("--ref-len", type=int, default=1024)
    p.add_argument("--ref-batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args(argv)
    if args.quick:
        args.d_model, args.seq_len, args.batch = 32, 64, 4
        args.ess_positions, args.ref_len, args.ref_batch, args.reps = 8, 256, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.mixers or mixer_names()
    rows = []
    for name in names:
        try:
            rows.append(bench_mixer(name, args))
        except ImportError as e:  # a registered mixer whose module has not landed
            print(f"skipping {name}: {e}", file=sys.stderr)
        print(f"done {name}", file=sys.stderr, flush=True)
    print(
        f"d_model={args.d_model} L={args.seq_len} batch={args.batch}; entropy-ESS on {args.ess_batch} "
        f"sequence(s) x {args.ess_positions} positions; fast vs reference at L={args.ref_len} "
        f"batch={args.ref_batch}; {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
        f"device cpu"
    )
    print(table(rows, args))


if __name__ == "__main__":
    main()
