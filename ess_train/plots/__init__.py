"""Figures of ESS (matplotlib + numpy only; no Lightning, no torch).

The functions take plain data, as :class:`ess_train.callbacks.ESSMonitor` keeps it: per layer a history dict
with ``steps``, ``positions``, ``profiles`` (one entropy-ESS-by-position list per step),
``tolerance_profiles`` (same, tolerance-ESS; of the steps ``profile_steps`` where given, a thinned history)
and one list per summary scalar (``utilization``, ``avg_entropy``, ...); optionally the layer's theoretical
state size (``tss``: ``total``, ``per_operator``, ``seq_len``) and a display label, e.g.
``"model.blocks.1.mixer (GatedLinearAttention)"`` from :func:`layer_label`.

- :mod:`~ess_train.plots.overview`, one figure per metric whatever the depth: a layers x steps heatmap
  (:func:`layers_heatmap`) and a line chart with every layer (:func:`layers_lines`);
- :mod:`~ess_train.plots.per_layer`, per layer: :func:`heatmap_figure` / :func:`render_heatmap` (entropy-ESS
  by position and step, robust colour limits), :func:`profile_figure` (ESS by position at a few steps), and
  :func:`utilization_figure` (every layer's utilization against the step, with a legend);
- :func:`save_history_plots`: the overviews, plus the per-layer figures for small models, as PNG files.

NaN entries (steps where a layer was missing) are tolerated everywhere: grey cells in the heatmaps, gaps in
the lines, skipped profiles.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ess_train.plots.overview import (
    LEGEND_LAYERS,
    layer_matrix,
    layers_heatmap,
    layers_lines,
    overview_labels,
)
from ess_train.plots.per_layer import (
    heatmap_figure,
    profile_figure,
    rank_bound_profile,
    render_heatmap,
    utilization_figure,
)
from ess_train.plots.style import (
    DPI,
    FIGSIZE,
    figure_to_rgb,
    layer_label,
    plot_stem,
    profile_steps,
    robust_limits,
    save_figure,
)

__all__ = [
    "FIGSIZE",
    "DPI",
    "PER_LAYER_UP_TO",
    "layer_label",
    "robust_limits",
    "heatmap_figure",
    "render_heatmap",
    "profile_figure",
    "utilization_figure",
    "rank_bound_profile",
    "layer_matrix",
    "layers_heatmap",
    "layers_lines",
    "overview_figures",
    "figure_to_rgb",
    "save_figure",
    "save_history_plots",
    "profile_steps",
    "plot_stem",
]

#: models with up to this many layers also get the per-layer heatmap and profile files by default
PER_LAYER_UP_TO = 4


def overview_figures(
    history: Mapping[str, Mapping[str, Any]],
    *,
    layer_kinds: Mapping[str, str] | None = None,
    collapse_threshold: float | None = None,
    saturation_threshold: float | None = None,
) -> dict[str, Any]:
    """The overviews of a history, by file stem: ``utilization_layers`` and ``entropy_layers`` (layers x
    steps heatmaps) and ``utilization`` and ``entropy`` (one line per layer)."""
    out: dict[str, Any] = {}
    thresholds = {
        k: v
        for k, v in (("collapse", collapse_threshold), ("saturation", saturation_threshold))
        if v is not None
    }
    for metric, stem in (("utilization", "utilization"), ("avg_entropy", "entropy")):
        layers, steps, values = layer_matrix(history, metric)
        if not layers:
            continue
        labels = overview_labels(layers, layer_kinds)
        out[f"{stem}_layers"] = layers_heatmap(
            values,
            steps,
            labels,
            title=f"{stem}: layers x steps",
            xlabel="training step",
            metric=metric,
            unit_range=metric == "utilization",
        )
        if metric == "avg_entropy" or len(layers) > LEGEND_LAYERS:
            out[stem] = layers_lines(
                steps,
                values,
                labels,
                title=f"{stem} of every layer",
                metric=metric,
                thresholds=thresholds if metric == "utilization" else None,
            )
    return out


def save_history_plots(
    directory: str | Path,
    history: Mapping[str, Mapping[str, Any]],
    *,
    layer_kinds: Mapping[str, str] | None = None,
    tss: Mapping[str, Mapping[str, Any]] | None = None,
    collapse_threshold: float | None = None,
    saturation_threshold: float | None = None,
    per_layer: bool | None = None,
) -> list[Path]:
    """Write the overviews (``utilization_layers.png``, ``entropy_layers.png``, ``entropy.png`` and
    ``utilization.png``: a fixed number of files whatever the depth) and, with ``per_layer`` (default: up to
    :data:`PER_LAYER_UP_TO` layers), ``<layer>_heatmap.png`` and ``<layer>_profile.png`` per layer, into
    ``directory``. Returns the paths written."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    kinds = dict(layer_kinds or {})
    tss = dict(tss or {})
    labels = {name: layer_label(name, kinds.get(name)) for name in history}
    measured = [n for n, h in history.items() if h.get("steps") and h.get("positions")]
    if per_layer is None:
        per_layer = len(measured) <= PER_LAYER_UP_TO
    paths: list[Path] = []
    for name in measured if per_layer else []:
        hist, stem = history[name], plot_stem(name)
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
    figures = overview_figures(
        history,
        layer_kinds=kinds,
        collapse_threshold=collapse_threshold,
        saturation_threshold=saturation_threshold,
    )
    if history and "utilization" not in figures:  # up to LEGEND_LAYERS layers: lines with a legend
        figures["utilization"] = utilization_figure(
            history,
            labels,
            tss=tss,
            collapse_threshold=collapse_threshold,
            saturation_threshold=saturation_threshold,
        )
    for stem, fig in figures.items():
        paths.append(save_figure(fig, out / f"{stem}.png"))
    return paths
