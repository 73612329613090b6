"""Study 4, redesigned: initialization as a dose, and the paper's ESS-against-TSS test for S6 and GLA.

``--part init`` (no training, seconds): the same S6 and GLA layers at N in {4, 8, 16, 32}, 3 seeds, ESS on
16 MQAR rows (L = 128), all positions, per layer; the paper's test at initialization.

``--part bound``: S6 (the zoo's Mamba, expand 1) and GLA (4 heads, d_v 16) at the same per-layer TSS
``64 * N`` (Mamba ``d_state = N``, GLA ``d_k = N``) for N in {4, 8, 32}, each after a short convolution, on
MQAR with L = 128 >= 4 N (so the per-position bound ``min(N, i, L - i)`` does not cap the middle positions),
vocabulary 256 and 16 kv pairs, 1 seed; ESS at initialization (the monitor's step-0 measurement) and after
1,000 steps.

``--part dose``: the initialization as a dose on study 1's task (L = 64, 8 kv pairs): GLA's
``gate_logit_normalizer`` in {1, 4, 16, 64, 256} (larger: gates nearer 1, longer memory at initialization;
16 is fla's default); Mamba's ``dt_range`` in {1e-4..1e-2, 1e-3..1e-1, 1e-2..1} (d_state 8); 1 seed each.
Initial utilization against final accuracy.

Monitor and training as in ``experiments/matched_tss``. One CSV row per run in ``results/<part>.csv``, curves
in ``results/<part>_curves.csv``. Resumable.

    PYTHONPATH=. .venv/bin/python experiments/init_dose/run.py --part init
    PYTHONPATH=. .venv/bin/python experiments/init_dose/run.py --part bound --workers 2
    PYTHONPATH=. .venv/bin/python experiments/init_dose/run.py --part dose --workers 2
    PYTHONPATH=. .venv/bin/python experiments/init_dose/plot.py
    PYTHONPATH=. .venv/bin/python experiments/init_dose/run.py --smoke --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import itertools
import os
from pathlib import Path

from experiments.common import run_study, write_rows
from experiments.matched_tss.run import hybrid_overrides

HERE = Path(__file__).resolve().parent
STATE_SIZES = [4, 8, 32]
INIT_STATE_SIZES = [4, 8, 16, 32]
INIT_SEEDS = [0, 1, 2]
BOUND_SEEDS = [0]
BOUND_TASK = ["task.seq_len=128", "task.vocab_size=256", "task.num_kv_pairs=16"]  # Zoology: vocab > L
NORMALIZERS = [1, 4, 16, 64, 256]
DOSE_SEEDS = [0]
DT_RANGES = [(0.0001, 0.01), (0.001, 0.1), (0.01, 1.0)]
A_INITS = ["s4d_real"]


def layer_kwargs(family: str, n: int) -> dict:
    """Mixer kwargs of the S6 / GLA layer with state size ``n`` per operator and TSS ``64 n`` (d_model 64)."""
    if family == "mamba":
        return {"d_state": n, "expand": 1}
    return {"num_heads": 4, "expand_k": n * 4 / 64, "expand_v": 1.0}


def ess_at_init(out_csv: Path, smoke: bool = False, seeds: list[int] | None = None) -> Path:
    """Part ``init``: entropy- and tolerance-ESS of the untrained S6 and GLA layers, one CSV row per layer
    (``seeds``: the model seeds, ``INIT_SEEDS`` by default)."""
    import torch

    from ess_train.measure import layer_ess
    from ess_train.models import SequenceModel
    from ess_train.tasks import MQARDataModule

    torch.set_num_threads(int(os.environ.get("ESS_THREADS", "1")))
    L, kv = (32, 4) if smoke else (128, 16)
    dm = MQARDataModule(seq_len=L, vocab_size=2 * L, num_kv_pairs=kv, num_train=64, num_test=64, seed=0)
    dm.setup("fit")
    inputs = next(iter(dm.val_dataloader()))["inputs"][: 2 if smoke else 16]
    rows = []
    grid = (
        [("gla", 4, 0)]
        if smoke
        else itertools.product(["mamba", "gla"], INIT_STATE_SIZES, seeds or INIT_SEEDS)
    )
    for family, n, seed in grid:
        torch.manual_seed(seed)
        model = SequenceModel(
            vocab_size=dm.vocab_size,
            d_model=64,
            n_layers=2,
            mixer=["short_conv", family],
            mixer_kwargs={family: layer_kwargs(family, n)},
        ).eval()
        sizes = model.state_sizes(L)
        with torch.no_grad():
            views = model.ess_operators(inputs)
        name = "blocks.1.mixer"
        stats = layer_ess(views[name], sizes[name], None)
        rows.append(
            {
                "run_id": f"{family}_N{n}_s{seed}",
                "family": family,
                "N": n,
                "seed": seed,
                "seq_len": L,
                "tss": sizes[name].total,
                "avg_entropy": stats.avg_entropy,
                "avg_tolerance": stats.avg_tolerance,
                "utilization": stats.utilization,
                "total_ess": stats.total,
            }
        )
        print(f"{rows[-1]['run_id']}: ESS/op {stats.avg_entropy:.2f} utilization {stats.utilization:.3f}")
    write_rows(out_csv, rows)
    return out_csv


def bound_points(smoke: bool = False) -> dict[str, list[str]]:
    """S6 and GLA at matched TSS ``64 N``, L = 128."""
    grid = [(4, 0)] if smoke else list(itertools.product(STATE_SIZES, BOUND_SEEDS))
    out = {}
    for n, seed in grid:
        for family in ("mamba", "gla"):
            kw = "{" + ",".join(f"{k}:{v:g}" for k, v in layer_kwargs(family, n).items()) + "}"
            out[f"{family}_N{n}_s{seed}"] = hybrid_overrides(family, kw, BOUND_TASK, seed, smoke=smoke)
    return out


def dose_points(smoke: bool = False) -> dict[str, list[str]]:
    """GLA gate normalizer x seed; Mamba dt range x A init."""
    task = ["task.num_kv_pairs=8"]
    out = {}
    for g, seed in [(1, 0)] if smoke else itertools.product(NORMALIZERS, DOSE_SEEDS):
        out[f"gla_g{g}_s{seed}"] = hybrid_overrides(
            "gla", f"{{gate_logit_normalizer:{g}}}", task, seed, smoke=smoke
        )
    for (lo, hi), a_init in [(DT_RANGES[0], "constant")] if smoke else itertools.product(DT_RANGES, A_INITS):
        kw = f"{{d_state:8,expand:1,dt_min:{lo:g},dt_max:{hi:g},a_init:{a_init}}}"
        out[f"mamba_dt{lo:g}-{hi:g}_{a_init}_s0"] = hybrid_overrides("mamba", kw, task, 0, smoke=smoke)
    return out


PARTS = {"bound": bound_points, "dose": dose_points}


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one point per family and part, a few steps")
    parser.add_argument("--part", choices=["init", *PARTS, "all"], default="all")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    paths = []
    if args.part in ("init", "all"):
        paths.append(ess_at_init(args.out / ("init_smoke.csv" if args.smoke else "init.csv"), args.smoke))
    for part in [p for p in PARTS if args.part in (p, "all")]:
        stem = f"{part}_smoke" if args.smoke else part
        paths.append(run_study(PARTS[part](args.smoke), args.out, stem, args.workers))
    return paths


if __name__ == "__main__":
    main()
