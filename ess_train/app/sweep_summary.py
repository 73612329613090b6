"""One table for a whole Hydra multirun: overrides, accuracy, per-layer ESS and utilization of every job.

Each job of ``ess-train -m ...`` writes ``<sweep dir>/<job.num>/summary.json``. This module puts them
side by side, as ``sweep_summary.csv`` and ``sweep_summary.md`` in the sweep directory:

* :class:`~ess_train.app.sweep_callback.SweepSummary`, a Hydra callback (registered in
  ``conf/config.yaml`` under ``hydra.callbacks``), writes the table at the end of a multirun and prints it.
  It reads the jobs' summaries from disk, so it
  works the same with the basic launcher and the submitit launchers (local or SLURM), whose jobs run in
  other processes. It also rewrites the table, without printing it, each time a job ends: Hydra does not
  call ``on_multirun_end`` when a job failed, and the table of a sweep that stopped part-way is still there.
* :func:`summarize_sweep` / :func:`write_sweep_summary` do the same from Python, and
  ``python -m ess_train.app.sweep_summary <sweep dir>`` rebuilds the table of an existing sweep.

Every job of the sweep gets a row; ``status`` says what became of it:

``ok``
    the job wrote its summary.json.
``failed``
    the job raised (the callback records the error in ``<job dir>/job_error.txt``), or its summary.json
    cannot be read.
``incomplete``
    the job started (its directory is there) but wrote no summary: still running, or killed (out of
    memory, SLURM time limit) before Python could report anything.
``missing``
    the job never started (no directory): the sweep stopped before it. The list of jobs comes from the
    sweep's ``multirun.yaml`` (Hydra's basic sweeper: the cross product of the sweep overrides).

This module imports neither torch nor Lightning: Hydra instantiates its callbacks in every run.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

__all__ = [
    "summarize_sweep",
    "write_sweep_summary",
    "format_markdown",
    "main",
    "CSV_NAME",
    "MD_NAME",
    "ERROR_NAME",
    "expected_jobs",
]

log = logging.getLogger(__name__)

CSV_NAME = "sweep_summary.csv"
MD_NAME = "sweep_summary.md"
# written into a job's directory by SweepSummary.on_job_end when the job raised
ERROR_NAME = "job_error.txt"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"

# columns before and after the per-override, per-slice and per-layer ones
_HEAD = ("job", "status", "overrides")
_TAIL = ("run_dir", "error")


# ---------------------------------------------------------------------------------------------- reading


def _natural_key(name: str) -> list[Any]:
    """``blocks.2`` before ``blocks.10``."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


def _read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    return data


def _read_yaml(path: Path) -> Any:
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # unreadable or not there: the caller falls back
        return None


def _job_num(job_dir: Path) -> int | None:
    hydra_yaml = _read_yaml(job_dir / ".hydra" / "hydra.yaml")
    if isinstance(hydra_yaml, dict):
        num = (hydra_yaml.get("hydra") or {}).get("job", {}).get("num")
        if isinstance(num, int):
            return num
    return int(job_dir.name) if job_dir.name.isdigit() else None


