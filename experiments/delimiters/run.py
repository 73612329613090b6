"""Study 5: ESS around delimiters (EOS) in delimited recall, and its relation to accuracy.

Linear attention, GLA and softmax attention are trained by the app (``experiment=delim``) through
``experiments.common.run_grid`` (-> ``results/delim_runs.csv``). From each final checkpoint, entropy-ESS is
computed at every position 1..L-1 on 32 validation rows (``model.ess_operators`` + the monitor's reduction),
per layer; profiles are aligned relative to each EOS that has a successor segment (offsets -4..+4; offset 0 is
position ``e`` = the EOS index, i.e. ``H_e`` has the inputs *before* the EOS as its past; offset +1 is the first
block whose past contains the EOS) and averaged over EOSs.
Modulation score per layer: ``(ESS[e] - ESS[e+1]) / ESS[e]`` averaged over EOSs (1: memory wiped at the
delimiter, 0: no change, < 0: ESS grows across it); ``modulation_mean`` averages it over the layers that are not
``short_conv``. Accuracy is also split by query type on the validation set (``fresh`` key, key ``reused`` from
the previous segment with a new value, ``absent`` key -> null) with the share of ``stale`` answers (the previous
segment's value). -> ``results/delim_modulation.csv``, ``delim_profiles.json``.

``--hybrid``: each model is a short causal convolution followed by the mixer (``model.mixer=[short_conv,<m>]``,
the app's default kind of model, which learns in the CPU budget); the conv layer is measured too but left out
of ``modulation_mean``.

    PYTHONPATH=. .venv/bin/python experiments/delimiters/run.py            # full (~10 min, 1 CPU thread)
    PYTHONPATH=. .venv/bin/python experiments/delimiters/run.py --hybrid --steps 1000 --lr 3e-3 \
        --out experiments/delimiters/results/hybrid
    PYTHONPATH=. .venv/bin/python experiments/delimiters/run.py --smoke [--hybrid]   # seconds
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import time
from pathlib import Path

import torch

from experiments.common import dump_json, run_grid
from experiments.distillation.distill import load_trained

HERE = Path(__file__).resolve().parent
MODELS = ["linear_attention", "gla", "attention"]
# model name -> (mixer, extra overrides): softmax attention as the paper's, with positions (RoPE) and heads
VARIANTS = {"attention_rope": ("attention", ["+model.mixer_kwargs.attention={num_heads:4,rotary:true}"])}
OFFSETS = list(range(-4, 5))
TOL_RTOL = 0.1  # tolerance-ESS threshold, relative to the operator's largest singular value


def points(
    smoke: bool,
    steps: int,
    seeds: list[int],
    lr: float = 1e-2,
    hybrid: bool = False,
    models: list[str] | None = None,
) -> dict[str, list[str]]:
    # optim.lr / save_plots are passed here (the grid is explicit about everything it varies).
    common = [
        "experiment=delim",
        f"optim.lr={lr:g}",
        "save_plots=false",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        f"callbacks.monitor.every_n_steps={steps}",
    ]
    if smoke:
        common += ["task.num_train=128", "task.num_test=64", "task.batch_size=16", "task.num_segments=2"]
    out = {}
    for m in models or MODELS:
        mixer, extra = VARIANTS.get(m, (m, []))
        for s in seeds:
            out[f"{m}_s{s}"] = [
                *common,
                f"model={mixer}",
                *([f"model.mixer=[short_conv,{mixer}]"] if hybrid else []),
                *extra,
                f"seed={s}",
            ]
    return out


def _dip(ess: dict[int, float], eos: list[int]) -> float:
    """Mean over EOSs of ``1 - ESS[e] / max(ESS[e-4..e-1])`` (1: nothing carried across the EOS)."""
    ref = [max(ess[e + o] for o in OFFSETS if o < 0) for e in eos]
    vals = [1 - ess[e] / r for e, r in zip(eos, ref) if r > 0]
    return sum(vals) / len(vals) if vals else float("nan")


@torch.no_grad()
def _norm_ratios(sigma: torch.Tensor, positions: list[int], eos: list[int]) -> tuple[float, float]:
    """A threshold-free reset measure: ``||H_e||_F / ||H_{e-1}||_F`` at the EOS positions ``e`` against the
    same step ratio at every other position (geometric means over rows, operators and positions).

    ``||H_i||_F = sqrt(sum_k sigma_k^2)`` is how much of the past reaches the future through position ``i``;
    a gate that wipes the state at the EOS makes it fall at ``e`` by orders of magnitude, a state that is
    only rotated or slowly decayed leaves the ratio near the other positions'. No threshold is chosen."""
    norm = sigma.double().square().sum(-1).sqrt()  # [B, G, P]
    log = norm.clamp_min(1e-300).log()  # an exactly wiped block: a finite, very negative log
    step = (log[..., 1:] - log[..., :-1]).mean(dim=(0, 1))  # log(||H_i|| / ||H_{i-1}||), i = positions[1:]
    at = {i: j for j, i in enumerate(positions[1:])}
    near = {e + o for e in eos for o in (0, 1)}
    eos_steps = [float(step[at[e]]) for e in eos if e in at]
    other = [float(step[j]) for i, j in at.items() if i not in near]
    mean = lambda xs: math.exp(sum(xs) / len(xs)) if xs else math.nan  # noqa: E731
    return mean(eos_steps), mean(other)


