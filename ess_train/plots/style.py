"""What every ESS figure shares: sizes, colours, labels, robust colour limits, PNG and RGB output
(matplotlib + numpy only)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = [
    "FIGSIZE",
    "DPI",
    "TITLE_SIZE",
    "LABEL_SIZE",
    "TICK_SIZE",
    "LEGEND_SIZE",
    "MISSING_COLOUR",
    "layer_label",
    "plot_stem",
    "robust_limits",
    "profile_steps",
    "as_matrix",
    "cell_edges",
    "format_value",
    "int_locator",
    "style_axes",
    "set_titles",
    "subtitle",
    "figure_to_rgb",
    "save_figure",
]

#: default figure size (inches) and resolution: 1100 x 605 pixels.
FIGSIZE = (10.0, 5.5)
DPI = 110

TITLE_SIZE = 14
LABEL_SIZE = 12.5
TICK_SIZE = 11
LEGEND_SIZE = 11
MISSING_COLOUR = "0.82"  # heatmap background: cells with no (finite) measurement


def layer_label(name: str, kind: str | None = None) -> str:
    """``"name (Kind)"``, e.g. ``"model.blocks.1.mixer (GatedLinearAttention)"``; ``name`` without a kind."""
    name = name or "model"
    return f"{name} ({kind})" if kind else name


def plot_stem(name: str) -> str:
    """File-name stem of a layer's plots (``/`` replaced; the root module is ``model``)."""
    return name.replace("/", "_") or "model"


def robust_limits(
    values: Any, lower: float = 2.0, upper: float = 98.0, fence: float = 1.5
) -> tuple[float, float]:
    """Colour limits ``(vmin, vmax)`` that a few outlying entries do not set.

    ``vmin`` is the ``lower`` percentile of the finite values; ``vmax`` is the ``upper`` percentile, capped at
    the upper Tukey fence ``Q3 + fence * IQR``: a block of steps that stands far above the rest (typically
    the first measurements, at initialization, before the ESS of a layer collapses) is clipped even when
    it holds more than ``100 - upper`` percent of the entries, which a percentile alone would not clip.
    Data spread evenly over its range is not clipped by the fence; a limit within 1 % of the range from the
    data's extreme snaps to that extreme (no invisible clipping). Returns ``(0, 1)`` when nothing is
    finite and widens a degenerate range so that ``vmin < vmax``.
    """
    arr = np.asarray(values, dtype=float).ravel()
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return 0.0, 1.0
    lo, q1, q3, hi = np.percentile(arr, [lower, 25.0, 75.0, upper])
    if fence is not None:
        hi = min(hi, q3 + fence * (q3 - q1))
    lo, hi = float(lo), float(hi)
    # a clip by under 1 % of the colour range changes nothing visible: show the data's own extreme instead
    # (so that the colour bar does not claim clipping where there is none to see)
    span = hi - lo
    if float(arr.max()) - hi <= 0.01 * span:
        hi = float(arr.max())
    if lo - float(arr.min()) <= 0.01 * span:
        lo = float(arr.min())
    if not hi > lo:
        # constant data, or a fence at the lower limit: fall back to the full range, then to +-0.5
        lo, hi = float(arr.min()), float(arr.max())
        if not hi > lo:
            pad = 0.5 if lo == 0 else 0.05 * abs(lo)
            lo, hi = lo - pad, hi + pad
    return lo, hi


def cell_edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges around sorted centres (midpoints; a single centre gets a cell of width 1)."""
    if centres.size == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    mid = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - mid[0]], mid, [2 * centres[-1] - mid[-1]]])


def format_value(value: float) -> str:
    return f"{value:.2f}" if abs(value) < 100 else f"{value:.4g}"


def int_locator() -> MaxNLocator:
    """Integer ticks at round values (0, 50, 100, ...), also when the view holds a single integer."""
    return MaxNLocator(integer=True, min_n_ticks=1, steps=[1, 2, 2.5, 5, 10])


def style_axes(ax: Any) -> None:
    ax.tick_params(labelsize=TICK_SIZE)
    ax.grid(True, alpha=0.25, linewidth=0.6)


def set_titles(fig: Figure, title: str, subtitle: str) -> None:
    """Title and subtitle centred over the whole figure (a long layer label never gets cut)."""
    fig.suptitle(f"{title}\n{subtitle}", fontsize=TITLE_SIZE)


def subtitle(label: str, tss: Mapping[str, Any] | None) -> str:
    if not tss:
        return label
    parts = [label]
    if "per_operator" in tss:
        parts.append(f"rank bound per operator {int(tss['per_operator'])}")
    if "total" in tss:
        parts.append(f"TSS {int(tss['total'])}")
    return "  |  ".join(parts)


def profile_steps(hist: Mapping[str, Any]) -> list[int]:
    """The steps of a history's ``profiles``: ``profile_steps`` (a thinned history keeps fewer profiles than
    scalars, ``ess_train.measure.history``), else ``steps``."""
    kept = hist.get("profile_steps")
    return list(kept) if kept is not None else list(hist.get("steps", []))


def as_matrix(profiles: Sequence[Sequence[float]], width: int) -> np.ndarray:
    """``[steps, width]`` float array; rows of another length (e.g. from an old history) become NaN."""
    rows = [list(p) if len(p) == width else [math.nan] * width for p in profiles]
    return np.asarray(rows, dtype=float).reshape(len(rows), width)


def figure_to_rgb(fig: Figure) -> np.ndarray:
    """Render a figure to an RGB ``uint8`` array ``[H, W, 3]``."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG at its own size and resolution (no tight cropping)."""
    path = Path(path)
    FigureCanvasAgg(fig).print_png(str(path))
    return path
