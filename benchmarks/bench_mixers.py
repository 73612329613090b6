"""Benchmark every registered mixer: training speed, operator extraction, entropy-ESS, fast vs reference.

Per mixer (``d_model``, ``L``, ``batch``; defaults 128, 256, 32):
- forward+backward time of one mixer layer on ``[batch, L, d_model]``;
- time to extract the operators of all layers of a 2-layer ``SequenceModel`` (one forward, no grad);
- time of ``entropy_ess`` over all layers' operators (``--ess-batch`` sequences, ``--ess-positions`` evenly
  spaced positions: the dense path of attention/Hyena costs ``O(L^3)`` per position and operator);
- for Mamba, GLA and S4D: the fast forward vs a token-by-token reference at ``--ref-len`` (1024), forward
  (no grad) and forward+backward, and the largest relative difference of their outputs. Printed as a
  second table with two rows for Mamba and GLA: ``layer`` (the whole mixer forward, fast vs the layer with
  its recurrence run token by token) and ``core`` (the recurrence alone, on the same precomputed inputs:
  the chunked kernel vs a token-by-token loop of the same recurrence), so one sees where the time goes.

Usage: ``python benchmarks/bench_mixers.py [--quick] [--mixers mamba gla ...] [--threads N] [--device cuda]``.
Prints two markdown tables (times are medians of ``--reps`` runs after one warm-up; on CUDA each timed run
is synchronized at both ends), then the issue's target: Mamba's whole-layer forward against its token loop
(>= 5x), PASS or MISS.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ess_train.ess import RecurrentOperator, SelectiveSSMOperator, entropy_ess
from ess_train.models import SequenceModel, build_mixer, mixer_names
from ess_train.models.ops import chunk_linear_attention, mamba_scan, sub_chunk_for
from ess_train.models.protocol import OperatorView

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.timing import (  # noqa: E402
    Target,
    add_device_argument,
    describe,
    median_of,
    now,
    resolve_device,
    target_table,
)
from ess_train.models.ops.naive import mamba_scan_reference as mamba_recurrence_reference  # noqa: E402

MAMBA_TARGET = 5.0  # issue 16: the zoo's Mamba forward against its token-by-token loop
DEVICE = torch.device("cpu")  # set by main (--device)


def timeit(fn: Callable[[], Any], reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after one warm-up (synchronized on CUDA)."""
    return median_of(fn, reps, DEVICE)


def fwd_bwd(
    module: nn.Module, x: Tensor, forward: Callable[[nn.Module, Tensor], Tensor] | None = None
) -> None:
    module.zero_grad(set_to_none=True)
    out = module(x) if forward is None else forward(module, x)
    out.float().square().mean().backward()


# ---------------------------------------------------------------------------------- token-by-token refs
def mamba_reference_forward(m: nn.Module, x: Tensor) -> Tensor:
    """The Mamba mixer with its scan replaced by the token-by-token recurrence."""
    f = m.features(x)
    y = mamba_recurrence_reference(f["dt"], f["A"], f["B"], f["C"], f["u"])
    op = SelectiveSSMOperator(f["dt"], f["A"], f["B"], f["C"])
    return m.readout(OperatorView(op=op, u=f["u"], y=y, extras={"z": f["z"]}), x)


def gla_recurrence_reference(q: Tensor, k: Tensor, v: Tensor, gk: Tensor, scale: float) -> Tensor:
    """``S_t = diag(exp(gk_t)) S_{t-1} + k_t v_t^T``, ``y_t = scale * S_t^T q_t``, token by token."""
    S = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])
    ys = []
    for q_t, k_t, v_t, g_t in zip(q.unbind(-2), k.unbind(-2), v.unbind(-2), gk.unbind(-2)):
        S = g_t.exp()[..., None] * S + k_t[..., None] * v_t[..., None, :]
        ys.append((q_t[..., None] * S).sum(-2) * scale)
    return torch.stack(ys, dim=-2)


def gla_reference_forward(m: nn.Module, x: Tensor) -> Tensor:
    """GLA with its chunked kernel replaced by ``S_t = diag(a_t) S_{t-1} + k_t v_t^T`` token by token."""
    f = m.features(x)
    q, k, v, gk = f["q"], f["k"], f["v"], f["gk"]
    y = gla_recurrence_reference(q, k, v, gk, m.scale)
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