def eos_profiles(model: torch.nn.Module, inputs: torch.Tensor, eos: int, tol_rtol: float = TOL_RTOL) -> dict:
    """Per layer: ESS profiles (positions 1..L-1), EOS-aligned mean profiles and the modulation scores.

    ``profile``: entropy-ESS (mean over rows and operators, the monitor's reduction). ``profile_tol``:
    tolerance-ESS ``#{k: sigma_k(H_i) > tol_rtol * s_max}`` with ``s_max`` the operator's largest singular value
    over all positions of the row: unlike entropy-ESS (scale-invariant, so a state multiplied by a gate near 0
    keeps its effective rank), it drops when a gate shrinks what is carried. Scores per layer:
    ``modulation`` = ``(ESS[e] - ESS[e+1]) / ESS[e]`` (entropy), ``dip`` / ``dip_tol`` = ``1 - ESS[e] /
    max(ESS[e-4..e-1])`` (entropy / tolerance): ``H_e`` maps the inputs before the EOS to the outputs from the
    EOS on, through the EOS step's own transition, so a reset by the EOS token shows at offset 0 already."""
    from ess_train.ess import (
        entropy_ess_from_singular_values,
        hankel_singular_values,
        tolerance_ess_from_singular_values,
    )

    L = inputs.shape[1]
    positions = list(range(1, L))
    eos_pos = sorted(set((inputs[0] == eos).nonzero().flatten().tolist()))
    assert all(bool((inputs[:, e] == eos).all()) for e in eos_pos), "EOS positions differ across rows"
    eos_inner = [e for e in eos_pos if e + max(OFFSETS) < L and e + min(OFFSETS) >= 1]
    sizes = model.state_sizes(L)
    mixers = {f"blocks.{i}.mixer": m for i, m in enumerate(model.mixer_names)}
    out = {"eos_positions": eos_pos, "used_eos": eos_inner, "tol_rtol": tol_rtol, "layers": {}}
    for name, view in model.ess_operators(inputs).items():
        sigma = hankel_singular_values(view.op, positions)  # [B, G..., P, K]
        sigma = sigma.reshape(sigma.shape[0], -1, *sigma.shape[-2:]).float()
        prof = entropy_ess_from_singular_values(sigma).mean(dim=(0, 1)).tolist()
        prof_tol = tolerance_ess_from_singular_values(sigma, tol_rtol).float().mean(dim=(0, 1)).tolist()
        ess, ess_tol = dict(zip(positions, prof)), dict(zip(positions, prof_tol))
        aligned = [sum(ess[e + o] for e in eos_inner) / len(eos_inner) for o in OFFSETS]
        aligned_tol = [sum(ess_tol[e + o] for e in eos_inner) / len(eos_inner) for o in OFFSETS]
        mods = [(ess[e] - ess[e + 1]) / ess[e] for e in eos_inner if ess[e] > 0]
        ratio_eos, ratio_other = _norm_ratios(sigma, positions, eos_inner)
        out["layers"][name.removeprefix("blocks.")] = {
            "mixer": mixers.get(name, name),
            "profile": prof,
            "profile_tol": prof_tol,
            "aligned": aligned,
            "aligned_tol": aligned_tol,
            "modulation": sum(mods) / len(mods),
            "dip": _dip(ess, eos_inner),
            "dip_tol": _dip(ess_tol, eos_inner),
            "ess_before": aligned[OFFSETS.index(0)],
            "ess_after": aligned[OFFSETS.index(1)],
            "avg_ess": sum(prof) / len(prof),
            "norm_ratio_eos": ratio_eos,
            "norm_ratio_other": ratio_other,
            "tss_per_op": sizes[name].per_operator,
        }
    return out


