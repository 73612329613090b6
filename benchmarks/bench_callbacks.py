"""Training-time overhead of the ESS callbacks on a small SequenceModel.

Runs the same training (same seed, same data) with no callback, with ``ESSMonitor`` every 50 steps and
with ``ESSRegularizer`` every step, interleaved over ``--repeats`` rounds (best kept), and prints a table.
``ms/step`` is the median training-step time (robust to other load on a shared machine) plus the time
spent in the monitor's measurements amortized over the run; ``ratio`` compares it with no callback.
``wall`` (train start to end, start-up and data generation excluded) is reported too, but is noisy.

    python benchmarks/bench_callbacks.py            # GLA, d_model 64, 2 layers, L 128, batch 32, 200 steps
    python benchmarks/bench_callbacks.py --quick    # 60 steps, monitor every 20
    python benchmarks/bench_callbacks.py --device cuda --gpu-model   # issue 16's model on a GPU

``--gpu-model``: the issue's target model, d_model 512, 4 layers, L 1024, batch 16, bf16 autocast
(``bf16-mixed``; options given explicitly still win). The last table holds the targets: ESSMonitor every 50
steps at most 5% of the training time, ESSRegularizer every step at most 1.3x the step time (PASS/MISS).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Any

import lightning.pytorch as pl
import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.timing import Target, add_device_argument, describe, resolve_device, target_table  # noqa: E402
from ess_train.callbacks import ESSMonitor, ESSRegularizer  # noqa: E402
from ess_train.measure import ess_penalty  # noqa: E402
from ess_train.models import SequenceModel, capture_operators, find_ess_layers  # noqa: E402
from ess_train.tasks import MQARDataModule  # noqa: E402

try:
    from ess_train.lit import SequenceLM
except ImportError:  # pragma: no cover - the lead's module not there yet
    SequenceLM = None  # type: ignore[assignment]


MONITOR_TARGET = 5.0  # issue 16: ESSMonitor every 50 steps, % of the training time
REGULARIZER_TARGET = 1.3  # issue 16: ESSRegularizer every step, step-time ratio
GPU_MODEL = {"d_model": 512, "layers": 4, "seq_len": 1024, "batch": 16, "precision": "bf16-mixed"}


class StepTimer(pl.Callback):
    """Wall time of the run and of each batch (put it last: it includes the others' batch-end hooks)."""

    def __init__(self) -> None:
        self.elapsed = 0.0
        self.steps: list[float] = []
        self._t0 = self._tb = 0.0

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = self._now()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int
    ) -> None:
        self._tb = self._now()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.steps.append(self._now() - self._tb)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.elapsed = self._now() - self._t0


def timed_monitor(monitor: ESSMonitor) -> ESSMonitor:
    """Accumulate the time spent in ``monitor.measure`` in ``monitor.bench_seconds``."""
    monitor.bench_seconds = 0.0  # type: ignore[attr-defined]
    measure = monitor.measure

    def wrapped(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        t0 = StepTimer._now()
        out = measure(trainer, pl_module)
        monitor.bench_seconds += StepTimer._now() - t0  # type: ignore[attr-defined]
        return out

    monitor.measure = wrapped  # type: ignore[method-assign]
    return monitor


def build(args: argparse.Namespace) -> pl.LightningModule:
    model = SequenceModel(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        mixer=args.mixer,
        max_seq_len=args.seq_len,
    )
    if SequenceLM is None:
        raise SystemExit("ess_train.lit.SequenceLM is needed")
    return SequenceLM(model, lr=1e-3, warmup_steps=10)


def run(
    args: argparse.Namespace, name: str, callbacks: list[pl.Callback], dm: MQARDataModule
) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    lm = build(args)
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        max_steps=args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        precision=args.precision,
        callbacks=[*callbacks, timer],
    )
    trainer.fit(lm, dm)
    median = statistics.median(timer.steps)
    in_monitor = sum(getattr(cb, "bench_seconds", 0.0) for cb in callbacks)
    # steady-state cost per step: the median step (robust to other load on the machine), plus the
    # monitor's measurements amortized over the run (they sit in a few steps the median ignores)
    return {"wall": timer.elapsed, "per_step": median + in_monitor / args.steps, "callbacks": callbacks}


