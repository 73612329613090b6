"""Figures of an ESS history (matplotlib + numpy only; no Lightning, no torch).

The functions take plain data, as :class:`ess_train.callbacks.ESSMonitor` keeps it: per layer a history dict
with ``steps``, ``positions``, ``profiles`` (one entropy-ESS-by-position list per step),
``tolerance_profiles`` (same, tolerance-ESS; of the steps ``profile_steps`` where given, a thinned history)
and ``utilization`` (one number per step); optionally the
layer's theoretical state size (``tss``: ``total``, ``per_operator``, ``seq_len``) and a display label,
e.g. ``"model.blocks.1.mixer (GatedLinearAttention)"`` from :func:`layer_label`.

- :func:`heatmap_figure` / :func:`render_heatmap`: entropy-ESS by position (y) and training step (x), with
  robust colour limits (:func:`robust_limits`), as a Figure or an RGB ``uint8`` array (for loggers);
- :func:`profile_figure`: ESS-by-position profiles of the first, a few intermediate and the last step;
- :func:`utilization_figure`: state utilization (ESS over the per-operator rank bound) of every layer
  against the training step, on ``[0, 1]``;
- :func:`save_history_plots`: all of them as PNG files.

NaN entries (steps where a layer was missing) are tolerated everywhere: grey cells in the heatmap, gaps in
the utilization lines, skipped profiles.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

__all__ = [
    "FIGSIZE",
    "DPI",
    "layer_label",
    "robust_limits",
    "heatmap_figure",
    "render_heatmap",
    "profile_figure",
    "utilization_figure",
    "save_figure",
    "save_history_plots",
    "profile_steps",
    "plot_stem",
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


def _edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges around sorted centres (midpoints; a single centre gets a cell of width 1)."""
    if centres.size == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    mid = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - mid[0]], mid, [2 * centres[-1] - mid[-1]]])


def _fmt(value: float) -> str:
    return f"{value:.2f}" if abs(value) < 100 else f"{value:.4g}"


def _int_locator() -> MaxNLocator:
    """Integer ticks at round values (0, 50, 100, ...), also when the view holds a single integer."""
    return MaxNLocator(integer=True, min_n_ticks=1, steps=[1, 2, 2.5, 5, 10])


def _style(ax: Any) -> None:
    ax.tick_params(labelsize=TICK_SIZE)
    ax.grid(True, alpha=0.25, linewidth=0.6)


def _titles(fig: Figure, title: str, subtitle: str) -> None:
    """Title and subtitle centred over the whole figure (a long layer label never gets cut)."""
    fig.suptitle(f"{title}\n{subtitle}", fontsize=TITLE_SIZE)


def _subtitle(label: str, tss: Mapping[str, Any] | None) -> str:
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


def _as_matrix(profiles: Sequence[Sequence[float]], width: int) -> np.ndarray:
    """``[steps, width]`` float array; rows of another length (e.g. from an old history) become NaN."""
    rows = [list(p) if len(p) == width else [math.nan] * width for p in profiles]
    return np.asarray(rows, dtype=float).reshape(len(rows), width)