def mamba_core(m: nn.Module, x: Tensor) -> tuple[list[Tensor], Callable[..., Tensor], Callable[..., Tensor]]:
    """Mamba's recurrence inputs (dt, A, B, C, u) and its fast kernel / token-by-token loop."""
    f = m.features(x)
    ins = [f[k].detach() for k in ("dt", "A", "B", "C", "u")]
    return ins, lambda *t: mamba_scan(*t, m.chunk_size), mamba_recurrence_reference


def gla_core(m: nn.Module, x: Tensor) -> tuple[list[Tensor], Callable[..., Tensor], Callable[..., Tensor]]:
    """GLA's recurrence inputs (q, k, v, gk) and its chunked kernel / token-by-token loop."""
    f = m.features(x)
    ins = [f[k].detach() for k in ("q", "k", "v", "gk")]
    sub = sub_chunk_for(m.chunk_size)

    def fast(q: Tensor, k: Tensor, v: Tensor, gk: Tensor) -> Tensor:
        return chunk_linear_attention(q * m.scale, k, v, gk, chunk_size=m.chunk_size, sub_chunk_size=sub)

    return ins, fast, lambda q, k, v, gk: gla_recurrence_reference(q, k, v, gk, m.scale)


# the recurrence alone (same inputs for the fast kernel and the token-by-token loop)
CoreFn = Callable[[nn.Module, Tensor], tuple[list[Tensor], Callable[..., Tensor], Callable[..., Tensor]]]
CORES: dict[str, CoreFn] = {
    "mamba": mamba_core,
    "gla": gla_core,
}


def core_fwd_bwd(fn: Callable[..., Tensor], ins: list[Tensor]) -> None:
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in ins]
    fn(*leaves).float().square().mean().backward()


