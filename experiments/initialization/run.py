"""Study 3: ESS at initialization, and ESSInitializer against the default initialization.

(a) ``ess_at_init.csv``: no training. Models are built (several seeds), one batch of MQAR inputs goes through
    ``model.ess_operators``, and entropy-ESS is computed per layer (``ess_train.measure.layer_ess``,
    the monitor's own reduction). Mamba: ``d_state`` grows; GLA: per-head ``d_k`` grows (``expand_k``) and the
    number of heads grows at a fixed key width. TSS = the layer's total theoretical state size
    (Mamba ``d_inner * N``, GLA ``heads * d_k * d_v``); per-operator bound = ``d_state`` / ``d_k``.
(b) ``init_vs_default.csv``: the app (``experiment=init_default`` / ``experiment=init_ess``) on MQAR with a fixed
    step budget, GLA and Mamba, two seeds, through ``experiments.common.run_grid``.

``--hybrid`` (part (b) only): each model is a short causal convolution followed by the mixer
(``model.mixer=[short_conv,<m>]``; the initializer has nothing to choose for the conv layer), trained for
``HYBRID_STEPS`` steps, a budget in which the default initialization learns MQAR partly.

    PYTHONPATH=. .venv/bin/python experiments/initialization/run.py            # full (~10 min, 1 CPU thread)
    PYTHONPATH=. .venv/bin/python experiments/initialization/run.py --hybrid --part b \
        --out experiments/initialization/results/hybrid
    PYTHONPATH=. .venv/bin/python experiments/initialization/run.py --smoke [--hybrid]   # seconds
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import torch

from experiments.common import run_grid

HERE = Path(__file__).resolve().parent

MAMBA_SMALL = "+model.mixer_kwargs={d_state:8,expand:1}"  # Mamba at 1/3 of the default cost (CPU budget)
HYBRID_STEPS = {"gla": 600, "mamba": 800}  # pilots (seed 0, default init): val acc 0.46 (GLA), 0.26 (Mamba)


def ess_at_init_points(smoke: bool) -> list[tuple[str, str, dict]]:
    """(family, sweep, mixer_kwargs) of part (a)."""
    pts: list[tuple[str, str, dict]] = []
    d_states = [2, 8] if smoke else [1, 2, 4, 8, 16, 32, 64]
    for n in d_states:
        pts.append(("mamba", "d_state", {"d_state": n}))
    expand_ks = [0.125, 0.5] if smoke else [0.0625, 0.125, 0.25, 0.5, 1.0, 2.0]  # d_k = 64 * e / 2 heads
    for e in expand_ks:
        pts.append(("gla", "head_dim", {"num_heads": 2, "expand_k": e}))
    heads = [2] if smoke else [1, 2, 4, 8, 16]  # key width 32 split over more heads
    for h in heads:
        pts.append(("gla", "num_heads", {"num_heads": h, "expand_k": 0.5}))
    return pts


def run_ess_at_init(out_csv: Path, smoke: bool) -> list[dict]:
    from ess_train.measure import layer_ess, resolve_positions
    from ess_train.models import SequenceModel
    from ess_train.tasks import MQARDataModule

    torch.set_num_threads(int(os.environ.get("ESS_THREADS", "1")))
    L, kv = (32, 4) if smoke else (64, 8)
    dm = MQARDataModule(seq_len=L, num_kv_pairs=kv, num_train=64, num_test=64, seed=0)
    dm.setup("fit")
    inputs = next(iter(dm.val_dataloader()))["inputs"][: (2 if smoke else 4)]
    seeds = [0] if smoke else [0, 1, 2]
    positions = resolve_positions(8 if smoke else 16, L)
    rows = []
    for family, sweep, kw in ess_at_init_points(smoke):
        for seed in seeds:
            torch.manual_seed(seed)
            model = SequenceModel(
                vocab_size=dm.vocab_size, d_model=64, n_layers=2, mixer=family, mixer_kwargs=kw
            ).eval()
            sizes = model.state_sizes(L)
            start = time.time()
            with torch.no_grad():
                views = model.ess_operators(inputs)
            for name, view in views.items():
                stats = layer_ess(view, sizes[name], positions, tolerance=True, max_operators=32)
                size = sizes[name]
                rows.append(
                    {
                        "family": family,
                        "sweep": sweep,
                        "seed": seed,
                        "layer": name.removeprefix("blocks."),
                        **{f"kw_{k}": v for k, v in kw.items()},
                        "per_operator_bound": size.per_operator,
                        "tss": size.total,
                        "avg_entropy": stats.avg_entropy,
                        "avg_tolerance": stats.avg_tolerance,
                        "utilization": stats.utilization,
                        "total_ess": stats.total,
                        "total_over_tss": stats.total / size.total,
                        "seconds": round(time.time() - start, 2),
                    }
                )
            print(
                f"{family} {kw} seed {seed}: ESS/op {rows[-1]['avg_entropy']:.2f} "
                f"util {rows[-1]['utilization']:.3f} total/TSS {rows[-1]['total_over_tss']:.3f}",
                flush=True,
            )
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with out_csv.open("w", newline="") as fh:
        keys: list[str] = []
        for r in rows:
            keys.extend(k for k in r if k not in keys)
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return rows


def _steps(n: int) -> list[str]:
    return [
        f"trainer.max_steps={n}",
        f"trainer.val_check_interval={n}",
        f"callbacks.monitor.every_n_steps={n}",
    ]


def init_grid(smoke: bool, hybrid: bool = False, seeds: list[int] | None = None) -> dict[str, list[str]]:
    models = {
        "gla": ["model=gla"],
        "mamba": [
            "model=mamba",
            MAMBA_SMALL,
            "trainer.max_steps=250",
            "trainer.val_check_interval=250",
            "callbacks.monitor.every_n_steps=250",
        ],
    }
    if hybrid:
        models = {
            m: [f"model={m}", *(mov[1:2] if m == "mamba" else []), f"model.mixer=[short_conv,{m}]"]
            + _steps(HYBRID_STEPS[m])
            for m, mov in models.items()
        }
    seeds = [0] if smoke else seeds or [0, 1]
    smoke_ov = (
        [
            "trainer.max_steps=4",
            "trainer.val_check_interval=4",
            "callbacks.monitor.every_n_steps=4",
            "task.num_train=128",
            "task.num_test=64",
            "task.batch_size=16",
        ]
        if smoke
        else []
    )
    points = {}
    for m, mov in models.items():
        for init in ("default", "ess"):
            for s in seeds:
                points[f"{m}_{init}_s{s}"] = [f"experiment=init_{init}", *mov, f"seed={s}", *smoke_ov]
    return points


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--part", choices=["a", "b", "both"], default="both")
    p.add_argument("--hybrid", action="store_true", help="part (b) with short conv + mixer models")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="part (b) seeds")
    p.add_argument("--models", nargs="+", default=["gla", "mamba"], help="part (b) models")
    args = p.parse_args(argv)
    start = time.process_time(), time.time()
    if args.part in ("a", "both"):
        run_ess_at_init(args.out / "ess_at_init.csv", args.smoke)
    if args.part in ("b", "both"):
        grid = init_grid(args.smoke, args.hybrid, args.seeds)
        grid = {k: v for k, v in grid.items() if k.split("_", 1)[0] in args.models}
        run_grid(grid, args.out / "init_vs_default.csv", args.out, workers=args.workers)
    print(f"study 3 done: {time.process_time() - start[0]:.0f} s CPU, {time.time() - start[1]:.0f} s wall")


if __name__ == "__main__":
    main()