def heatmap_figure(
    name: str,
    steps: Sequence[int],
    positions: Sequence[int],
    profiles: Sequence[Sequence[float]],
    *,
    label: str | None = None,
    tss: Mapping[str, Any] | None = None,
    figsize: tuple[float, float] = FIGSIZE,
    dpi: int = DPI,
) -> Figure:
    """Entropy-ESS by position (y) and training step (x) of one layer, with robust colour limits.

    Colours are clipped to :func:`robust_limits` of all finite entries (so neither an outlying step nor
    ``ESS_0 = 0`` sets the scale); the colour bar says so and shows arrows on the clipped ends. Cells with
    no finite measurement are grey. ``fig.axes[0].collections[0].norm`` holds the limits.
    """
    label = label or layer_label(name)
    x = np.asarray(steps, dtype=float)
    y = np.asarray(positions, dtype=float)
    data = _as_matrix(profiles, len(y))[: len(x)]  # [steps, positions]
    x = x[: len(data)]
    if len(y) == 0:  # nothing to show: one grey cell
        y, data = np.zeros(1), np.full((len(x), 1), math.nan)
    if len(x) == 0:
        x, data = np.zeros(1), np.full((1, len(y)), math.nan)
    order = np.argsort(x, kind="stable")
    x, data = x[order], data[order]
    porder = np.argsort(y, kind="stable")
    y, data = y[porder], data[:, porder]

    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    ax.set_facecolor(MISSING_COLOUR)
    finite = data[np.isfinite(data)]
    vmin, vmax = robust_limits(finite)
    below = bool(finite.size and finite.min() < vmin)
    above = bool(finite.size and finite.max() > vmax)
    extend = {(False, False): "neither", (True, False): "min", (False, True): "max", (True, True): "both"}
    mesh = ax.pcolormesh(
        _edges(x),
        _edges(y),
        np.ma.masked_invalid(data.T),
        cmap="viridis",
        vmin=vmin,
        vmax=vmax,
        shading="flat",
        rasterized=True,
    )
    cbar = fig.colorbar(mesh, ax=ax, extend=extend[(below, above)], pad=0.02)
    if below or above:
        cbar_label = (
            f"entropy-ESS (colour clipped to [{_fmt(vmin)}, {_fmt(vmax)}];\n"
            f"data range {_fmt(finite.min())} to {_fmt(finite.max())})"
        )
    else:
        cbar_label = "entropy-ESS"
    cbar.set_label(cbar_label, fontsize=LABEL_SIZE)
    cbar.ax.tick_params(labelsize=TICK_SIZE)
    ax.set_xlabel("training step", fontsize=LABEL_SIZE)
    ax.set_ylabel("position i", fontsize=LABEL_SIZE)
    ax.xaxis.set_major_locator(_int_locator())  # steps and positions are integers
    ax.yaxis.set_major_locator(_int_locator())
    ax.tick_params(labelsize=TICK_SIZE)
    title = "Entropy-ESS by position over training"
    if finite.size < data.size:
        title += " (grey: not measured / NaN)"
    _titles(fig, title, _subtitle(label, tss))
    return fig


