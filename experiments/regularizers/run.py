"""Study 3, redesigned: the ESS regularizers with a weight sweep and enough seeds for an interval.

The model is study 1's conv + GLA at TSS 512 per layer (the app's default model: 4 heads, d_k 8, d_v 16) on
MQAR with L = 64 and 8 kv pairs, 1,000 steps of batch 32 (as in ``experiments/matched_tss``). Conditions,
each regularizing the GLA layer only (``model.blocks.1.mixer``; the convolution is left alone):

- ``none``: the monitor only, 6 seeds;
- ``floor``: ``ESSRegularizer(mode="floor", min_utilization=0.9, weight=1)``, 6 seeds (paired with ``none``);
- ``decay_identity`` at weights 100 and 1000, 3 seeds each: at weight 1 its term started near 2e-3 against
  a cross-entropy near 4 (the first design), so the sweep brings it to about 0.2-2, comparable to the loss.

One CSV row per run (``results/runs.csv``), per-step curves (loss, penalty, utilization) in
``results/runs_curves.csv``. Resumable.

    PYTHONPATH=. .venv/bin/python experiments/regularizers/run.py --workers 2
    PYTHONPATH=. .venv/bin/python experiments/regularizers/plot.py
    PYTHONPATH=. .venv/bin/python experiments/regularizers/run.py --smoke --out /tmp/smoke
"""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.common import run_study
from experiments.matched_tss.run import COMMON as MATCHED_COMMON
from experiments.matched_tss.run import SMOKE, STEPS

HERE = Path(__file__).resolve().parent
LAYER = "model.blocks.1.mixer"
SEEDS = list(range(6))
DECAY_WEIGHTS = [100.0, 1000.0]
DECAY_SEEDS = SEEDS[:3]
FLOOR_TARGET = 0.9


def conditions() -> dict[str, tuple[list[str], list[int]]]:
    """``condition -> (callback overrides, seeds)``."""
    reg = ["callbacks=regularized", f"+callbacks.regularizer.include=[{LAYER}]"]
    out: dict[str, tuple[list[str], list[int]]] = {
        "none": (["callbacks=default"], SEEDS),
        "floor": (
            [
                *reg,
                "callbacks.regularizer.mode=floor",
                "callbacks.regularizer.weight=1.0",
                f"+callbacks.regularizer.min_utilization={FLOOR_TARGET}",
            ],
            SEEDS,
        ),
    }
    for w in DECAY_WEIGHTS:
        out[f"decay_identity_w{w:g}"] = (
            [*reg, "callbacks.regularizer.mode=decay_identity", f"callbacks.regularizer.weight={w:g}"],
            DECAY_SEEDS,
        )
    return out


def points(smoke: bool = False) -> dict[str, list[str]]:
    """``run_id -> overrides`` (one seed of ``none`` and ``floor``, a few steps, when smoke)."""
    out: dict[str, list[str]] = {}
    # seed-major order: an interrupted study holds complete pairs
    for seed in [0] if smoke else SEEDS:
        for cond, (callbacks, seeds) in conditions().items():
            if seed not in seeds or (smoke and cond not in ("none", "floor")):
                continue
            out[f"{cond}_s{seed}"] = [
                "model=hybrid_conv_gla",
                "task.num_kv_pairs=8",
                f"seed={seed}",
                f"trainer.max_steps={STEPS}",
                "checkpoint=none",
                *callbacks,
                *MATCHED_COMMON,
                *(SMOKE if smoke else []),
            ]
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="two runs of a few steps, same code path")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    stem = "runs_smoke" if args.smoke else "runs"
    return run_study(points(args.smoke), args.out, stem, args.workers)


if __name__ == "__main__":
    main()
