"""ESSMonitor at scale: time per measurement and checkpointed state against depth, length and mixer kind.

For each mixer (recurrent GLA, dense softmax attention), depth (4-32 layers) and sequence length (256-4096),
at the monitor's defaults (``positions="auto"``: fitted to 5% of training by ``ess_train.measure.cost``)
and at all positions:

- **time per measurement**: the probe forward (on the rows the plan measures) plus, per layer, ``layer_ess``
  at the plan's choice. Measured on one layer and one block and multiplied by the depth (every layer of
  these models has the same shape, so the same choice); where all positions would take long (dense layers
  at L >= 1024), timed on a few positions and extrapolated by the cost model (marked ``~``);
- **training time per step** (batch of ``--batch`` rows): measured on a one-block model and multiplied by
  the depth (embedding and head are small against the blocks), and the monitor's share when measuring
  every ``--every`` steps;
- **checkpointed monitor state**: ``torch.save`` bytes after 100, 400 and 2,000 measurements (a 100,000-step
  run every 50 steps) of synthetic measurements at the plan's width, against the unbounded version-2 state
  (extrapolated linearly from 100 measurements).

Also the cost model's view of the regularizer's defaults (per step, forward + backward) and of the
initializer's search (once), in training steps. One thread is advised for stable timings:

    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py             # the table in README (~4 min)
    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py --quick     # a few seconds: L 128, 2 and 4 layers
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.timing import best_of  # noqa: E402
from ess_train.callbacks import ESSMonitor
from ess_train.measure import cost as B
from ess_train.measure import layer_ess, probe_views, resolve_positions
from ess_train.measure.planning import forward_flops
from ess_train.measure.stats import LayerESS
from ess_train.models import SequenceModel, find_ess_layers
from ess_train.models.protocol import OperatorView

MIXERS = {"gla": "gla", "attention": "attention"}


def _model(mixer: str, n_layers: int, seq_len: int, d_model: int, device: str | None = None) -> SequenceModel:
    with torch.device(device or "cpu"):
        return SequenceModel(
            vocab_size=64, d_model=d_model, n_layers=n_layers, mixer=mixer, max_seq_len=seq_len
        )


_best = best_of  # best of ``repeats`` (benchmarks/timing.py)


def step_flops(mixer: str, n_layers: int, seq_len: int, d_model: int, rows: int) -> tuple[float, float]:
    """(training-step FLOPs, probe-forward FLOPs) of the full-depth model, counted on the meta device."""
    model = _model(mixer, n_layers, seq_len, d_model, "meta")
    fwd = forward_flops(model, torch.zeros(rows, seq_len, dtype=torch.long, device="meta"))
    return 3 * fwd, fwd


def train_step_seconds(
    mixer: str, seq_len: int, d_model: int, rows: int, repeats: int
) -> tuple[float, float]:
    """Seconds of one training step of one block at ``rows`` rows (timed at up to 2 rows and scaled), and
    of the embedding + head alone (``n_layers=0`` is not a model: one block minus its share)."""
    timed_rows = min(rows, 2)
    model = _model(mixer, 1, seq_len, d_model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 64, (timed_rows, seq_len))

    def step() -> None:
        out = model(x)
        torch.nn.functional.cross_entropy(out.flatten(0, 1), x.flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    return _best(step, repeats) * rows / timed_rows, 0.0


def probe_seconds(
    mixer: str, seq_len: int, d_model: int, rows: int, repeats: int
) -> tuple[float, OperatorView, Any]:
    """Seconds of the probe forward of one block (operators captured), and one layer's view and module."""
    model = _model(mixer, 1, seq_len, d_model)
    layers = find_ess_layers(model)
    x = torch.randint(0, 64, (rows, seq_len))
    views: dict[str, OperatorView] = {}

    def forward() -> None:
        views.update(probe_views(model, x, layers))

    seconds = _best(forward, repeats)
    name = next(iter(layers))
    return seconds, views[name], layers[name]


