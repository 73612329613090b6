"""Study 1: ESS and accuracy on MQAR.

Grid: mixer x d_model x num_kv_pairs x seed on top of ``conf/experiment/mqar_ess.yaml``; one CSV row per run
(``results/mqar_ess.csv``, via :func:`experiments.common.run_grid`). Resumable: rerunning skips finished rows.

    PYTHONPATH=. .venv/bin/python experiments/mqar_ess/run.py --workers 1
    PYTHONPATH=. .venv/bin/python experiments/mqar_ess/run.py --smoke --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from experiments.common import run_grid

HERE = Path(__file__).resolve().parent
MIXERS = ["linear_attention", "decayed_linear_attention", "gla", "attention", "mamba"]
WIDTHS = [8, 16, 32]
KV_PAIRS = [2, 4, 8]
SEEDS = [0, 1]
# Mamba is by far the slowest mixer on CPU: expand=1 halves its channels (state size stays d_model * d_state).
MIXER_OVERRIDES = {"mamba": ["+model.mixer_kwargs.expand=1"]}
# top-level keys, passed on the command line (as when the committed results were produced)
COMMON = ["optim.lr=1e-2", "optim.warmup_steps=20", "save_plots=false"]
SMOKE = ["trainer.max_steps=3", "task.num_train=64", "task.num_test=32", "task.batch_size=16"]


def points(smoke: bool = False) -> dict[str, list[str]]:
    """``run_id -> overrides`` of the study (or its two-run smoke variant)."""
    if smoke:
        grid = [("gla", 8, 2, 0), ("attention", 8, 4, 0)]
    else:
        grid = list(itertools.product(MIXERS, WIDTHS, KV_PAIRS, SEEDS))
    out: dict[str, list[str]] = {}
    for mixer, width, kv, seed in grid:
        run_id = f"{mixer}_d{width}_kv{kv}_s{seed}"
        out[run_id] = [
            f"model={mixer}",
            "experiment=mqar_ess",
            "logger=none",
            f"model.d_model={width}",
            f"task.num_kv_pairs={kv}",
            f"seed={seed}",
            *COMMON,
            *MIXER_OVERRIDES.get(mixer, []),
            *(SMOKE if smoke else []),
        ]
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="two runs of a few steps, same code path")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results", help="results directory")
    args = parser.parse_args(argv)
    csv_path = args.out / ("mqar_ess_smoke.csv" if args.smoke else "mqar_ess.csv")
    run_grid(points(args.smoke), csv_path, args.out, workers=args.workers)
    return csv_path


if __name__ == "__main__":
    main()
