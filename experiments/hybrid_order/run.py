"""Study 7: the order of a GLA + softmax-attention hybrid, and whether ESS explains its accuracy.

Two 2-layer hybrids on MQAR, the same parameters in another order: ``gla_first`` (GLA, then attention) and
``attention_first`` (attention, then GLA); attention as the paper's (4 heads, rotary positions). 4 seeds each,
the app's default training (2,000 steps), 8 key-value pairs. One CSV row per run (``results/runs.csv``):
validation accuracy and the monitor's final ESS per layer (utilization, total, per kv pair). Resumable.

    PYTHONPATH=. .venv/bin/python experiments/hybrid_order/run.py --workers 2
    PYTHONPATH=. .venv/bin/python experiments/hybrid_order/plot.py
    PYTHONPATH=. .venv/bin/python experiments/hybrid_order/run.py --smoke --out /tmp/smoke
"""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.common import run_grid

HERE = Path(__file__).resolve().parent
ORDERS = {"gla_first": "[gla,attention]", "attention_first": "[attention,gla]"}
SEEDS = [0, 1, 2, 3]
COMMON = [
    "model=gla",
    "+model.mixer_kwargs.attention={num_heads:4,rotary:true}",
    "task.num_kv_pairs=8",
    "logger=none",
    "save_plots=false",
    "checkpoint=none",
]
SMOKE = ["trainer.max_steps=3", "task.num_train=64", "task.num_test=32", "task.batch_size=16"]


def points(smoke: bool = False, seeds: list[int] | None = None) -> dict[str, list[str]]:
    """``run_id -> overrides``: each order x seed (one seed, a few steps, for the smoke variant)."""
    seeds = [0] if smoke else (seeds or SEEDS)
    return {
        f"{order}_s{seed}": [*COMMON, f"model.mixer={mixers}", f"seed={seed}", *(SMOKE if smoke else [])]
        for order, mixers in ORDERS.items()
        for seed in seeds
    }


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one seed per order, a few steps")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    csv_path = args.out / ("runs_smoke.csv" if args.smoke else "runs.csv")
    run_grid(points(args.smoke, args.seeds), csv_path, args.out, workers=args.workers)
    return csv_path


if __name__ == "__main__":
    main()