def layer_seconds(view: OperatorView, layer: Any, choice: B.LayerChoice, repeats: int) -> tuple[float, bool]:
    """Seconds of ``layer_ess`` of one layer at ``choice``; ``(seconds, extrapolated)``: when the cost model
    says over ~20 s, a few spread positions are timed and scaled by the cost ratio."""
    op = view.op
    L = op.seq_len
    shape = B.LayerShape.of(op)
    if choice.rows is not None and choice.rows < shape.rows:
        from ess_train.measure import compute_copy

        r = choice.rows
        view = OperatorView(compute_copy(op, rows=r), view.u[:r], view.y[:r])
    size = layer.state_size(L)
    positions = choice.resolve(L)
    cost = B.layer_cost(shape, positions, choice.rows, choice.operators)
    extrapolate = cost / 7e10 > 20  # ~70 GFLOP-eq/s on this CPU
    timed = resolve_positions(4, L) if extrapolate else positions
    seconds = _best(
        lambda: layer_ess(view, size, timed, max_operators=choice.operators), 1 if extrapolate else repeats
    )
    if extrapolate:
        seconds *= cost / B.layer_cost(shape, timed, choice.rows, choice.operators)
    return seconds, extrapolate


def _stats(width: int) -> LayerESS:
    profile = [float(i % 7) for i in range(width)]
    return LayerESS(list(range(width)), profile, profile, 3.0, 6.0, 3.0, 0.5, 12.0, None, torch.zeros(1))


def state_bytes(n_layers: int, width: int, counts: list[int]) -> dict[int, int]:
    """``torch.save`` bytes of a monitor's state after each of ``counts`` synthetic measurements."""
    monitor = ESSMonitor()
    out: dict[int, int] = {}
    stats = _stats(width)
    for k in range(max(counts)):
        monitor.ess_history.record(50 * k, {f"blocks.{i}.mixer": stats for i in range(n_layers)})
        if k + 1 in counts:
            buf = io.BytesIO()
            torch.save(monitor.state_dict(), buf)
            out[k + 1] = len(buf.getvalue())
    return out


def v2_bytes_per_measurement(n_layers: int, width: int) -> float:
    """Bytes per measurement of the version-2 state (every profile, as lists), from 100 synthetic ones."""
    keys = ("steps", "avg_entropy", "max_entropy", "avg_tolerance", "utilization", "total", "per_kv")
    history = {}
    for i in range(n_layers):
        hist: dict[str, Any] = {k: [1.5 + j for j in range(100)] for k in keys}
        hist["profiles"] = [[1.5 + j + p for p in range(width)] for j in range(100)]
        hist["tolerance_profiles"] = [[0.5 + j + p for p in range(width)] for j in range(100)]
        history[f"blocks.{i}.mixer"] = hist
    buf = io.BytesIO()
    torch.save({"history": history}, buf)
    return len(buf.getvalue()) / 100


def regularizer_steps(shape: B.LayerShape, step: float, n_layers: int) -> float:
    """The regularizer's defaults (16 positions, 2 rows, 8 operators, every step), forward + backward
    (~3x), in training steps of the model, by the cost model."""
    from ess_train.measure.penalty import DEFAULT_PENALTY_POSITIONS

    pos = resolve_positions(DEFAULT_PENALTY_POSITIONS, shape.seq_len)
    return 3 * n_layers * B.layer_cost(shape, pos, 2, 8) / step