def figure_to_rgb(fig: Figure) -> np.ndarray:
    """Render a figure to an RGB ``uint8`` array ``[H, W, 3]``."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def render_heatmap(
    name: str,
    steps: Sequence[int],
    positions: Sequence[int],
    profiles: Sequence[Sequence[float]],
    *,
    label: str | None = None,
    tss: Mapping[str, Any] | None = None,
    figsize: tuple[float, float] = FIGSIZE,
    dpi: int = DPI,
) -> np.ndarray:
    """:func:`heatmap_figure` as an RGB ``uint8`` image ``[H, W, 3]`` (for W&B / TensorBoard)."""
    return figure_to_rgb(
        heatmap_figure(name, steps, positions, profiles, label=label, tss=tss, figsize=figsize, dpi=dpi)
    )


def _pick_steps(steps: np.ndarray, candidates: np.ndarray, max_profiles: int) -> list[int]:
    """Indices (into ``steps``) of the first, the last and up to ``max_profiles - 2`` intermediate
    measurements among ``candidates``, log-spaced in step (training changes fastest early)."""
    if candidates.size <= max_profiles:
        return [int(i) for i in candidates]
    first, last = int(candidates[0]), int(candidates[-1])
    chosen = {first, last}
    s0, s1 = float(steps[first]), float(steps[last])
    n_mid = max_profiles - 2
    if n_mid > 0 and s1 > s0:
        # log spacing needs positive steps: shift by one measurement interval when the first step is ~0,
        # so that steps 0, 25, ..., 300 give about 0, 25, 75, 150, 300 (not 0, 25, 50, 75, 300)
        gaps = np.diff(steps[candidates])
        gap = float(np.median(gaps[gaps > 0])) if (gaps > 0).any() else 1.0
        offset = gap - s0 if s0 < gap else 0.0
        targets = np.geomspace(s0 + offset, s1 + offset, n_mid + 2)[1:-1] - offset
        pool = [int(i) for i in candidates[1:-1]]
        for t in targets:
            remaining = [i for i in pool if i not in chosen]
            if not remaining:
                break
            chosen.add(min(remaining, key=lambda i: abs(float(steps[i]) - t)))
    return sorted(chosen, key=lambda i: (steps[i], i))


def rank_bound_profile(positions: Sequence[int], per_operator: int, seq_len: int) -> np.ndarray:
    """``min(per_operator, i, L - i)`` at each position: the bound on ``rank(H_i)``."""
    pos = np.asarray(positions, dtype=float)
    return np.minimum(np.minimum(float(per_operator), pos), float(seq_len) - pos)


def profile_figure(
    name: str,
    hist: Mapping[str, Any],
    *,
    label: str | None = None,
    tss: Mapping[str, Any] | None = None,
    max_profiles: int = 5,
    figsize: tuple[float, float] = FIGSIZE,
    dpi: int = DPI,
) -> Figure:
    """ESS by position of the first, a few intermediate (log-spaced in step) and the last measurement.

    Solid: entropy-ESS; dashed: tolerance-ESS (where recorded); colour: training step (sequential
    colormap); dotted grey: the rank bound ``min(N, i, L - i)`` when ``tss`` gives ``per_operator`` and
    ``seq_len``. The legend sits outside the axes, to the right, so that it covers no curve.
    """
    from matplotlib import colormaps

    label = label or layer_label(name)
    positions = list(hist.get("positions", []))
    steps = np.asarray(profile_steps(hist), dtype=float)
    prof = _as_matrix(hist.get("profiles", []), len(positions))[: len(steps)]
    tol = _as_matrix(hist.get("tolerance_profiles", []), len(positions))[: len(steps)]

    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    _style(ax)
    x = np.asarray(positions, dtype=float)
    finite_rows = np.flatnonzero(np.isfinite(prof).any(axis=1)) if prof.size else np.array([], dtype=int)
    # candidates in step order
    finite_rows = finite_rows[np.argsort(steps[finite_rows], kind="stable")]
    chosen = _pick_steps(steps, finite_rows, max_profiles)
    cmap = colormaps["viridis"]
    handles: list[Any] = []
    any_tol = False
    marker = "o" if len(x) <= 2 else None
    for k, i in enumerate(chosen):
        # colour by rank among the shown steps (they are log-spaced): early dark, late light
        colour = cmap(0.9 * k / max(len(chosen) - 1, 1))
        (line,) = ax.plot(
            x, prof[i], "-", color=colour, linewidth=2.2, marker=marker, label=f"step {int(steps[i])}"
        )
        handles.append(line)
        if i < len(tol) and np.isfinite(tol[i]).any():
            any_tol = True
            ax.plot(
                x, tol[i], "--", color=colour, linewidth=1.4, alpha=0.9, marker=marker, markerfacecolor="none"
            )
    style_handles = [Line2D([], [], color="0.2", linewidth=2.2, label="entropy-ESS")]
    if any_tol:
        style_handles.append(
            Line2D([], [], color="0.2", linestyle="--", linewidth=1.4, label="tolerance-ESS")
        )
    if (
        tss
        and "per_operator" in tss
        and "seq_len" in tss
        and positions
        and max(positions) < int(tss["seq_len"])
    ):
        bound = rank_bound_profile(positions, int(tss["per_operator"]), int(tss["seq_len"]))
        (bline,) = ax.plot(
            x,
            bound,
            ":",
            color="0.45",
            linewidth=1.6,
            marker="_" if marker else None,
            markersize=14,
            label=f"rank bound min({int(tss['per_operator'])}, i, L-i)",
        )
        style_handles.append(bline)
    if not chosen:
        ax.text(
            0.5,
            0.5,
            "no finite ESS recorded",
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=LABEL_SIZE,
            color="0.4",
        )
    ax.set_ylim(bottom=0)
    if len(x):
        ax.set_xlim(x.min() - 0.5, x.max() + 0.5) if len(x) == 1 else ax.set_xlim(x.min(), x.max())
    ax.xaxis.set_major_locator(_int_locator())
    ax.set_xlabel("position i", fontsize=LABEL_SIZE)
    ax.set_ylabel("ESS (mean over operators and probe rows)", fontsize=LABEL_SIZE)
    shown = f"{len(chosen)} of {len(finite_rows)} measurements" if chosen else "no measurement"
    _titles(fig, f"ESS by position ({shown})", _subtitle(label, tss))
    legend = ax.legend(
        handles=handles + style_handles,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        borderaxespad=0.0,
        fontsize=LEGEND_SIZE,
        title="training step",
        title_fontsize=LEGEND_SIZE,
        frameon=False,
    )
    legend.set_in_layout(True)
    return fig


def utilization_figure(
    histories: Mapping[str, Mapping[str, Any]],
    labels: Mapping[str, str] | None = None,
    *,
    tss: Mapping[str, Mapping[str, Any]] | None = None,
    collapse_threshold: float | None = None,
    saturation_threshold: float | None = None,
    figsize: tuple[float, float] = FIGSIZE,
    dpi: int = DPI,
) -> Figure:
    """State utilization of every layer over training, on ``[0, 1]``.

    Utilization is ``sum_i ESS_i / sum_i min(N, i, L - i)``: entropy-ESS over the per-operator rank bound
    ``N`` (``StateSize.per_operator``), not over the layer's total state size (TSS). Dotted lines (and light
    bands) mark the collapse and saturation thresholds when given. The legend is below the axes.
    """
    labels = dict(labels or {})
    tss = tss or {}
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    _style(ax)
    ax.set_ylim(0.0, 1.0)
    if collapse_threshold is not None and 0 < collapse_threshold < 1:
        ax.axhspan(0.0, collapse_threshold, color="tab:red", alpha=0.07, linewidth=0)
        ax.axhline(
            collapse_threshold,
            color="tab:red",
            linestyle=":",
            linewidth=1.4,
            label=f"collapse threshold ({collapse_threshold:g})",
        )
    if saturation_threshold is not None and 0 < saturation_threshold < 1:
        ax.axhspan(saturation_threshold, 1.0, color="tab:orange", alpha=0.08, linewidth=0)
        ax.axhline(
            saturation_threshold,
            color="tab:orange",
            linestyle=":",
            linewidth=1.4,
            label=f"saturation threshold ({saturation_threshold:g})",
        )
    any_steps = False
    top = 1.0
    for name, hist in histories.items():
        steps = np.asarray(hist.get("steps", []), dtype=float)
        util = np.asarray(hist.get("utilization", []), dtype=float)[: len(steps)]
        steps = steps[: len(util)]
        order = np.argsort(steps, kind="stable")
        steps, util = steps[order], util[order]
        any_steps |= bool(len(steps))
        text = labels.get(name) or layer_label(name)
        if name in tss and "per_operator" in tss[name]:
            text += f", N = {int(tss[name]['per_operator'])}"
        if not np.isfinite(util).any():
            text += " (undefined)"
        finite = util[np.isfinite(util)]
        top = max(top, float(finite.max()) if finite.size else 0.0)
        # markers at exactly 0 or 1 stay whole (unclipped) when every value lies in [0, 1]
        inside = bool(finite.size == 0 or (finite.min() >= 0 and finite.max() <= 1))
        ax.plot(steps, util, marker="o", markersize=4.5, linewidth=2.0, label=text, clip_on=not inside)
    if top > 1.0:  # above the bound: not expected (utilization <= 1), shown rather than hidden
        ax.set_ylim(0.0, 1.05 * top)
    ax.xaxis.set_major_locator(_int_locator())
    ax.set_xlabel("training step", fontsize=LABEL_SIZE)
    ax.set_ylabel("state utilization\n(ESS / rank bound)", fontsize=LABEL_SIZE)
    _titles(
        fig,
        "State utilization over training",
        r"utilization = $\Sigma_i\,\mathrm{ESS}_i\;/\;\Sigma_i\,\min(N, i, L-i)$,  "
        "N = per-operator rank bound (not the layer's TSS)",
    )
    if not any_steps:
        ax.text(
            0.5,
            0.5,
            "no measurement",
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=LABEL_SIZE,
            color="0.4",
        )
    handles, texts = ax.get_legend_handles_labels()
    n_ref = sum(t.endswith(" threshold") or " threshold (" in t for t in texts)
    order = list(range(n_ref, len(texts))) + list(range(n_ref))  # layers first, then the references
    ax.legend(
        [handles[i] for i in order],
        [texts[i] for i in order],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.13),
        borderaxespad=0.0,
        fontsize=LEGEND_SIZE,
        frameon=False,
        ncol=2,
    )
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG at its own size and resolution (no tight cropping)."""
    path = Path(path)
    FigureCanvasAgg(fig).print_png(str(path))
    return path


