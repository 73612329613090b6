"""Study 5: ESS around delimiters (EOS) in delimited recall, and its relation to accuracy.

Linear attention, GLA and softmax attention are trained by the app (``experiment=delim``) through
``experiments.common.run_grid`` (-> ``results/delim_runs.csv``). From each final checkpoint, entropy-ESS is
computed at every position 1..L-1 on 32 validation rows (``model.ess_operators`` + the monitor's reduction),
per layer; profiles are aligned relative to each EOS that has a successor segment (offsets -4..+4; offset 0 is
position ``e`` = the EOS index, i.e. ``H_e`` has the inputs *before* the EOS as its past; offset +1 is the first
block whose past contains the EOS) and averaged over EOSs.
Modulation score per layer: ``(ESS[e] - ESS[e+1]) / ESS[e]`` averaged over EOSs (1: memory wiped at the
delimiter, 0: no change, < 0: ESS grows across it). -> ``results/delim_modulation.csv``, ``delim_profiles.json``.

    PYTHONPATH=. .venv/bin/python experiments/delimiters/run.py            # full (~10 min, 1 CPU thread)
    PYTHONPATH=. .venv/bin/python experiments/delimiters/run.py --smoke    # seconds
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import torch

from experiments.common import dump_json, run_grid
from experiments.distillation.distill import load_trained

HERE = Path(__file__).resolve().parent
MODELS = ["linear_attention", "gla", "attention"]
OFFSETS = list(range(-4, 5))


def points(smoke: bool, steps: int, seeds: list[int]) -> dict[str, list[str]]:
    # optim.lr / save_plots are passed here (the grid is explicit about everything it varies).
    common = [
        "experiment=delim",
        "optim.lr=1e-2",
        "save_plots=false",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        f"callbacks.monitor.every_n_steps={steps}",
    ]
    if smoke:
        common += ["task.num_train=128", "task.num_test=64", "task.batch_size=16", "task.num_segments=2"]
    return {f"{m}_s{s}": [*common, f"model={m}", f"seed={s}"] for m in MODELS for s in seeds}


@torch.no_grad()
def eos_profiles(model: torch.nn.Module, inputs: torch.Tensor, eos: int) -> dict:
    """Per layer: full ESS profile (positions 1..L-1), EOS-aligned mean profile and the modulation score."""
    from ess_train.callbacks._common import layer_ess

    L = inputs.shape[1]
    positions = list(range(1, L))
    eos_pos = sorted(set((inputs[0] == eos).nonzero().flatten().tolist()))
    assert all(bool((inputs[:, e] == eos).all()) for e in eos_pos), "EOS positions differ across rows"
    eos_inner = [e for e in eos_pos if e + max(OFFSETS) < L and e + min(OFFSETS) >= 1]
    sizes = model.state_sizes(L)
    out = {"eos_positions": eos_pos, "used_eos": eos_inner, "layers": {}}
    for name, view in model.ess_operators(inputs).items():
        prof = layer_ess(view, sizes[name], positions, tolerance=False).profile
        ess = dict(zip(positions, prof))
        aligned = [sum(ess[e + o] for e in eos_inner) / len(eos_inner) for o in OFFSETS]
        mods = [(ess[e] - ess[e + 1]) / ess[e] for e in eos_inner if ess[e] > 0]
        out["layers"][name.removeprefix("blocks.")] = {
            "profile": prof,
            "aligned": aligned,
            "modulation": sum(mods) / len(mods),
            "ess_before": aligned[OFFSETS.index(0)],
            "ess_after": aligned[OFFSETS.index(1)],
            "avg_ess": sum(prof) / len(prof),
            "tss_per_op": sizes[name].per_operator,
        }
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("ESS_THREADS", "1")))
    t0 = time.process_time(), time.time()
    seeds = [0] if args.smoke else args.seeds
    pts = points(args.smoke, 3 if args.smoke else args.steps, seeds)
    rows = {r["run_id"]: r for r in run_grid(pts, args.out / "delim_runs.csv", args.out, workers=1)}
    profiles, mod_rows = {}, []
    for run_id, ov in pts.items():
        if rows.get(run_id, {}).get("error"):
            print(f"skip {run_id}: {rows[run_id]['error'][:100]}")
            continue
        model, dm = load_trained(ov, args.out / "runs" / run_id)
        from ess_train.tasks.delimited import delimited_vocab

        eos = delimited_vocab(dm.vocab_size)["eos"]
        inputs = next(iter(dm.val_dataloader()))["inputs"][: (4 if args.smoke else 32)]
        res = eos_profiles(model, inputs, eos)
        profiles[run_id] = res
        layers = res["layers"]
        mod_rows.append(
            {
                "run_id": run_id,
                "model": run_id.rsplit("_s", 1)[0],
                "seed": run_id.rsplit("_s", 1)[1],
                "val_acc": float(rows[run_id]["val_acc"]),
                "modulation_mean": sum(v["modulation"] for v in layers.values()) / len(layers),
                **{f"modulation/{k}": v["modulation"] for k, v in layers.items()},
                **{f"ess_before/{k}": v["ess_before"] for k, v in layers.items()},
                **{f"ess_after/{k}": v["ess_after"] for k, v in layers.items()},
                **{f"avg_ess/{k}": v["avg_ess"] for k, v in layers.items()},
            }
        )
        print(
            f"{run_id}: acc {mod_rows[-1]['val_acc']:.3f} modulation {mod_rows[-1]['modulation_mean']:.3f}",
            flush=True,
        )
    dump_json({"offsets": OFFSETS, "runs": profiles}, args.out / "delim_profiles.json")
    keys: list[str] = []
    for r in mod_rows:
        keys.extend(k for k in r if k not in keys)
    with (args.out / "delim_modulation.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(mod_rows)
    print(f"study 5 done: {time.process_time() - t0[0]:.0f} s CPU, {time.time() - t0[1]:.0f} s wall")


if __name__ == "__main__":
    main()