def expected_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """Every job's task overrides, in job order, from the sweep's multirun.yaml (basic sweeper only)."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    try:
        cfg = OmegaConf.load(path)
        sweeper = OmegaConf.select(cfg, "hydra.sweeper", default=None)
        if sweeper is None or OmegaConf.select(sweeper, "_target_", default=None) != BASIC_SWEEPER:
            return None  # another sweeper (optuna, ...) decides its jobs as it goes
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params = OmegaConf.select(sweeper, "params", default=None) or {}
        arguments = [f"{k}={v}" for k, v in params.items()]
        arguments += list(OmegaConf.to_container(cfg.hydra.overrides.task, resolve=False))
        parsed = OverridesParser.create().parse_overrides(arguments)
        return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception as err:  # e.g. a glob() sweep, which needs the config loader: list what is on disk
        log.debug("cannot expand the jobs of %s: %s", path, err)
        return None


def _split_override(override: str) -> tuple[str, str]:
    key, sep, value = override.partition("=")
    return (key, value) if sep else (override, "")


def _read_job(job_dir: Path, job: int | None) -> dict[str, Any]:
    """One job's raw record: status, overrides, and its summary (``{}`` without one)."""
    record: dict[str, Any] = {"job": job, "run_dir": str(job_dir), "error": "", "summary": {}}
    overrides = _read_yaml(job_dir / ".hydra" / "overrides.yaml")
    summary_path = job_dir / "summary.json"
    error_path = job_dir / ERROR_NAME
    if summary_path.is_file():
        try:
            record["summary"] = _read_json(summary_path)
            record["status"] = "ok"
        except (OSError, ValueError) as err:
            record["status"] = "failed"
            record["error"] = f"unreadable summary.json: {err}"
    elif error_path.is_file():
        record["status"] = "failed"
        lines = [ln.strip() for ln in error_path.read_text(errors="replace").splitlines() if ln.strip()]
        record["error"] = lines[0] if lines else "failed"
    else:
        record["status"] = "incomplete"
        record["error"] = "no summary.json (still running, or killed)"
    summary = record["summary"]
    if isinstance(summary.get("overrides"), list):
        overrides = summary["overrides"]
    record["overrides"] = [str(o) for o in overrides] if isinstance(overrides, list) else []
    if summary.get("output_dir"):
        record["run_dir"] = str(summary["output_dir"])
    return record


def _collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """Raw records of every job, found on disk or expected from multirun.yaml, in job order."""
    found: dict[Any, dict[str, Any]] = {}
    for job_dir in sorted(p for p in sweep_dir.iterdir() if p.is_dir()) if sweep_dir.is_dir() else []:
        if not ((job_dir / "summary.json").is_file() or (job_dir / ".hydra").is_dir()):
            continue  # .submitit/, or anything else that is not a job
        num = _job_num(job_dir)
        record = _read_job(job_dir, num)
        found[num if num is not None else f"dir:{job_dir.name}"] = record
    expected = expected_jobs(sweep_dir) or []
    for num, overrides in enumerate(expected):
        if num not in found:
            found[num] = {
                "job": num,
                "status": "missing",
                "overrides": overrides,
                "run_dir": "",
                "error": "not started",
                "summary": {},
            }

    def order(item: tuple[Any, dict[str, Any]]) -> tuple[int, Any]:
        key, _ = item
        return (0, key) if isinstance(key, int) else (1, key)

    return [record for _, record in sorted(found.items(), key=order)]


