"""Shared machinery of the studies: run grid points of the Hydra app in-process, collect flat CSV rows.

Each grid point is a list of Hydra overrides (exactly what one would type after ``ess-train``); it is
composed from ``conf/``, validated, trained by :func:`ess_train.app.train`, and its summary flattened
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["run_point", "run_grid", "flatten_summary", "read_rows", "ROOT"]


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

    from ess_train.app import CONFIG_DIR, train

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


def _write_rows(csv_path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    tmp = csv_path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(csv_path)


def run_grid(
    points: dict[str, list[str]],
    csv_path: str | Path,
    out_dir: str | Path,
    workers: int = 2,
) -> list[dict[str, Any]]:
    """Run every ``run_id -> overrides`` point not yet in ``csv_path``; append rows as they finish.

    Returns all rows (old and new). Failed points are recorded with an ``error`` column and retried on the
    next call.
    """
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    rows = [r for r in read_rows(csv_path) if not r.get("error")]
    done = {r["run_id"] for r in rows}
    todo = [(rid, list(ov), str(out_dir)) for rid, ov in points.items() if rid not in done]
    print(f"{len(done)} runs done, {len(todo)} to run ({workers} workers) -> {csv_path}", flush=True)
    if not todo:
        return rows
    start = time.time()
    if workers <= 1:
        results = map(_worker, todo)
    else:
        pool = mp.get_context("spawn").Pool(workers, maxtasksperchild=4)
        results = pool.imap_unordered(_worker, todo)
    try:
        for i, row in enumerate(results, 1):
            rows.append(row)
            _write_rows(csv_path, rows)
            status = f"error {row['error'][:80]}" if "error" in row else f"acc {float(row['val_acc']):.3f}"
            print(f"[{i}/{len(todo)} {time.time() - start:6.0f}s] {row['run_id']}: {status}", flush=True)
    finally:
        if workers > 1:
            pool.close()
            pool.join()
    return rows


def dump_json(obj: Any, path: str | Path) -> None:
    """Write ``obj`` as indented JSON."""
    Path(path).write_text(json.dumps(obj, indent=2, default=str))