@torch.no_grad()
def query_type_accuracy(model: torch.nn.Module, dm, max_batches: int | None = None) -> dict[str, float]:
    """Validation accuracy by query type, and the share of stale answers (the previous segment's value).

    ``fresh``: a present key that was not in the previous segment; ``reused``: a present key that was in the
    previous segment with another value; ``absent``: a key not in the segment (label null). ``stale_reused`` /
    ``stale_absent``: answers equal to the key's value in the previous segment (over reused queries / absent
    queries whose key was in the previous segment)."""
    from ess_train.tasks.delimited import segment_length

    c = dm.config
    k, nq = c.num_kv_pairs, c.num_queries + c.num_absent_queries
    seg = segment_length(k, c.num_queries, c.num_absent_queries)
    correct = dict.fromkeys(("fresh", "reused", "absent"), 0)
    total = dict.fromkeys(("fresh", "reused", "absent"), 0)
    stale = {"reused": 0, "absent": 0}
    stale_total = {"reused": 0, "absent": 0}
    for bi, batch in enumerate(dm.val_dataloader()):
        if max_batches is not None and bi >= max_batches:
            break
        x, y = batch["inputs"], batch["labels"]
        pred = model(x).argmax(-1)
        prev_k = prev_v = None
        for s in range(c.num_segments):
            o = s * seg
            qk, lab, ans = (t[:, o + 2 * k : o + 2 * k + nq] for t in (x, y, pred))
            if prev_k is None:
                in_prev = torch.zeros_like(qk, dtype=torch.bool)
                old = torch.full_like(qk, -1)
            else:
                match = qk[..., None] == prev_k[:, None, :]
                in_prev = match.any(-1)
                old = torch.where(in_prev, (match * prev_v[:, None, :]).sum(-1), -1)
            absent = lab == dm.null_token
            kinds = {"fresh": ~absent & ~in_prev, "reused": ~absent & in_prev, "absent": absent}
            for name, m in kinds.items():
                correct[name] += int(((ans == lab) & m).sum())
                total[name] += int(m.sum())
            for name, m in (("reused", kinds["reused"]), ("absent", absent & in_prev)):
                stale[name] += int(((ans == old) & m).sum())
                stale_total[name] += int(m.sum())
            prev_k, prev_v = x[:, o : o + 2 * k : 2], x[:, o + 1 : o + 2 * k : 2]
    out = {f"acc_{n}": correct[n] / total[n] if total[n] else float("nan") for n in correct}
    out |= {f"stale_{n}": stale[n] / stale_total[n] if stale_total[n] else float("nan") for n in stale}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument(
        "--hybrid", action="store_true", help="short conv + mixer (ESS modulation: the mixer layer)"
    )
    p.add_argument(
        "--tol-rtol",
        default=str(TOL_RTOL),
        help=f"tolerance-ESS threshold relative to s_max ({TOL_RTOL}, as committed; 'default': the engine's "
        "float32 default_rtol, which the float32 Gramian path resolves)",
    )
    args = p.parse_args(argv)
    if args.tol_rtol == "default":
        from ess_train.ess import default_rtol

        tol_rtol = float(default_rtol(torch.float32))
    else:
        tol_rtol = float(args.tol_rtol)
    torch.set_num_threads(int(os.environ.get("ESS_THREADS", "1")))
    t0 = time.process_time(), time.time()
    seeds = [0] if args.smoke else args.seeds
    steps = 3 if args.smoke else args.steps
    pts = points(args.smoke, steps, seeds, args.lr, args.hybrid, args.models)
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
        res = eos_profiles(model, inputs, eos, tol_rtol)
        profiles[run_id] = res
        layers = res["layers"]
        measured = {n: v for n, v in layers.items() if v["mixer"] != "short_conv"} or layers
        mod_rows.append(
            {
                "run_id": run_id,
                "model": run_id.rsplit("_s", 1)[0],
                "seed": run_id.rsplit("_s", 1)[1],
                "val_acc": float(rows[run_id]["val_acc"]),
                "modulation_mean": sum(v["modulation"] for v in measured.values()) / len(measured),
                "dip_mean": sum(v["dip"] for v in measured.values()) / len(measured),
                "dip_tol_mean": sum(v["dip_tol"] for v in measured.values()) / len(measured),
                "norm_ratio_eos": math.exp(
                    sum(math.log(v["norm_ratio_eos"]) for v in measured.values()) / len(measured)
                ),
                "norm_ratio_other": math.exp(
                    sum(math.log(v["norm_ratio_other"]) for v in measured.values()) / len(measured)
                ),
                **query_type_accuracy(model, dm, max_batches=1 if args.smoke else None),
                **{f"modulation/{k}": v["modulation"] for k, v in layers.items()},
                **{f"dip_tol/{k}": v["dip_tol"] for k, v in layers.items()},
                **{f"ess_before/{k}": v["ess_before"] for k, v in layers.items()},
                **{f"ess_after/{k}": v["ess_after"] for k, v in layers.items()},
                **{f"avg_ess/{k}": v["avg_ess"] for k, v in layers.items()},
            }
        )
        print(
            f"{run_id}: acc {mod_rows[-1]['val_acc']:.3f} modulation {mod_rows[-1]['modulation_mean']:.3f} "
            f"dip {mod_rows[-1]['dip_mean']:.3f} dip_tol {mod_rows[-1]['dip_tol_mean']:.3f} "
            f"norm ratio at EOS {mod_rows[-1]['norm_ratio_eos']:.3g} (elsewhere {mod_rows[-1]['norm_ratio_other']:.3g}) "
            f"(fresh {mod_rows[-1]['acc_fresh']:.3f} reused {mod_rows[-1]['acc_reused']:.3f} "
            f"absent {mod_rows[-1]['acc_absent']:.3f} stale {mod_rows[-1]['stale_reused']:.3f})",
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