def _short_names(names: Iterable[str]) -> dict[str, str]:
    """``model.blocks.1.mixer`` -> ``blocks.1.mixer`` where that stays unambiguous."""
    names = list(names)
    short = {n: n.removeprefix("model.") if n.startswith("model.") else n for n in names}
    return short if len(set(short.values())) == len(short) else {n: n for n in names}


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def summarize_sweep(sweep_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One row per job of the sweep in ``sweep_dir``, in job order; every row has the same keys.

    Keys, in column order: ``job`` (Hydra's job.num), ``status`` (ok / failed / incomplete / missing),
    ``overrides`` (the job's task overrides, a list), then one key per override that differs between
    jobs (``model``, ``task.num_kv_pairs``, ...: the value as given on the command line), ``val_acc``,
    ``val_acc[<slice>]`` per validation slice, ``steps``, ``ess[<layer>]`` (the layer's avg_entropy) and
    ``util[<layer>]`` (its utilization) per layer seen in any job, ``run_dir``, ``error``. Layer names
    drop a leading ``model.`` where that stays unambiguous. A value a job does not have is ``None``.
    """
    sweep_dir = Path(sweep_dir)
    records = _collect(sweep_dir)

    # overrides that differ between jobs get a column each
    parsed = [dict(_split_override(o) for o in r["overrides"]) for r in records]
    keys: list[str] = []
    for p in parsed:
        keys += [k for k in p if k not in keys]
    varying = [k for k in keys if len({p.get(k) for p in parsed}) > 1]

    slices: list[str] = []
    layers: list[str] = []
    for r in records:
        per_slice = r["summary"].get("val_acc_per_slice")
        if isinstance(per_slice, dict):
            slices += [str(s) for s in per_slice if str(s) not in slices]
        ess = r["summary"].get("ess")
        layer_map = ess.get("layers") if isinstance(ess, dict) else None
        if isinstance(layer_map, dict):
            layers += [str(n) for n in layer_map if str(n) not in layers]
    layers.sort(key=_natural_key)
    short = _short_names(layers)
    reserved = {*_HEAD, *_TAIL, "val_acc", "steps"}
    varying = [k for k in varying if k not in reserved and not k.endswith("]")]

    rows = []
    for r, p in zip(records, parsed):
        s = r["summary"]
        row: dict[str, Any] = {"job": r["job"], "status": r["status"], "overrides": list(r["overrides"])}
        row.update({k: p.get(k) for k in varying})
        row["val_acc"] = _number(s.get("val_acc"))
        per_slice = s.get("val_acc_per_slice") if isinstance(s.get("val_acc_per_slice"), dict) else {}
        row.update({f"val_acc[{name}]": _number(per_slice.get(name)) for name in slices})
        row["steps"] = _number(s.get("steps"))
        ess = s.get("ess") if isinstance(s.get("ess"), dict) else {}
        layer_map = ess.get("layers") if isinstance(ess.get("layers"), dict) else {}
        for metric, field in (("ess", "avg_entropy"), ("util", "utilization")):
            for name in layers:
                stats = layer_map.get(name)
                value = stats.get(field) if isinstance(stats, dict) else None
                row[f"{metric}[{short[name]}]"] = _number(value)
        row["run_dir"] = r["run_dir"]
        row["error"] = r["error"]
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- writing


def _varying_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The per-override columns of ``rows`` (those between ``overrides`` and ``val_acc``)."""
    if not rows:
        return []
    cols = list(rows[0])
    start = cols.index("overrides") + 1 if "overrides" in cols else 0
    end = cols.index("val_acc") if "val_acc" in cols else start
    return cols[start:end]


def _common_overrides(rows: Sequence[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    first = rows[0]["overrides"]
    return [o for o in first if all(o in r["overrides"] for r in rows[1:])]


def _csv_text(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: (" ".join(v) if k == "overrides" else "" if v is None else v) for k, v in row.items()}
            )
    return buf.getvalue()


def _cell(key: str, value: Any, sweep_dir: Path | None) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.2f}" if key.startswith("ess[") else f"{value:.3f}"
    text = str(value)
    if key == "run_dir" and sweep_dir is not None and text:
        try:
            text = os.path.relpath(text, sweep_dir)
        except ValueError:
            pass
    if key == "error" and len(text) > 60:
        text = text[:57] + "..."
    return text.replace("|", "\\|")


def format_markdown(rows: Sequence[dict[str, Any]], sweep_dir: str | os.PathLike[str] | None = None) -> str:
    """The rows of :func:`summarize_sweep` as a markdown table, with a line on the sweep above it.

    Overrides shared by every job are listed once above the table; the table shows the varying ones (one
    column each), run directories relative to the sweep directory, and an ``error`` column only when a
    job has one.
    """
    sweep = Path(sweep_dir) if sweep_dir is not None else None
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    lines = [
        f"## Sweep {sweep if sweep is not None else ''}".rstrip(),
        "",
        f"{len(rows)} job{'s' if len(rows) != 1 else ''}: " + ", ".join(f"{n} {s}" for s, n in counts.items())
        if rows
        else "no jobs",
    ]
    if not rows:
        return "\n".join(lines) + "\n"
    common = _common_overrides(rows)
    if common:
        lines.append("common overrides: `" + " ".join(common) + "`")
    scored = [r for r in rows if isinstance(r.get("val_acc"), float | int) and not math.isnan(r["val_acc"])]
    if len({r["val_acc"] for r in scored}) > 1:
        best = max(scored, key=lambda r: r["val_acc"])
        what = " ".join(f"{k}={best[k]}" for k in _varying_keys(rows) if best[k] is not None)
        lines.append(f"best val_acc: {best['val_acc']:.3f} (job {best['job']}{': ' + what if what else ''})")
    lines.append("")

    columns = list(rows[0])
    if _varying_keys(rows) or all(set(r["overrides"]) <= set(common) for r in rows):
        columns.remove("overrides")  # the varying ones have their own columns, the rest is listed above
    if not any(r.get("error") for r in rows):
        columns.remove("error")
    table = [[_cell(c, r.get(c), sweep) for c in columns] for r in rows]
    numeric = {
        c
        for c in columns
        if all(isinstance(r.get(c), int | float) or r.get(c) is None for r in rows) and c != "job"
    }
    widths = [max(len(c), 3, *(len(t[i]) for t in table)) for i, c in enumerate(columns)]

    def line(cells: Sequence[str], right: Sequence[bool]) -> str:
        padded = (c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right))
        return "| " + " | ".join(padded) + " |"

    right = [c in numeric for c in columns]
    lines.append(line(columns, [False] * len(columns)))
    lines.append("| " + " | ".join("-" * (w - 1) + (":" if r else "-") for w, r in zip(widths, right)) + " |")
    lines += [line(t, right) for t in table]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: jobs of a submitit sweep may write at the same time."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_sweep_summary(sweep_dir: str | os.PathLike[str], *, print_table: bool = False) -> dict[str, Any]:
    """Write ``sweep_summary.csv`` and ``sweep_summary.md`` into ``sweep_dir`` (and print the markdown).

    Returns ``{"rows": [...], "csv": Path, "md": Path, "markdown": str}``; ``rows`` as
    :func:`summarize_sweep` returns them. In the CSV, ``overrides`` is the job's overrides joined by
    spaces and a missing value is an empty cell.
    """
    sweep_dir = Path(sweep_dir)
    rows = summarize_sweep(sweep_dir)
    markdown = format_markdown(rows, sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = sweep_dir / CSV_NAME, sweep_dir / MD_NAME
    _write_atomic(csv_path, _csv_text(rows))
    _write_atomic(md_path, markdown)
    if print_table:
        print(f"\n{markdown}\n(also in {md_path} and {csv_path})", flush=True)
    return {"rows": rows, "csv": csv_path, "md": md_path, "markdown": markdown}


# ---------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ess_train.app.sweep_summary",
        description="(Re)build sweep_summary.csv/.md of an ess-train multirun directory and print the table.",
    )
    parser.add_argument("sweep_dir", nargs="+", type=Path, help="a multirun directory (hydra.sweep.dir)")
    parser.add_argument("-q", "--quiet", action="store_true", help="write the files, print only their paths")
    args = parser.parse_args(argv)
    status = 0
    for sweep_dir in args.sweep_dir:
        if not sweep_dir.is_dir():
            print(f"{sweep_dir}: not a directory", file=sys.stderr)
            status = 2
            continue
        result = write_sweep_summary(sweep_dir, print_table=not args.quiet)
        if not result["rows"]:
            print(f"{sweep_dir}: no jobs (no */summary.json, */.hydra/, multirun.yaml)", file=sys.stderr)
            status = max(status, 1)
        elif args.quiet:
            print(f"{result['csv']}\n{result['md']}")
    return status


if __name__ == "__main__":
    sys.exit(main())
