"""Run the registered designs' grids, resumably, into ``experiments/prereg/results/runs.csv``.

Designs run in the order given; a run two designs share trains once. Design 8 (ESS at initialization, no
training) takes about a minute and writes ``results/init.csv``; design 5 trains its teachers, then distils
their students into ``results/students.csv``; design 6 adds each run's accuracy by query type. Designs 2-4 start once design 1's pilot (its GLA
runs of seeds 0-3) is in the CSV; their kv is the registered pilot rule's (``designs.floor_kv``).

Resumable across machines: the CSVs under ``results/`` are committed, the run directories are not, so a
later run trains only what is missing (and design 5's teachers again where their checkpoints are gone while
students remain); the curves of runs whose logs are gone stay as committed.

    PYTHONPATH=. .venv/bin/python experiments/prereg/run.py --design 8 1 6 2 3 4 7 5 --workers 2
    PYTHONPATH=. .venv/bin/python experiments/prereg/run.py --design 1 --smoke --out /tmp/smoke

A follow-up (``followup.py``) runs a design on other seeds, into its own folder:

    PYTHONPATH=. .venv/bin/python experiments/prereg/run.py --design 6 --seeds 1000-1051 --out DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.common import gather_curves, read_rows, run_grid, run_tasks, write_rows
from experiments.distill_ess.run import distill_one
from experiments.init_dose.run import ess_at_init
from experiments.matched_tss.run import SMOKE
from experiments.prereg import designs

HERE = Path(__file__).resolve().parent


def train_and_query(args: tuple[str, list[str], str]) -> dict:
    """Design 6's worker: train one delimited-recall run (its checkpoint kept), then its accuracy by query
    type (fresh, reused, absent keys) on the validation set; one row, or a row with ``error``."""
    run_id, overrides, out = args
    try:
        from experiments.common import run_point
        from experiments.delimiters.run import query_type_accuracy
        from experiments.distillation.distill import load_trained

        row = run_point(run_id, overrides, out)
        model, dm = load_trained(overrides, Path(out) / "runs" / run_id)
        row.update(query_type_accuracy(model, dm))
        return row
    except Exception as err:  # one failed run must not lose the others
        return {"run_id": run_id, "overrides": " ".join(overrides), "error": repr(err)[:500]}


def seed_range(text: str) -> list[int]:
    """``"1000-1051"`` -> the seeds 1000 to 1051 (both included)."""
    first, _, last = text.partition("-")
    try:
        seeds = list(range(int(first), int(last or first) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are FIRST-LAST (e.g. 1000-1051), got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"seed range {text!r} is empty")
    return seeds


def grid_rows(csv_path: Path) -> list[dict]:
    """What the grids depend on (design 1's pilot for designs 2-4, design 4's for its amendment): the committed
    runs and those in ``csv_path`` (a follow-up's folder holds only its new seeds)."""
    return [*read_rows(HERE / "results" / "runs.csv"), *read_rows(csv_path)]


def retrain_lost_teachers(out: Path, csv_path: Path, teachers: dict[str, list[str]]) -> None:
    """Drop from ``csv_path`` the teachers whose checkpoint is gone (run directories are not committed)
    while some of their students are still to distil, so that ``run_grid`` trains them again."""
    done_students = {r["run_id"] for r in read_rows(out / "students.csv") if not r.get("error")}
    students = designs.design_5_students()
    lost = {
        tid
        for tid in teachers
        if not any((out / "runs" / tid / "checkpoints").glob("*.ckpt"))
        and any(t == tid and rid not in done_students for rid, (t, _, _) in students.items())
    }
    rows = read_rows(csv_path)
    if lost & {r["run_id"] for r in rows}:
        print(f"design 5: {len(lost)} teachers lost their checkpoints; training them again")
        write_rows(csv_path, [r for r in rows if r["run_id"] not in lost])


def distill_students(out: Path, teachers: dict[str, list[str]], workers: int, smoke: bool) -> Path:
    """Design 5's students, distilled from the teachers' checkpoints into ``<out>/students.csv``."""
    csv_path = out / ("students_smoke.csv" if smoke else "students.csv")
    tasks = {
        rid: (
            rid,
            str(out / "runs" / tid),
            teachers[tid],
            d_k,
            int(tid.rsplit("_s", 1)[1]),
            3 if smoke else designs.STUDENT_STEPS,
            smoke,
            mixer,
        )
        for rid, (tid, mixer, d_k) in designs.design_5_students().items()
        if tid in teachers
    }
    if smoke:
        tasks = dict(list(tasks.items())[:1])
    run_tasks(distill_one, tasks, csv_path, workers=workers)
    return csv_path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--design", type=int, nargs="+", required=True, choices=[*designs.DESIGNS, 8])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--smoke", action="store_true", help="the first two runs of each design, a few steps")
    parser.add_argument(
        "--seeds",
        type=seed_range,
        help=f"FIRST-LAST: these seeds instead of the registered ones (a follow-up; designs {designs.RESEEDABLE})",
    )
    parser.add_argument(
        "--doses", type=int, help="design 4 with --seeds: its GLA grid at this many gate normalizers (1-256)"
    )
    parser.add_argument(
        "--override", nargs="+", default=[], help="Hydra overrides added to every run (e.g. trainer=gpu)"
    )
    args = parser.parse_args(argv)
    if args.seeds is not None and set(args.design) - set(designs.RESEEDABLE):
        parser.error(
            f"--seeds applies to designs {designs.RESEEDABLE}, not {sorted(set(args.design) - set(designs.RESEEDABLE))}"
        )
    if args.doses is not None and (args.design != [4] or args.seeds is None or args.doses < 3):
        parser.error("--doses N (N >= 3) goes with --design 4 and --seeds (a follow-up of its GLA test)")
    csv_path = args.out / ("runs_smoke.csv" if args.smoke else "runs.csv")
    for design in args.design:
        if design == 8:
            ess_at_init(args.out / "init.csv", smoke=args.smoke, seeds=designs.SEEDS_8)
            continue
        points = designs.points(design, grid_rows(csv_path), seeds=args.seeds, doses=args.doses)
        points = {rid: [*ov, *args.override] for rid, ov in points.items()}
        if not points:
            print(f"design {design}: waiting for design 1's pilot (GLA, seeds 0-3) in {csv_path}")
            continue
        if args.smoke:
            points = {rid: [*ov, *SMOKE] for rid, ov in list(points.items())[:2]}
        if design == 6:
            tasks = {rid: (rid, ov, str(args.out)) for rid, ov in points.items()}
            run_tasks(train_and_query, tasks, csv_path, workers=args.workers)
            continue
        if design == 5:
            retrain_lost_teachers(args.out, csv_path, points)
        run_grid(points, csv_path, args.out, workers=args.workers)
        if design == 4 and not args.smoke and args.seeds is None:  # amendment 1's grid waits for its pilot
            more = {rid: [*ov, *args.override] for rid, ov in designs.points(4, grid_rows(csv_path)).items()}
            if more.keys() - points.keys():
                run_grid(more, csv_path, args.out, workers=args.workers)
        if design == 5:
            distill_students(args.out, points, args.workers, args.smoke)
    write_curves(args.out, csv_path)
    return csv_path


# the per-step metrics the registered tests and figures read (the committed curves keep only these)
CURVE_METRICS = {
    "ess/per_kv",
    "ess/total",
    "ess/reg_loss",
    "train/loss",
    "val/acc",
    "ess/model.blocks.1.mixer/utilization",
}


def write_curves(out: Path, csv_path: Path) -> Path:
    """The finished runs' curves of ``CURVE_METRICS`` in ``<csv stem>_curves.csv`` beside ``csv_path``; a run
    whose logs are gone (run directories are not committed) keeps the rows the file already had."""
    done = [r["run_id"] for r in read_rows(csv_path) if not r.get("error")]
    path = csv_path.with_name(csv_path.stem + "_curves.csv")
    logged = [rid for rid in done if any((out / "runs" / rid).glob("csv/version_*/metrics.csv"))]
    kept = [r for r in read_rows(path) if r["run_id"] not in set(logged)]
    fresh = path.with_suffix(".new.csv")
    gather_curves(out / "runs", logged, fresh)
    write_rows(path, kept + [r for r in read_rows(fresh) if r["metric"] in CURVE_METRICS])
    fresh.unlink()
    return path


if __name__ == "__main__":
    main()
