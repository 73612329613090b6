"""Study 4: distillation into small-state GLA students against the teacher's ESS.

1. Teachers (app, through ``experiments.common.run_grid`` -> ``results/teachers.csv``): a large-state GLA
   (``experiment=distill_teacher``: 2 heads, d_k = d_v = 32, TSS 2048 per layer) on MQAR (L=32, 4 kv pairs), plain and with
   ``ESSRegularizer(mode="ceiling")`` (``experiment=distill_teacher_ceiling``).
2. Students (``distill.py`` loop -> ``results/distill.csv``): GLA with 1 head, d_v = 8 and d_k in {2, 4, 8, 16},
   i.e. **student state size = per-layer TSS = heads * d_k * d_v in {16, 32, 64, 128}** (per-operator bound d_k).
   Distilled with KL(teacher || student) on the answer positions (no CE), from each teacher; plus a CE-only
   control (no teacher). Teacher and student ESS: entropy-ESS on 16 validation rows (``distill.model_ess``).

    PYTHONPATH=. .venv/bin/python experiments/distillation/run.py            # full (~12 min, 1 CPU thread)
    PYTHONPATH=. .venv/bin/python experiments/distillation/run.py --smoke    # seconds
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import torch

from experiments.common import read_rows, run_grid
from experiments.distillation.distill import distill, evaluate, load_trained, model_ess

HERE = Path(__file__).resolve().parent
D_V = 8
D_KS = [2, 4, 8, 16]


def teacher_points(smoke: bool, steps: int, hybrid: bool = False) -> dict[str, list[str]]:
    # optim.lr / save_plots are passed here (the grid is explicit about everything it varies).
    common = [
        "optim.lr=1e-2",
        "save_plots=false",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        f"callbacks.monitor.every_n_steps={steps}",
    ]
    if hybrid:  # short conv + GLA (the app's default model; GLA alone does not learn MQAR in the CPU budget)
        common += ["model.mixer=[short_conv,gla]"]
    if smoke:
        common += ["task.num_train=128", "task.num_test=64", "task.batch_size=16", "task.seq_len=32"]
    ceiling = (
        ["+callbacks.regularizer.include=[model.blocks.1.mixer]"] if hybrid else []
    )  # the GLA layer only
    return {
        "plain": ["experiment=distill_teacher", *common],
        "ceiling": ["experiment=distill_teacher_ceiling", *common, *ceiling],
    }


def student(d_k: int, vocab_size: int, seed: int, hybrid: bool = False) -> torch.nn.Module:
    from ess_train.models import SequenceModel

    torch.manual_seed(seed)
    gla = {"num_heads": 1, "expand_k": d_k / 64, "expand_v": D_V / 64}
    if hybrid:
        return SequenceModel(
            vocab_size=vocab_size,
            d_model=64,
            n_layers=2,
            mixer=["short_conv", "gla"],
            mixer_kwargs={"gla": gla},
        )
    return SequenceModel(vocab_size=vocab_size, d_model=64, n_layers=2, mixer="gla", mixer_kwargs=gla)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--teacher-steps", type=int, default=800)
    p.add_argument("--student-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--hybrid",
        action="store_true",
        help="teacher and students = short conv + GLA (ESS and state size: the GLA layer)",
    )
    p.add_argument("--no-control", action="store_true", help="skip the CE-only students")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("ESS_THREADS", "1")))
    t0 = time.process_time(), time.time()
    t_steps = 4 if args.smoke else args.teacher_steps
    s_steps = 3 if args.smoke else args.student_steps
    d_ks = D_KS[:2] if args.smoke else D_KS
    points = teacher_points(args.smoke, t_steps, args.hybrid)
    t_rows = {r["run_id"]: r for r in run_grid(points, args.out / "teachers.csv", args.out, workers=1)}

    out_csv = args.out / "distill.csv"
    rows = [r for r in read_rows(out_csv)]
    done = {(r["teacher"], r["d_k"]) for r in rows}
    teachers = {}
    for name, ov in points.items():
        if t_rows.get(name, {}).get("error"):
            raise RuntimeError(f"teacher {name} failed: {t_rows[name]['error']}")
        model, dm = load_trained(ov, args.out / "runs" / name)
        probe = next(iter(dm.val_dataloader()))["inputs"][:16]
        teachers[name] = (model, dm, model_ess(model, probe))
        print(f"teacher {name}: acc {t_rows[name]['val_acc']} ESS {teachers[name][2]}", flush=True)
    dm = teachers["plain"][1]
    probe = next(iter(dm.val_dataloader()))["inputs"][:16]
    for tname in [*points, *([] if args.no_control else ["none"])]:
        for d_k in d_ks:
            if (tname, str(d_k)) in done:
                continue
            start = time.time()
            teacher, t_dm, t_ess = teachers.get(tname, (None, dm, {}))
            st = student(d_k, dm.vocab_size, args.seed, args.hybrid)
            losses = distill(
                st, teacher, t_dm, steps=s_steps, kl_weight=1.0, ce_weight=0.0 if teacher is not None else 1.0
            )
            ev = evaluate(
                st,
                teacher if teacher is not None else teachers["plain"][0],
                t_dm,
                max_batches=2 if args.smoke else None,
            )
            s_ess = model_ess(st, probe)
            row = {
                "teacher": tname,
                "d_k": d_k,
                "d_v": D_V,
                "student_tss": d_k * D_V,
                "seed": args.seed,
                "steps": s_steps,
                "val_acc": ev["acc"],
                "val_kl": ev["kl"],
                "val_ce": ev["ce"],
                "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
                "teacher_acc": float(t_rows[tname]["val_acc"]) if tname in t_rows else "",
                "teacher_ess_per_op": t_ess.get("ess_per_op", ""),
                "teacher_ess_total": t_ess.get("ess_total", ""),
                "teacher_tss": t_ess.get("tss", ""),
                "teacher_tss_per_op": t_ess.get("tss_per_op", ""),
                "student_ess_per_op": s_ess["ess_per_op"],
                "student_ess_total": s_ess["ess_total"],
                "seconds": round(time.time() - start, 1),
            }
            rows.append(row)
            keys: list[str] = []
            for r in rows:
                keys.extend(k for k in r if k not in keys)
            with out_csv.open("w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=keys)
                w.writeheader()
                w.writerows(rows)
            print(
                f"student d_k={d_k} from {tname}: acc {ev['acc']:.3f} KL {ev['kl']:.3f} ({row['seconds']} s)",
                flush=True,
            )
    print(f"study 4 done: {time.process_time() - t0[0]:.0f} s CPU, {time.time() - t0[1]:.0f} s wall")


if __name__ == "__main__":
    main()
