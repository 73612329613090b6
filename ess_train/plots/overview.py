"""One figure per metric for a model with many layers (real models have 24-80): a layers x steps heatmap of
a per-step scalar (utilization, entropy-ESS) from an ESS history, a layers x positions heatmap from a report,
and one line chart of a scalar with every layer in it (coloured by depth, with a colour bar instead of a
legend once there are more than ``LEGEND_LAYERS`` layers). matplotlib + numpy only."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from ess_train.plots.style import (
    DPI,
    FIGSIZE,
    LABEL_SIZE,
    LEGEND_SIZE,
    MISSING_COLOUR,
    TICK_SIZE,
    cell_edges,
    layer_label,
    robust_limits,
    set_titles,
    style_axes,
)

__all__ = [
    "LEGEND_LAYERS",
    "MAX_LAYER_LABELS",
    "layer_matrix",
    "layers_heatmap",
    "layers_lines",
    "overview_labels",
]

#: up to this many layers a line chart has a legend; beyond it, a colour bar by depth
LEGEND_LAYERS = 10
#: y-axis labels shown at most (every k-th layer beyond it)
MAX_LAYER_LABELS = 40

METRIC_NAMES = {
    "utilization": "utilization (ESS / rank bound)",
    "avg_entropy": "entropy-ESS (mean over positions)",
    "max_entropy": "entropy-ESS (max over positions)",
    "avg_tolerance": "tolerance-ESS (mean over positions)",
    "total": "total ESS",
    "entropy": "entropy-ESS",
}


def layer_matrix(
    history: Mapping[str, Mapping[str, Any]], metric: str
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(layers, steps, values [layers, steps])`` of a per-step scalar of every layer of a history, on the
    union of their steps (NaN where a layer has no value at a step)."""
    layers = [n for n, h in history.items() if h.get("steps")]
    steps = np.array(sorted({int(s) for n in layers for s in history[n]["steps"]}), dtype=float)
    values = np.full((len(layers), len(steps)), np.nan)
    where = {int(s): i for i, s in enumerate(steps)}
    for row, name in enumerate(layers):
        hist = history[name]
        for step, value in zip(hist["steps"], hist.get(metric, []), strict=False):
            values[row, where[int(step)]] = np.nan if value is None else float(value)
    return layers, steps, values


def _layer_ticks(ax: Any, labels: Sequence[str]) -> None:
    every = max(1, math.ceil(len(labels) / MAX_LAYER_LABELS))
    ticks = list(range(0, len(labels), every))
    ax.set_yticks(ticks)
    ax.set_yticklabels([labels[i] for i in ticks], fontsize=max(6.0, TICK_SIZE - len(labels) / 12))


def layers_heatmap(
    values: np.ndarray,
    columns: Sequence[float],
    labels: Sequence[str],
    *,
    title: str,
    xlabel: str,
    metric: str,
    unit_range: bool = False,
) -> Figure:
    """``values [layers, columns]`` as a heatmap: one row per layer (top: the first layer), ``columns`` on x
    (steps or positions). ``unit_range``: the colour scale is [0, 1] (utilization), else robust limits."""
    values = np.asarray(values, dtype=float)
    height = max(FIGSIZE[1], min(24.0, 1.6 + 0.22 * len(labels)))
    fig = Figure(figsize=(FIGSIZE[0], height), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set_facecolor(MISSING_COLOUR)
    lo, hi = (0.0, 1.0) if unit_range else robust_limits(values)
    x = cell_edges(np.asarray(columns, dtype=float))
    y = np.arange(len(labels) + 1) - 0.5
    mesh = ax.pcolormesh(x, y, np.ma.masked_invalid(values), cmap="viridis", vmin=lo, vmax=hi, shading="flat")
    ax.invert_yaxis()
    _layer_ticks(ax, list(labels))
    ax.set_xlabel(xlabel, fontsize=LABEL_SIZE)
    ax.tick_params(axis="x", labelsize=TICK_SIZE)
    bar = fig.colorbar(mesh, ax=ax, pad=0.01)
    bar.set_label(METRIC_NAMES.get(metric, metric), fontsize=LABEL_SIZE)
    set_titles(fig, title, f"{len(labels)} layers")
    fig.heatmap_values = values  # (what is drawn, for tests and for callers that want the numbers)
    return fig


def layers_lines(
    steps: np.ndarray,
    values: np.ndarray,
    labels: Sequence[str],
    *,
    title: str,
    metric: str,
    thresholds: Mapping[str, float] | None = None,
) -> Figure:
    """One line per layer of a per-step scalar against the step; more than :data:`LEGEND_LAYERS` layers are
    coloured by depth with a colour bar instead of a legend. ``thresholds``: labelled horizontal lines."""
    values = np.asarray(values, dtype=float)
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    style_axes(ax)
    many = len(labels) > LEGEND_LAYERS
    cmap = colormaps["viridis"]
    norm = Normalize(0, max(1, len(labels) - 1))
    for i, label in enumerate(labels):
        colour = cmap(norm(i)) if many else None
        ax.plot(
            steps,
            values[i],
            marker="" if many else ".",
            linewidth=1.0 if many else 1.6,
            color=colour,
            label=None if many else label,
        )
    for name, level in (thresholds or {}).items():
        ax.axhline(level, color="0.35", linestyle=":", linewidth=1.0)
        ax.text(
            steps[0] if len(steps) else 0, level, f" {name} {level:g}", va="bottom", fontsize=TICK_SIZE - 1
        )
    ax.set_xlabel("training step", fontsize=LABEL_SIZE)
    ax.set_ylabel(METRIC_NAMES.get(metric, metric), fontsize=LABEL_SIZE)
    if metric == "utilization":
        ax.set_ylim(0, 1.05)
    if many:
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.01)
        bar.set_label("layer (depth)", fontsize=LABEL_SIZE)
    elif labels:
        ax.legend(fontsize=LEGEND_SIZE, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    set_titles(fig, title, f"{len(labels)} layers")
    fig.line_values = values
    return fig


def overview_labels(layers: Sequence[str], kinds: Mapping[str, str] | None) -> list[str]:
    kinds = dict(kinds or {})
    return [layer_label(n, kinds.get(n)) for n in layers]
