"""Figures of an :class:`~ess_train.analysis.ESSReport` (matplotlib, in the house style of ``plots.py``).

- :func:`report_profile_figure`: entropy-ESS (and tolerance-ESS, dashed) against position, one line per
  layer, coloured by layer kind, with the per-operator rank bound ``min(per_operator, i, L - i)`` dotted;
- :func:`report_utilization_figure`: state utilization per layer (bars on ``[0, 1]``);
- :func:`save_report_plots`: both as PNG files.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ess_train.measure.positions import position_bounds
from ess_train.plots.overview import layers_heatmap
from ess_train.plots.style import (
    DPI,
    FIGSIZE,
    LABEL_SIZE,
    LEGEND_SIZE,
    TICK_SIZE,
    TITLE_SIZE,
    layer_label,
    save_figure,
)

__all__ = [
    "report_profile_figure",
    "report_utilization_figure",
    "report_layers_figure",
    "position_utilization",
    "save_report_plots",
]

_KIND_COLOURS = {
    "softmax_attention": "tab:blue",
    "sliding_window_attention": "tab:cyan",
    "mamba": "tab:red",
    "falcon_mamba": "tab:orange",
    "mamba2": "tab:purple",
}


def kind_colour(kind: str, i: int) -> str:
    """The colour of a layer kind in every analysis figure (matplotlib's cycle for other kinds)."""
    return _KIND_COLOURS.get(kind, f"C{i % 10}")


def report_profile_figure(report: Any) -> Figure:
    """ESS profiles of every layer of ``report`` (an ``ESSReport``)."""
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    n = len(report.layers)
    for i, r in enumerate(report.layers.values()):
        colour = kind_colour(r.kind, i)
        alpha = 0.35 + 0.65 * (i + 1) / max(n, 1)  # deeper layers darker
        ax.plot(r.positions, r.entropy_ess, color=colour, alpha=alpha, lw=1.6, label=f"{r.name} ({r.cls})")
        if r.tolerance_ess is not None:
            ax.plot(r.positions, r.tolerance_ess, color=colour, alpha=alpha, lw=1.0, ls="--")
    if report.layers:
        first = next(iter(report.layers.values()))
        pos = np.asarray(first.positions)
        bound = np.minimum(np.minimum(first.per_operator, pos), report.seq_len - pos)
        ax.plot(pos, bound, color="0.5", ls=":", lw=1.0, label=f"rank bound ({first.name})")
    ax.set_xlabel("position i", fontsize=LABEL_SIZE)
    ax.set_ylabel("ESS per operator (mean over rows, heads/channels)", fontsize=LABEL_SIZE)
    ax.tick_params(labelsize=TICK_SIZE)
    ax.grid(True, alpha=0.25, linewidth=0.6)
    if n <= 12:
        ax.legend(fontsize=LEGEND_SIZE - 2, loc="best")
    fig.suptitle(
        f"ESS profiles of {report.model}\nL = {report.seq_len}, batch {report.batch}, "
        f"{len(report.positions)} positions; solid entropy-ESS, dashed tolerance-ESS",
        fontsize=TITLE_SIZE,
    )
    return fig


def report_utilization_figure(report: Any) -> Figure:
    """State utilization of every layer of ``report``, in model order."""
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    rows = list(report.layers.values())
    values = [r.utilization if math.isfinite(r.utilization) else 0.0 for r in rows]
    ax.bar(range(len(rows)), values, color=[kind_colour(r.kind, i) for i, r in enumerate(rows)])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r.name for r in rows], rotation=60, ha="right", fontsize=TICK_SIZE - 3)
    ax.set_ylim(0, 1)
    ax.set_ylabel("state utilization", fontsize=LABEL_SIZE)
    ax.grid(True, axis="y", alpha=0.25, linewidth=0.6)
    fig.suptitle(f"State utilization of {report.model} (L = {report.seq_len})", fontsize=TITLE_SIZE)
    fig.subplots_adjust(bottom=0.35)
    return fig


def position_utilization(layer: Any, seq_len: int) -> np.ndarray:
    """A layer report's utilization at each evaluated position: ``ESS_i / b_i`` with the rank bound
    ``b_i = min(per_operator, i, L - i)`` (NaN where ``b_i = 0``)."""
    bounds = np.asarray(position_bounds(layer.per_operator, seq_len, layer.positions), dtype=float)
    ess = np.asarray(layer.entropy_ess, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(bounds > 0, ess / np.where(bounds > 0, bounds, 1.0), np.nan)


def report_layers_figure(report: Any, metric: str = "utilization") -> Figure:
    """Layers x positions heatmap of a report: per-position ``utilization`` (default, on [0, 1]) or
    ``entropy`` (entropy-ESS): one figure however many layers the model has."""
    rows = list(report.layers.values())
    positions = sorted({p for r in rows for p in r.positions})
    values = np.full((len(rows), len(positions)), np.nan)
    where = {p: j for j, p in enumerate(positions)}
    for i, r in enumerate(rows):
        row = (
            position_utilization(r, report.seq_len) if metric == "utilization" else np.asarray(r.entropy_ess)
        )
        for p, v in zip(r.positions, row, strict=True):
            values[i, where[p]] = v
    labels = [layer_label(r.name, r.cls) for r in rows]
    return layers_heatmap(
        values,
        positions,
        labels,
        title=f"{report.model}: {metric} by layer and position (L = {report.seq_len})",
        xlabel="position i",
        metric=metric,
        unit_range=metric == "utilization",
    )


def save_report_plots(report: Any, directory: str | Path) -> list[Path]:
    """``ess_profiles.png``, ``ess_utilization.png`` (one bar per layer) and the layers x positions heatmaps
    ``ess_utilization_layers.png`` and ``ess_entropy_layers.png`` in ``directory`` (created)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return [
        save_figure(report_profile_figure(report), directory / "ess_profiles.png"),
        save_figure(report_utilization_figure(report), directory / "ess_utilization.png"),
        save_figure(report_layers_figure(report, "utilization"), directory / "ess_utilization_layers.png"),
        save_figure(report_layers_figure(report, "entropy"), directory / "ess_entropy_layers.png"),
    ]
