"""The delimiter study on any causal LM: ESS profiles aligned at each occurrence of a delimiter token.

The paper's end-of-sequence analysis: does a layer's memory drop at the delimiter? For each occurrence of
``delimiter_id`` at position ``p`` of a row (with the whole window ``p - window .. p + window`` inside
``[1, L - 1]``), the layer's entropy- and tolerance-ESS at ``p + offset`` are collected (mean over the
layer's operators, from :func:`~ess_train.analysis.analyze` of that row at exactly those positions) and
averaged over the occurrences, per layer and per layer kind. Tolerance-ESS is the one that drops where a
gate shrinks the state (entropy-ESS is scale-invariant).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ess_train.analysis.report import analyze

__all__ = ["DelimiterReport", "delimiter_study", "delimiter_figure"]


@dataclass
class DelimiterReport:
    """Aligned profiles: ``layers[name]["entropy_ess"][k]`` is the mean ESS at ``offsets[k]`` from the
    delimiter, over the ``occurrences`` (``layers[name]["kind"]``; ``kinds`` averages layers of a kind)."""

    delimiter_id: int
    window: int
    occurrences: list[tuple[int, int]]
    offsets: list[int]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    kinds: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "delimiter_id": self.delimiter_id,
            "window": self.window,
            "occurrences": [list(o) for o in self.occurrences],
            "offsets": list(self.offsets),
            "layers": self.layers,
            "kinds": self.kinds,
        }

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


def _mean(columns: list[list[float]]) -> list[float]:
    return [sum(c) / len(c) if c else math.nan for c in zip(*columns)]


def delimiter_study(
    model: nn.Module,
    input_ids: Tensor,
    delimiter_id: int,
    window: int = 16,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    check: bool = True,
) -> DelimiterReport:
    """ESS of every measured layer aligned at the occurrences of ``delimiter_id`` in ``input_ids``.

    One forward per row holding an occurrence; ``ValueError`` when no occurrence has its whole window
    inside the sequence.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    L = int(input_ids.shape[-1])
    offsets = list(range(-window, window + 1))
    occ = [
        (int(r), int(p))
        for r, p in (input_ids == delimiter_id).nonzero().tolist()
        if p - window >= 1 and p + window <= L - 1
    ]
    if not occ:
        found = int((input_ids == delimiter_id).sum())
        raise ValueError(
            f"no occurrence of token {delimiter_id} with a full window of {window} inside L={L} "
            f"({found} occurrence(s) in all); use a longer text or a smaller window"
        )
    out = DelimiterReport(delimiter_id=int(delimiter_id), window=window, occurrences=occ, offsets=offsets)
    collected: dict[str, dict[str, Any]] = {}
    for row in sorted({r for r, _ in occ}):
        mine = [p for r, p in occ if r == row]
        needed = sorted({p + o for p in mine for o in offsets})
        report = analyze(
            model, input_ids[row : row + 1], positions=needed, include=include, exclude=exclude, check=check
        )
        for name, layer in report.layers.items():
            at = {p: i for i, p in enumerate(layer.positions)}
            entry = collected.setdefault(name, {"kind": layer.kind, "cls": layer.cls, "ent": [], "tol": []})
            for p in mine:
                entry["ent"].append([layer.entropy_ess[at[p + o]] for o in offsets])
                if layer.tolerance_ess is not None:
                    entry["tol"].append([layer.tolerance_ess[at[p + o]] for o in offsets])
    by_kind: dict[str, dict[str, list[list[float]]]] = {}
    for name, entry in collected.items():
        ent, tol = _mean(entry["ent"]), _mean(entry["tol"]) if entry["tol"] else None
        out.layers[name] = {
            "kind": entry["kind"],
            "cls": entry["cls"],
            "entropy_ess": ent,
            "tolerance_ess": tol,
        }
        kind = by_kind.setdefault(entry["kind"], {"entropy_ess": [], "tolerance_ess": []})
        kind["entropy_ess"].append(ent)
        if tol is not None:
            kind["tolerance_ess"].append(tol)
    out.kinds = {k: {key: _mean(v) for key, v in d.items() if v} for k, d in by_kind.items()}
    return out


def delimiter_figure(report: DelimiterReport) -> Any:
    """Per-layer aligned profiles (entropy solid, tolerance dashed) against the offset from the delimiter."""
    from matplotlib.figure import Figure

    from ess_train.analysis.report_figures import kind_colour
    from ess_train.plots.style import DPI, FIGSIZE, LABEL_SIZE, LEGEND_SIZE, TICK_SIZE, TITLE_SIZE

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    n = len(report.layers)
    for i, (name, entry) in enumerate(report.layers.items()):
        colour, alpha = kind_colour(entry["kind"], i), 0.35 + 0.65 * (i + 1) / max(n, 1)
        ax.plot(
            report.offsets,
            entry["entropy_ess"],
            color=colour,
            alpha=alpha,
            lw=1.6,
            label=f"{name} ({entry['cls']})",
        )
        if entry["tolerance_ess"] is not None:
            ax.plot(report.offsets, entry["tolerance_ess"], color=colour, alpha=alpha, lw=1.0, ls="--")
    ax.axvline(0, color="0.3", lw=1.0, ls=":")
    ax.set_xlabel("offset from the delimiter (tokens)", fontsize=LABEL_SIZE)
    ax.set_ylabel("ESS per operator", fontsize=LABEL_SIZE)
    ax.tick_params(labelsize=TICK_SIZE)
    ax.grid(True, alpha=0.25, linewidth=0.6)
    if n <= 12:
        ax.legend(fontsize=LEGEND_SIZE - 2, loc="best")
    fig.suptitle(
        f"ESS around token {report.delimiter_id} ({len(report.occurrences)} occurrences)\n"
        "solid entropy-ESS, dashed tolerance-ESS",
        fontsize=TITLE_SIZE,
    )
    return fig
