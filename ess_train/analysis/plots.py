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

from ess_train.plots import DPI, FIGSIZE, LABEL_SIZE, LEGEND_SIZE, TICK_SIZE, TITLE_SIZE, save_figure

__all__ = ["report_profile_figure", "report_utilization_figure", "save_report_plots"]

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


def save_report_plots(report: Any, directory: str | Path) -> list[Path]:
    """``ess_profiles.png`` and ``ess_utilization.png`` in ``directory`` (created)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return [
        save_figure(report_profile_figure(report), directory / "ess_profiles.png"),
        save_figure(report_utilization_figure(report), directory / "ess_utilization.png"),
    ]