# ----------------------------------------------------------------------------------------------------
def bench_mixer(name: str, args: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {"mixer": name}
    torch.manual_seed(0)
    m = build_mixer(name, d_model=args.d_model).to(DEVICE)
    x = torch.randn(args.batch, args.seq_len, args.d_model).to(DEVICE)
    row["fwd_bwd"] = timeit(lambda: fwd_bwd(m, x), args.reps)
    size = m.state_size(args.seq_len)
    row["tss"] = size.total
    row["per_op"] = size.per_operator

    model = SequenceModel(64, args.d_model, 2, mixer=name).to(DEVICE)
    ids = torch.randint(0, 64, (args.batch, args.seq_len)).to(DEVICE)
    with torch.no_grad():
        row["extract"] = timeit(lambda: model.ess_operators(ids), args.reps)
        views = model.ess_operators(ids[: args.ess_batch])
        op0 = next(iter(views.values())).op
        row["op"] = f"{type(op0).__name__} {tuple(op0.batch_shape)[1:]}"
        L = args.seq_len
        positions = torch.linspace(1, L - 1, min(args.ess_positions, L - 1)).round().long().unique()
        t0 = now(DEVICE)
        ess_vals = [entropy_ess(v.op, positions) for v in views.values()]
        row["ess"] = now(DEVICE) - t0
        row["avg_ess"] = statistics.mean(float(e.mean()) for e in ess_vals)

    row["vs_ref"] = bench_vs_reference(name, args)
    return row


def bench_vs_reference(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows ``layer`` (whole mixer forward) and, where known, ``core`` (the recurrence alone): fast vs
    token-by-token, forward (no grad) and forward+backward, at ``--ref-len`` / ``--ref-batch``."""
    ref = REFERENCES.get(name)
    if ref is None:
        return []
    torch.manual_seed(0)
    m = build_mixer(name, d_model=args.d_model).to(DEVICE)
    xr = torch.randn(args.ref_batch, args.ref_len, args.d_model).to(DEVICE)
    ref_reps = max(1, args.reps // 2)
    rows = []
    r: dict[str, Any] = {"mixer": name, "what": "layer (whole forward)"}
    with torch.no_grad():
        fast_out, ref_out = m(xr), ref(m, xr)
        r["ref_err"] = float((fast_out - ref_out).abs().max() / ref_out.abs().max())
        r["fast_fwd"] = timeit(lambda: m(xr), args.reps)
        r["ref_fwd"] = timeit(lambda: ref(m, xr), args.reps)
    r["fast_fb"] = timeit(lambda: fwd_bwd(m, xr), args.reps)
    r["ref_fb"] = timeit(lambda: fwd_bwd(m, xr, ref), ref_reps)
    rows.append(r)
    core = CORES.get(name)
    if core is not None:
        with torch.no_grad():
            ins, fast, slow = core(m, xr)
        r = {"mixer": name, "what": "core (recurrence only)"}
        with torch.no_grad():
            fast_out, ref_out = fast(*ins), slow(*ins)
            r["ref_err"] = float((fast_out - ref_out).abs().max() / ref_out.abs().max())
            r["fast_fwd"] = timeit(lambda: fast(*ins), args.reps)
            r["ref_fwd"] = timeit(lambda: slow(*ins), args.reps)
        r["fast_fb"] = timeit(lambda: core_fwd_bwd(fast, ins), args.reps)
        r["ref_fb"] = timeit(lambda: core_fwd_bwd(slow, ins), ref_reps)
        rows.append(r)
    return rows


def ms(v: float | None) -> str:
    return "–" if v is None else f"{1e3 * v:.0f}"


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = (
        "| mixer | operator (per layer) | TSS (N per op) | fwd+bwd ms | extract ops ms (2 layers) "
        "| entropy-ESS s (2 layers) | avg ESS |"
    )
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        cells = [
            r["mixer"],
            r["op"],
            f"{r['tss']} ({r['per_op']})",
            ms(r["fwd_bwd"]),
            ms(r["extract"]),
            f"{r['ess']:.2f}",
            f"{r['avg_ess']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ref_table(rows: list[dict[str, Any]]) -> str:
    """Fast vs token-by-token: per mixer a ``layer`` row and (Mamba, GLA) a ``core`` row."""
    head = (
        "| mixer | measured | fast fwd ms | token-by-token fwd ms | fwd x | fast f+b ms "
        "| token-by-token f+b ms | f+b x | max rel diff |"
    )
    lines = [head, "|" + "---|" * 9]
    for row in rows:
        for r in row.get("vs_ref", []):
            cells = [
                r["mixer"],
                r["what"],
                ms(r["fast_fwd"]),
                ms(r["ref_fwd"]),
                f"{r['ref_fwd'] / r['fast_fwd']:.1f}",
                ms(r["fast_fb"]),
                ms(r["ref_fb"]),
                f"{r['ref_fb'] / r['fast_fb']:.1f}",
                f"{r['ref_err']:.1e}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[Target]:
    """Mamba's whole-layer forward against its token loop (forward+backward: in the table above)."""
    out = []
    for row in rows:
        for r in row.get("vs_ref", []):
            if r["mixer"] == "mamba" and r["what"].startswith("layer"):
                where = f"L={args.ref_len}, batch {args.ref_batch}, d_model {args.d_model}"
                out.append(
                    Target(
                        f"Mamba forward vs token loop, {where}", r["ref_fwd"] / r["fast_fwd"], MAMBA_TARGET
                    )
                )
    return out


def main(argv: list[str] | None = None) -> None:
    global DEVICE
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
    add_device_argument(p)
    args = p.parse_args(argv)
    DEVICE = resolve_device(args.device)
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
        f"batch={args.ref_batch}; {torch.get_num_threads()} thread(s), device {DEVICE.type}: "
        f"{describe(DEVICE)}"
    )
    print(table(rows, args))
    print()
    print(
        f"fast vs token-by-token reference at L={args.ref_len} batch={args.ref_batch} "
        "(layer: the whole mixer forward; core: the recurrence alone on the same inputs)"
    )
    print(ref_table(rows))
    found = targets(rows, args)
    if found:
        print()
        print(target_table(found, f"target (issue 16: >= {MAMBA_TARGET:.0f}x), device {DEVICE.type}:"))


if __name__ == "__main__":
    main()