def interleaved_penalty_cost(args: argparse.Namespace, dm: MQARDataModule, iters: int) -> tuple[float, float]:
    """Median forward+backward time without / with the regularizer's penalty, alternating A/B each
    iteration on one model and batch (robust to slowly varying load on a shared machine)."""
    pl.seed_everything(0, verbose=False)
    on_gpu = args.accelerator in ("cuda", "gpu") or (args.accelerator == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if on_gpu else "cpu")
    lm = build(args).to(device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.precision.startswith("bf16")
        else contextlib.nullcontext()
    )
    reg = ESSRegularizer(weight=1e-2, min_utilization=0.5)
    layers = find_ess_layers(lm)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    inputs, labels = batch["inputs"].to(device), batch["labels"].to(device)
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(2 * iters + 2):
        with_penalty = bool(i % 2)
        lm.zero_grad(set_to_none=True)
        t0 = StepTimer._now()
        with capture_operators(layers) as views, autocast:
            logits = lm(inputs)
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100
        )
        if with_penalty:
            penalty = ess_penalty(
                views,
                layers,
                reg.mode,
                min_utilization=reg.min_utilization,
                max_ess=reg.max_ess,
                positions=reg.positions,
                batch_rows=reg.batch_rows,
                max_operators=reg.max_operators,
                offset=i,
            )
            loss = loss + reg.weight * penalty
        loss.backward()
        if i >= 2:  # first pair: warm-up
            times[with_penalty].append(StepTimer._now() - t0)
    return statistics.median(times[False]), statistics.median(times[True])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="60 steps, monitor every 20, 1 repeat")
    p.add_argument("--mixer", default="gla")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--kv", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--monitor-every", type=int, default=50)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--gpu-model", action="store_true", help="d_model 512, 4 layers, L 1024, batch 16, bf16")
    add_device_argument(p)
    p.add_argument("--accelerator", default=None, help="Lightning's accelerator (default: from --device)")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--monitor-positions", default="all", help="'all' or a count of positions")
    p.add_argument(
        "--ab-iters", type=int, default=30, help="interleaved A/B iterations of the penalty (0: skip)"
    )
    p.add_argument(
        "--ab-mixers",
        nargs="*",
        default=["mamba", "decayed_linear_attention", "attention"],
        help="mixers for a second A/B table of the penalty's cost (none: skip)",
    )
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    args.accelerator = args.accelerator or device.type
    if args.gpu_model:  # the model; options given explicitly still win
        for key, value in GPU_MODEL.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    if args.quick:  # smaller defaults; options given explicitly still win
        for key, value in (
            ("steps", 60),
            ("monitor_every", 20),
            ("repeats", 1),
            ("ab_iters", 10),
            ("ab_mixers", []),
        ):
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    positions = None if args.monitor_positions == "all" else int(args.monitor_positions)

    dm = MQARDataModule(
        vocab_size=args.vocab,
        seq_len=args.seq_len,
        num_kv_pairs=args.kv,
        num_train=args.batch * args.steps,
        num_test=args.batch,
        batch_size=args.batch,
    )
    run(args, "warm-up", [], dm) if not args.quick else None
    configs = [
        ("no callback", lambda: []),
        (
            f"ESSMonitor every {args.monitor_every}",
            lambda: [timed_monitor(ESSMonitor(args.monitor_every, positions=positions))],
        ),
        ("ESSRegularizer every step", lambda: [ESSRegularizer(weight=1e-2, min_utilization=0.5)]),
    ]
    best: dict[str, dict[str, float]] = {}
    extra: dict[str, str] = {}
    for _ in range(args.repeats):
        for name, make in configs:
            out = run(args, name, make(), dm)
            prev = best.get(name)
            best[name] = {k: min(out[k], prev[k]) if prev else out[k] for k in ("wall", "per_step")}
            for cb in out["callbacks"]:
                if isinstance(cb, ESSMonitor):
                    n = len(cb.totals["steps"])
                    extra[name] = f"{n} measurements, {1000 * cb.bench_seconds / max(n, 1):.0f} ms each"
                if isinstance(cb, ESSRegularizer):
                    extra[name] = f"{cb.num_calls} penalties"
    print(
        f"\n{args.mixer}, d_model {args.d_model}, {args.layers} layers, L {args.seq_len}, "
        f"batch {args.batch}, {args.steps} steps, {args.precision}, device {device.type}: "
        f"{describe(device)}, best of {args.repeats}"
    )
    base = best["no callback"]
    print(f"{'config':<28} {'wall s':>8} {'ms/step':>8} {'ratio':>6} {'wall ratio':>10}  note")
    for name, _ in configs:
        b = best[name]
        ratio, wall_ratio = b["per_step"] / base["per_step"], b["wall"] / base["wall"]
        print(
            f"{name:<28} {b['wall']:>8.2f} {1000 * b['per_step']:>8.1f} {ratio:>6.3f} "
            f"{wall_ratio:>10.3f}  {extra.get(name, '')}"
        )
    print("ms/step: median step + monitor time amortized over the run; ratio: of ms/step; wall ratio: noisy")
    monitor_name, reg_name = configs[1][0], configs[2][0]
    targets = [
        Target(
            f"{monitor_name}: overhead over training time",
            100 * (best[monitor_name]["per_step"] / base["per_step"] - 1),
            MONITOR_TARGET,
            at_least=False,
            unit="%",
        ),
        Target(
            f"{reg_name}: step-time ratio",
            best[reg_name]["per_step"] / base["per_step"],
            REGULARIZER_TARGET,
            at_least=False,
        ),
    ]
    if args.ab_iters:
        plain, penalized = interleaved_penalty_cost(args, dm, args.ab_iters)
        print(
            f"forward+backward, interleaved A/B x{args.ab_iters} (median): {1000 * plain:.1f} ms plain, "
            f"{1000 * penalized:.1f} ms with the ESS penalty: ratio {penalized / plain:.3f}"
        )
        targets.append(
            Target(
                "ESS penalty, forward+backward A/B ratio",
                penalized / plain,
                REGULARIZER_TARGET,
                at_least=False,
            )
        )
    where = (
        f"{args.mixer}, d_model {args.d_model}, {args.layers} layers, L {args.seq_len}, batch {args.batch}"
    )
    print()
    print(target_table(targets, f"targets (issue 16), {where}, {args.precision}, device {device.type}:"))
    if args.ab_iters:
        others = [m for m in args.ab_mixers if m != args.mixer]
        if others:
            print(
                f"\nthe same A/B for other mixers (d_model {args.d_model}, {args.layers} layers, "
                f"L {args.seq_len}):"
            )
            print("| mixer | plain ms | with penalty ms | ratio |\n|---|---|---|---|")
            for mixer in others:
                plain, penalized = interleaved_penalty_cost(
                    argparse.Namespace(**{**vars(args), "mixer": mixer}), dm, args.ab_iters
                )
                print(f"| {mixer} | {1000 * plain:.1f} | {1000 * penalized:.1f} | {penalized / plain:.3f} |")


if __name__ == "__main__":
    main()
