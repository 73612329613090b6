"""The full record of a run's measurements: one JSON line per measurement (``ess_history.jsonl``).

The checkpointed :class:`~ess_train.measure.history.ESSHistory` is bounded (thinned profiles); this file
keeps every measurement, is appended as the run goes, and reads back into an unthinned history for plots
of a whole run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ess_train.measure.history import SUMMARY_KEYS, ESSHistory, LayerHistory

__all__ = ["measurement_record", "append_record", "read_records", "history_from_records"]


def _json_float(v: float) -> float | None:
    return round(float(v), 4) if math.isfinite(v) else None


def measurement_record(history: ESSHistory, step: int) -> dict[str, Any]:
    """The measurement at ``step`` (the last one recorded) as one JSON-ready line of the full record:
    ``step``, ``total``, ``per_kv`` and per layer ``positions``, ``profile``, ``tolerance_profile`` and the
    :data:`SUMMARY_KEYS` (values rounded to 1e-4; NaN as ``null``)."""
    layers = {}
    for name, hist in history.layers.items():
        if not hist.steps or hist.steps[-1] != step:
            continue
        entry: dict[str, Any] = {"positions": list(hist.positions)}
        if hist.profile_steps and hist.profile_steps[-1] == step:
            entry["profile"] = [_json_float(v) for v in hist.profiles[-1]]
            entry["tolerance_profile"] = [_json_float(v) for v in hist.tolerance_profiles[-1]]
        entry.update({k: _json_float(getattr(hist, k)[-1]) for k in SUMMARY_KEYS})
        layers[name] = entry
    totals = history.totals
    last = totals.steps.index(step) if step in totals.steps else None
    return {
        "step": int(step),
        "total": None if last is None else _json_float(totals.total[last]),
        "per_kv": None if last is None else _json_float(totals.per_kv[last]),
        "layers": layers,
    }


def append_record(path: str | Path, record: Mapping[str, Any], *, first: bool = False) -> None:
    """Append ``record`` as one line to the JSON-lines file ``path``. ``first``: this process's first write,
    which drops the lines of steps at or after ``record``'s (written after the checkpoint this run resumed
    from), so that a resumed run's file reads as an uninterrupted run's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if first and path.exists():
        kept = [r for r in read_records(path) if int(r.get("step", -1)) < int(record["step"])]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        path.write_text(text)
    with path.open("a") as f:
        f.write(json.dumps(dict(record)) + "\n")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file written by :func:`append_record` (a torn last line is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def history_from_records(records: list[Mapping[str, Any]], max_profiles: int | None = None) -> ESSHistory:
    """An :class:`ESSHistory` of every measurement in ``records`` (all profiles unless ``max_profiles``):
    the unthinned history, for plots of a whole run (``ess_train.plots.save_history_plots``)."""
    history = ESSHistory(max_profiles=max_profiles or max(len(records), 2))
    for rec in records:
        step = int(rec["step"])
        for name, entry in rec.get("layers", {}).items():
            hist = history.layers.setdefault(name, LayerHistory())
            width = len(entry.get("positions", []))
            if hist.positions != list(entry.get("positions", [])):
                hist.positions = [int(p) for p in entry.get("positions", [])]
                hist.profiles = [[math.nan] * width for _ in hist.profiles]
                hist.tolerance_profiles = [[math.nan] * width for _ in hist.tolerance_profiles]
            hist.steps.append(step)
            for key in SUMMARY_KEYS:
                v = entry.get(key)
                getattr(hist, key).append(math.nan if v is None else float(v))
            if "profile" in entry:
                hist.profile_steps.append(step)
                for key, name_ in (("profile", "profiles"), ("tolerance_profile", "tolerance_profiles")):
                    row = [math.nan if v is None else float(v) for v in entry.get(key) or [math.nan] * width]
                    getattr(hist, name_).append(row)
            hist.thin(history.max_profiles)
        history.totals.steps.append(step)
        history.totals.total.append(math.nan if rec.get("total") is None else float(rec["total"]))
        history.totals.per_kv.append(math.nan if rec.get("per_kv") is None else float(rec["per_kv"]))
    return history