def save_history_plots(
    directory: str | Path,
    history: Mapping[str, Mapping[str, Any]],
    *,
    layer_kinds: Mapping[str, str] | None = None,
    tss: Mapping[str, Mapping[str, Any]] | None = None,
    collapse_threshold: float | None = None,
    saturation_threshold: float | None = None,
) -> list[Path]:
    """Write, per layer with data, ``<layer>_heatmap.png`` and ``<layer>_profile.png``, plus
    ``utilization.png`` (all layers) into ``directory``. Returns the paths written."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    kinds = dict(layer_kinds or {})
    tss = dict(tss or {})
    labels = {name: layer_label(name, kinds.get(name)) for name in history}
    paths: list[Path] = []
    for name, hist in history.items():
        if not hist.get("steps") or not hist.get("positions"):
            continue
        stem = plot_stem(name)
        fig = heatmap_figure(
            name,
            profile_steps(hist),
            hist["positions"],
            hist["profiles"],
            label=labels[name],
            tss=tss.get(name),
        )
        paths.append(save_figure(fig, out / f"{stem}_heatmap.png"))
        fig = profile_figure(name, hist, label=labels[name], tss=tss.get(name))
        paths.append(save_figure(fig, out / f"{stem}_profile.png"))
    if history:
        fig = utilization_figure(
            history,
            labels,
            tss=tss,
            collapse_threshold=collapse_threshold,
            saturation_threshold=saturation_threshold,
        )
        paths.append(save_figure(fig, out / "utilization.png"))
    return paths
