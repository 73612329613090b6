"""Studies 1 and 2, redesigned: ESS against TSS at matched TSS, and collapse / saturation against difficulty.

Every model is a 2-layer hybrid, a short causal convolution then the recurrence (``model.mixer=[short_conv,
<family>]``, d_model 64, 4 heads, d_v 16), so that the three families {GLA, decayed linear attention, linear
attention} have exactly the same per-layer TSS ``4 * d_k * 16`` at d_k in {2, 8, 32}: TSS 128, 512, 2048.
MQAR with L = 64 and kv in {2, 8} (at TSS 128 the 4 two-dimensional keys per layer span fewer directions
than 8 pairs need: beyond the state), 2 seeds, 1,000 steps of batch 32 (lr 3e-3). Softmax attention with rotary
positions and 4 heads (TSS not matched: it grows with L) runs alongside at the same kv and seeds.

The monitor measures 32 probe rows every 100 steps with no cost budget (all positions), both ESS kinds; one
CSV row per run (``results/runs.csv``) with final accuracy, initial and final utilization, entropy- and
tolerance-ESS per layer; the per-step curves go to ``results/runs_curves.csv``. Resumable.

    PYTHONPATH=. .venv/bin/python experiments/matched_tss/run.py --workers 2
    PYTHONPATH=. .venv/bin/python experiments/matched_tss/plot.py
    PYTHONPATH=. .venv/bin/python experiments/matched_tss/run.py --smoke --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from experiments.common import run_study

HERE = Path(__file__).resolve().parent
FAMILIES = ["gla", "decayed_linear_attention", "linear_attention"]
# per-layer TSS -> d_k (4 heads, d_v 16); not d_k = 1: a rank-1 operator has ESS 1 wherever it is nonzero,
# so ESS would equal TSS by construction
KEY_DIMS = {128: 2, 512: 8, 2048: 32}
KV_PAIRS = [2, 8]
SEEDS = [0, 1]
STEPS = 1000
TEACHERS = ("gla", 2048)  # (family, TSS) of the runs whose checkpoints study 5 distils
COMMON = [
    "logger=csv",
    "save_plots=false",
    "task.batch_size=32",
    "trainer.val_check_interval=250",
    "callbacks.monitor.every_n_steps=100",
    "+callbacks.monitor.probe_size=32",
    "+callbacks.monitor.budget=null",
    "+callbacks.monitor.log_heatmap=false",
]
SMOKE = ["trainer.max_steps=3", "task.num_train=64", "task.num_test=32", "task.batch_size=16"]


def family_kwargs(family: str, tss: int) -> str:
    """The ``mixer_kwargs`` entry giving ``family`` 4 heads, d_v 16 and d_k = ``KEY_DIMS[tss]`` at d_model 64."""
    d_k = KEY_DIMS[tss]
    if family == "linear_attention":
        return f"{{num_heads:4,feature_dim:{d_k}}}"
    return f"{{num_heads:4,expand_k:{d_k * 4 / 64:g},expand_v:1.0}}"


def hybrid_overrides(
    family: str,
    kwargs: str,
    task: list[str],
    seed: int,
    steps: int = STEPS,
    smoke: bool = False,
    keep_checkpoint: bool = False,
) -> list[str]:
    """The overrides of one study run: a short convolution then ``family`` (``mixer_kwargs`` ``kwargs``), the
    ``task`` overrides, the studies' training and monitor settings (``COMMON``)."""
    return [
        "model=hybrid_conv_gla",
        f"model.mixer=[short_conv,{family}]",
        f"+model.mixer_kwargs.{family}={kwargs}",
        *task,
        f"seed={seed}",
        f"trainer.max_steps={steps}",
        *([] if keep_checkpoint else ["checkpoint=none"]),
        *COMMON,
        *(SMOKE if smoke else []),
    ]


def points(smoke: bool = False, seeds: list[int] | None = None, steps: int = STEPS) -> dict[str, list[str]]:
    """``run_id -> overrides``, seed-major (an interrupted study holds whole seeds): family x TSS x kv, then
    attention x kv; one GLA run and one attention run of a few steps when smoke."""
    seeds = [0] if smoke else (seeds or SEEDS)
    kvs = [8] if smoke else KV_PAIRS
    out: dict[str, list[str]] = {}
    for seed in seeds:
        grid = [("gla", 2048)] if smoke else list(itertools.product(FAMILIES, KEY_DIMS))
        for kv in kvs:
            for family, tss in grid:
                # the largest-state GLA runs keep their last checkpoint: study 5's teachers
                out[f"{family}_tss{tss}_kv{kv}_s{seed}"] = hybrid_overrides(
                    family,
                    family_kwargs(family, tss),
                    [f"task.num_kv_pairs={kv}"],
                    seed,
                    steps,
                    smoke,
                    keep_checkpoint=(family, tss) == TEACHERS,
                )
        for kv in kvs:
            out[f"attention_kv{kv}_s{seed}"] = hybrid_overrides(
                "attention", "{num_heads:4,rotary:true}", [f"task.num_kv_pairs={kv}"], seed, steps, smoke
            )
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="two runs of a few steps, same code path")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    stem = "runs_smoke" if args.smoke else "runs"
    return run_study(points(args.smoke, args.seeds, args.steps), args.out, stem, args.workers)


if __name__ == "__main__":
    main()
