"""Figures of one layer's (or a few layers') ESS history: the position x step heatmap, ESS-by-position
profiles, and every layer's utilization against the step (matplotlib + numpy only)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ess_train.plots.style import (
    DPI,
    FIGSIZE,
    LABEL_SIZE,
    LEGEND_SIZE,
    MISSING_COLOUR,
    TICK_SIZE,
    as_matrix,
    cell_edges,
    figure_to_rgb,
    format_value,
    int_locator,
    layer_label,
    profile_steps,
    robust_limits,
    set_titles,
    style_axes,
    subtitle,
)

__all__ = ["heatmap_figure", "render_heatmap", "profile_figure", "utilization_figure", "rank_bound_profile"]


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
    data = as_matrix(profiles, len(y))[: len(x)]  # [steps, positions]
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
        cell_edges(x),
        cell_edges(y),
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
            f"entropy-ESS (colour clipped to [{format_value(vmin)}, {format_value(vmax)}];\n"
            f"data range {format_value(finite.min())} to {format_value(finite.max())})"
        )
    else:
        cbar_label = "entropy-ESS"
    cbar.set_label(cbar_label, fontsize=LABEL_SIZE)
    cbar.ax.tick_params(labelsize=TICK_SIZE)
    ax.set_xlabel("training step", fontsize=LABEL_SIZE)
    ax.set_ylabel("position i", fontsize=LABEL_SIZE)
    ax.xaxis.set_major_locator(int_locator())  # steps and positions are integers
    ax.yaxis.set_major_locator(int_locator())
    ax.tick_params(labelsize=TICK_SIZE)
    title = "Entropy-ESS by position over training"
    if finite.size < data.size:
        title += " (grey: not measured / NaN)"
    set_titles(fig, title, subtitle(label, tss))
    return fig


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
    prof = as_matrix(hist.get("profiles", []), len(positions))[: len(steps)]
    tol = as_matrix(hist.get("tolerance_profiles", []), len(positions))[: len(steps)]

    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    style_axes(ax)
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
    ax.xaxis.set_major_locator(int_locator())
    ax.set_xlabel("position i", fontsize=LABEL_SIZE)
    ax.set_ylabel("ESS (mean over operators and probe rows)", fontsize=LABEL_SIZE)
    shown = f"{len(chosen)} of {len(finite_rows)} measurements" if chosen else "no measurement"
    set_titles(fig, f"ESS by position ({shown})", subtitle(label, tss))
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
    style_axes(ax)
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
    ax.xaxis.set_major_locator(int_locator())
    ax.set_xlabel("training step", fontsize=LABEL_SIZE)
    ax.set_ylabel("state utilization\n(ESS / rank bound)", fontsize=LABEL_SIZE)
    set_titles(
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