def initializer_steps(shape: B.LayerShape, step: float, fwd: float, n_layers: int, positions: Any) -> float:
    """The initializer's search (per layer up to 16 trials + before + after, each a probe forward of the whole
    model and the layer's ESS at ``positions``), once, in training steps, by the cost model."""
    per_layer = 18 * (fwd + B.layer_cost(shape, resolve_positions(positions, shape.seq_len)))
    return n_layers * per_layer / step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="L 128, 2 and 4 layers, 1 repeat (a few seconds)")
    p.add_argument("--mixers", nargs="*", default=list(MIXERS))
    p.add_argument("--layers", nargs="*", type=int, default=[4, 12, 32])
    p.add_argument("--seq-lens", nargs="*", type=int, default=[256, 1024, 4096])
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="training batch rows (and probe rows)")
    p.add_argument("--every", type=int, default=50, help="measure every this many steps")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    if args.quick:
        args.layers, args.seq_lens, args.repeats, args.d_model = [2, 4], [128], 1, 32
    measurements = 100_000 // args.every
    counts = sorted({100, 400, measurements} if not args.quick else {100, 400})
    device = f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"\nESSMonitor at scale: d_model {args.d_model}, batch = probe {args.batch} rows, every {args.every} "
        f"steps, {device}; times per layer/block x depth; ~: extrapolated by the cost model"
    )
    print(
        "| mixer | layers | L | default: positions, rows per layer | s/measurement | share | "
        "all positions: s/measurement | share | train s/step |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    sizes: list[str] = []
    state_cache: dict[tuple[int, int], dict[int, int]] = {}
    others: list[str] = []
    for mixer in args.mixers:
        for L in args.seq_lens:
            train_s, _ = train_step_seconds(MIXERS[mixer], L, args.d_model, args.batch, args.repeats)
            fwd_s, view, layer = probe_seconds(MIXERS[mixer], L, args.d_model, args.batch, args.repeats)
            shape = B.LayerShape.of(view.op)
            full = B.LayerChoice(None, None, None, 0.0)
            all_s, all_x = layer_seconds(view, layer, full, args.repeats)
            cache: dict[tuple, tuple[float, bool]] = {}
            for n in args.layers:
                step, fwd = step_flops(MIXERS[mixer], n, L, args.d_model, args.batch)
                shapes = {f"blocks.{i}.mixer": shape for i in range(n)}
                plan = B.plan_measurement(
                    shapes,
                    B.training_budget(step, args.every, 0.05),
                    forward=B.FORWARD_FACTOR * fwd,
                    step_flops=step,
                    probe_rows=args.batch,
                )
                (choice,) = {(c.positions, c.rows, c.operators) for c in plan.layers.values()}
                c = next(iter(plan.layers.values()))
                if choice not in cache:
                    cache[choice] = layer_seconds(view, layer, c, args.repeats)
                per_layer, x = cache[choice]
                # the monitor's probe forward runs on the rows the plan measures (scaled from all rows)
                default_s = n * (fwd_s * (c.rows or shape.rows) / shape.rows + per_layer)
                every_s = n * (fwd_s + all_s)
                train = n * train_s * args.every
                pos = "all" if c.positions is None else c.positions
                rows = f"{c.rows or shape.rows}/{shape.rows}"
                cells = [f"{'~' if x else ''}{default_s:.3g}", f"{default_s / train:.1%}"]
                cells += [
                    f"{'~' if all_x else ''}{every_s:.3g}",
                    f"{every_s / train:.0%}",
                    f"{n * train_s:.3g}",
                ]
                print(f"| {mixer} | {n} | {L} | {pos}, {rows} | " + " | ".join(cells) + " |")
                width = L if c.positions is None else len(c.resolve(L))
                if (n, width) not in state_cache:
                    state_cache[(n, width)] = state_bytes(n, width, counts)
                got = state_cache[(n, width)]
                v2 = v2_bytes_per_measurement(n, L) * measurements
                sizes.append(
                    f"| {mixer} | {n} | {L} | {width} | "
                    + " | ".join(f"{got[k] / 1e3:,.0f}" for k in counts)
                    + f" | {got[400] / got[100]:.2f} | {v2 / 1e6:,.0f} |"
                )
                reg = regularizer_steps(shape, step, n)
                if callable(getattr(layer, "init_search_space", None)):
                    init = [f"{initializer_steps(shape, step, fwd, n, p):,.0f}" for p in (None, 64)]
                else:
                    init = ["no search space"] * 2
                others.append(f"| {mixer} | {n} | {L} | {reg:.2g} | " + " | ".join(init) + " |")
    print(
        f"\ncheckpointed monitor state (kB) after N measurements (synthetic, at the default plan's width); "
        f"version 2 kept every profile: MB after {measurements}, extrapolated"
    )
    print(
        "| mixer | layers | L | positions | " + " | ".join(f"N={k}" for k in counts) + " | 400/100 | v2 MB |"
    )
    print("|---|---|---|---|" + "---|" * len(counts) + "---|---|")
    print("\n".join(sizes))
    print(
        "\ncost model, in training steps: the regularizer's defaults per step (forward + backward); the "
        "initializer's search once (max_trials 16), at all positions and at 64"
    )
    print(
        "| mixer | layers | L | regularizer / step | initializer, all positions | initializer, 64 positions |"
    )
    print("|---|---|---|---|---|---|")
    print("\n".join(others))


if __name__ == "__main__":
    main()
