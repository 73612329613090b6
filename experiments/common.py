"""Shared machinery of the studies: run grid points of the Hydra app in-process, collect flat CSV rows.

Each grid point is a list of Hydra overrides (exactly what one would type after ``ess-train``); it is
composed from ``conf/``, validated, trained by :func:`ess_train.app.training.train`, and its summary flattened
into one CSV row (overrides, accuracy overall and per slice, ESS and TSS per layer, model totals).
Rows already present in the CSV (same ``run_id``) are skipped, so an interrupted study resumes.
Points run in ``workers`` processes with one torch thread each (small models: throughput beats threads).
"""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

__all__ = [
    "run_point",
    "run_grid",
    "run_tasks",
    "write_rows",
    "flatten_summary",
    "read_rows",
    "gather_curves",
    "ROOT",
]


def flatten_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """One flat dict of the app's summary: ``val_acc``, ``acc/<slice>``, ``ess/<layer>/<key>``, totals."""
    row: dict[str, Any] = {"val_acc": summary.get("val_acc"), "steps": summary.get("steps")}
    for name, acc in (summary.get("val_acc_per_slice") or {}).items():
        row[f"acc/{name}"] = acc
    ess = summary.get("ess") or {}
    row["ess_total"] = ess.get("total")
    row["ess_per_kv"] = ess.get("per_kv")
    for layer, stats in (ess.get("layers") or {}).items():
        short = layer.removeprefix("model.")
        for key, value in stats.items():
            if key == "flags":
                value = ";".join(value)
            row[f"ess/{short}/{key}"] = value
    return row


def run_point(run_id: str, overrides: Sequence[str], out_dir: str | Path) -> dict[str, Any]:
    """Train one configuration in this process and return its flat row (plus ``run_id`` and timing)."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from ess_train.app.main import CONFIG_DIR
    from ess_train.app.training import train

    torch.set_num_threads(int(os.environ.get("ESS_THREADS", "1")))
    run_dir = Path(out_dir) / "runs" / run_id
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                *overrides,
                f"output_dir={run_dir}",
                "trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false",
            ],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    start = time.time()
    summary = train(cfg)
    row = {"run_id": run_id, "overrides": " ".join(overrides), "seconds": round(time.time() - start, 1)}
    row.update(flatten_summary(summary))
    return row


def _worker(args: tuple[str, list[str], str]) -> dict[str, Any]:
    run_id, overrides, out_dir = args
    try:
        return run_point(run_id, overrides, out_dir)
    except Exception as err:  # one failed point must not lose the others
        return {"run_id": run_id, "overrides": " ".join(overrides), "error": repr(err)[:500]}


def read_rows(csv_path: str | Path) -> list[dict[str, str]]:
    """Rows of a study CSV (empty when it does not exist)."""
    path = Path(csv_path)
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def write_rows(csv_path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` (union of their keys as columns) to ``csv_path`` atomically."""
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    tmp = csv_path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(csv_path)


def run_tasks(
    worker: Callable[[Any], dict[str, Any]],
    tasks: dict[str, Any],
    csv_path: str | Path,
    workers: int = 2,
) -> list[dict[str, Any]]:
    """Run ``worker(args)`` for every ``run_id -> args`` not yet in ``csv_path``; append rows as they finish.

    ``worker`` (a module-level function: it is pickled to spawned processes) returns one row with ``run_id``,
    or a row with an ``error`` column, which is retried on the next call. Returns all rows (old and new).
    """
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    rows = [r for r in read_rows(csv_path) if not r.get("error")]
    done = {r["run_id"] for r in rows}
    todo = [args for rid, args in tasks.items() if rid not in done]
    print(f"{len(done)} runs done, {len(todo)} to run ({workers} workers) -> {csv_path}", flush=True)
    if not todo:
        return rows
    start = time.time()
    if workers <= 1:
        results = map(worker, todo)
    else:
        pool = mp.get_context("spawn").Pool(workers, maxtasksperchild=4)
        results = pool.imap_unordered(worker, todo)
    try:
        for i, row in enumerate(results, 1):
            rows.append(row)
            write_rows(csv_path, rows)
            status = f"error {row['error'][:80]}" if "error" in row else f"acc {float(row['val_acc']):.3f}"
            print(f"[{i}/{len(todo)} {time.time() - start:6.0f}s] {row['run_id']}: {status}", flush=True)
    finally:
        if workers > 1:
            pool.close()
            pool.join()
    return rows


def run_grid(
    points: dict[str, list[str]],
    csv_path: str | Path,
    out_dir: str | Path,
    workers: int = 2,
) -> list[dict[str, Any]]:
    """Train every ``run_id -> overrides`` point not yet in ``csv_path`` (:func:`run_tasks` of the app)."""
    tasks = {rid: (rid, list(ov), str(out_dir)) for rid, ov in points.items()}
    return run_tasks(_worker, tasks, csv_path, workers)


def dump_json(obj: Any, path: str | Path) -> None:
    """Write ``obj`` as indented JSON."""
    Path(path).write_text(json.dumps(obj, indent=2, default=str))


CURVE_KEYS = ("val/acc", "train/loss", "ess/total", "ess/per_kv", "ess/reg_loss")
CURVE_SUFFIXES = ("/utilization", "/avg_entropy", "/avg_tolerance", "/per_kv")


def gather_curves(runs_dir: Path, run_ids: list[str], out_csv: Path) -> Path:
    """Long-format curves ``run_id, step, metric, value`` from every run's CSV-logger ``metrics.csv``."""
    out_rows = []
    for run_id in run_ids:
        files = sorted((runs_dir / run_id).glob("csv/version_*/metrics.csv"))
        if not files:
            continue
        with files[-1].open(newline="") as fh:
            for rec in csv.DictReader(fh):
                for key, value in rec.items():
                    if value in ("", None) or key in ("step", "epoch"):
                        continue
                    if key in CURVE_KEYS or (key.startswith("ess/") and key.endswith(CURVE_SUFFIXES)):
                        out_rows.append(
                            {
                                "run_id": run_id,
                                "step": int(float(rec["step"])),
                                "metric": key,
                                "value": float(value),
                            }
                        )
    with out_csv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["run_id", "step", "metric", "value"])
        writer.writeheader()
        writer.writerows(out_rows)
    return out_csv


def run_study(points: dict[str, list[str]], out: str | Path, stem: str, workers: int) -> Path:
    """:func:`run_grid` of ``points`` into ``<out>/<stem>.csv``, then the finished runs' curves into
    ``<out>/<stem>_curves.csv`` (:func:`gather_curves`); returns the CSV's path."""
    out = Path(out)
    csv_path = out / f"{stem}.csv"
    run_grid(points, csv_path, out, workers=workers)
    done = [r["run_id"] for r in read_rows(csv_path) if not r.get("error")]
    gather_curves(out / "runs", done, out / f"{stem}_curves.csv")
    return csv_path


def write_outputs(results: str | Path, md: str, summary: dict[str, Any]) -> None:
    """A study's ``table.md`` and ``summary.json`` (the numbers RESULTS.md quotes) in ``results``; prints
    the table."""
    Path(results, "table.md").write_text(md)
    dump_json(summary, Path(results, "summary.json"))
    print(md)
