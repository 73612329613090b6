"""ess_train.plots: the figures of an ESS history (plain data in, Figure / RGB array / PNG out)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.image import imread

from ess_train.plots import (
    heatmap_figure,
    layer_label,
    profile_figure,
    render_heatmap,
    robust_limits,
    save_history_plots,
    utilization_figure,
)

MIN_W, MIN_H = 1000, 600
GLA = "model.blocks.1.mixer"
CONV = "model.blocks.0.mixer"
KINDS = {GLA: "GatedLinearAttention", CONV: "ShortConv"}
TSS = {
    GLA: {"total": 512, "per_operator": 8, "multiplicity": 16, "seq_len": 16},
    CONV: {"total": 192, "per_operator": 3, "multiplicity": 1, "seq_len": 16},
}


def make_hist(n_steps: int = 8, n_pos: int = 16, *, init_factor: float = 1.0, seed: int = 0) -> dict:
    """A history like ESSMonitor's, with ESS_0 = 0 and a plateau; step 0 scaled by ``init_factor``."""
    rng = np.random.default_rng(seed)
    positions = list(range(n_pos))
    steps = [25 * k for k in range(n_steps)]
    base = np.minimum(np.minimum(3.0, np.arange(n_pos)), n_pos - np.arange(n_pos)).astype(float)
    profiles, tols = [], []
    for k in range(n_steps):
        prof = base * (1.0 + 0.2 * rng.random(n_pos))
        prof[0] = 0.0
        if k == 0:
            prof = prof * init_factor
        profiles.append(prof.tolist())
        tols.append(np.ceil(prof).tolist())
    bound = max(np.minimum(np.minimum(8, np.arange(n_pos)), n_pos - np.arange(n_pos)).sum(), 1)
    util = [min(float(np.sum(p) / bound), 1.0) for p in profiles]
    return {
        "steps": steps,
        "positions": positions,
        "profiles": profiles,
        "tolerance_profiles": tols,
        "utilization": util,
        "avg_entropy": [float(np.mean(p)) for p in profiles],
    }


def all_text(fig) -> str:
    """Every text of a figure (suptitle, titles, axis labels, legend entries, colour-bar label)."""
    FigureCanvasAgg(fig).draw()
    parts = [fig._suptitle.get_text() if fig._suptitle else ""]
    for ax in fig.axes:
        parts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        parts += [t.get_text() for t in ax.texts]
        legend = ax.get_legend()
        if legend is not None:
            parts += [t.get_text() for t in legend.get_texts()]
    return "\n".join(parts)


def bbox(artist, fig):
    """Window extent after a full draw (constrained layout runs at draw time)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return artist.get_window_extent(canvas.get_renderer())


# ------------------------------------------------------------------------------------------ files / sizes
def test_save_history_plots_files_sizes_and_labels(tmp_path):
    history = {CONV: make_hist(seed=1), GLA: make_hist(init_factor=10.0)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "constrained_layout not applied"
        paths = save_history_plots(
            tmp_path, history, layer_kinds=KINDS, tss=TSS, collapse_threshold=0.05, saturation_threshold=0.95
        )
    assert {p.name for p in paths} == {
        f"{CONV}_heatmap.png",
        f"{CONV}_profile.png",
        f"{GLA}_heatmap.png",
        f"{GLA}_profile.png",
        "utilization.png",
        "utilization_layers.png",
        "entropy_layers.png",
        "entropy.png",
    }
    for p in paths:
        image = imread(p)
        h, w = image.shape[:2]
        assert w >= MIN_W and h >= MIN_H, (p.name, w, h)
        assert image.std() > 0.05  # not blank


def test_layer_label():
    assert layer_label(GLA, "GatedLinearAttention") == "model.blocks.1.mixer (GatedLinearAttention)"
    assert layer_label(GLA) == GLA and layer_label("", None) == "model"


# ---------------------------------------------------------------------------------------------- utilization
def test_utilization_axis_title_labels_and_limits():
    history = {CONV: make_hist(seed=1), GLA: make_hist()}
    labels = {n: layer_label(n, KINDS[n]) for n in history}
    fig = utilization_figure(history, labels, tss=TSS, collapse_threshold=0.05, saturation_threshold=0.95)
    ax = fig.axes[0]
    ylabel = ax.get_ylabel()
    assert "TSS" not in ylabel and "rank bound" in ylabel and "utilization" in ylabel
    assert fig._suptitle is not None and "utilization" in fig._suptitle.get_text().lower()
    assert ax.get_ylim() == (0.0, 1.0)
    legend_texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("GatedLinearAttention" in t and GLA in t for t in legend_texts)
    assert any("ShortConv" in t for t in legend_texts)
    assert any("collapse threshold" in t for t in legend_texts)
    # horizontal reference lines at the thresholds
    flat = {round(line.get_ydata()[0], 6) for line in ax.get_lines() if len(set(line.get_ydata())) == 1}
    assert {0.05, 0.95} <= flat
    # the legend sits outside the data area (below the axes)
    ax_box, leg_box = bbox(ax, fig), bbox(ax.get_legend(), fig)
    assert not ax_box.overlaps(leg_box)


def test_utilization_tolerates_nan_and_undefined_layers():
    hist = make_hist(n_steps=4)
    hist["utilization"][2] = math.nan
    undefined = make_hist(n_steps=4)
    undefined["utilization"] = [math.nan] * 4
    fig = utilization_figure({GLA: hist, "attn": undefined})
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("undefined" in t for t in texts)
    FigureCanvasAgg(fig).draw()
    assert utilization_figure({}).axes[0].get_ylim() == (0.0, 1.0)
    # a value above the bound (not expected) widens the axis instead of vanishing or breaking the layout
    hist["utilization"][1] = 1.3
    fig = utilization_figure({GLA: hist})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FigureCanvasAgg(fig).draw()
    assert fig.axes[0].get_ylim()[1] >= 1.3


# ---------------------------------------------------------------------------------------------- heatmap
def test_heatmap_colour_limits_robust_to_an_outlying_initial_step():
    # step 0 is 10x the rest; it is 1 of 8 steps (12.5 % of the cells): a 98th percentile alone would
    # still let it set vmax
    hist = make_hist(n_steps=8, init_factor=10.0)
    step0_peak = max(hist["profiles"][0])
    rest_peak = max(max(p) for p in hist["profiles"][1:])
    fig = heatmap_figure(GLA, hist["steps"], hist["positions"], hist["profiles"], label="x")
    norm = fig.axes[0].collections[0].norm
    assert norm.vmax < step0_peak / 2
    assert norm.vmax <= rest_peak * 1.5
    assert norm.vmin >= 0.0
    colorbar_label = fig.axes[1].get_ylabel()
    assert colorbar_label.startswith("entropy-ESS") and "clipped" in colorbar_label


def test_robust_limits_do_not_clip_evenly_spread_data():
    values = np.linspace(0.0, 10.0, 1001)
    lo, hi = robust_limits(values)
    assert lo == pytest.approx(0.2, abs=1e-6) and hi == pytest.approx(9.8, abs=1e-6)
    assert robust_limits([math.nan, math.inf]) == (0.0, 1.0)
    lo, hi = robust_limits([2.0, 2.0, 2.0])
    assert lo < 2.0 < hi


def test_heatmap_title_label_and_rgb_image():
    hist = make_hist()
    label = layer_label(GLA, "GatedLinearAttention")
    fig = heatmap_figure(GLA, hist["steps"], hist["positions"], hist["profiles"], label=label, tss=TSS[GLA])
    text = all_text(fig)
    assert "GatedLinearAttention" in text and "ESS" in fig._suptitle.get_text()
    assert fig.axes[0].get_xlabel() == "training step"
    image = render_heatmap(GLA, hist["steps"], hist["positions"], hist["profiles"], label=label)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[1] >= MIN_W and image.shape[0] >= MIN_H


@pytest.mark.parametrize(
    "n_steps, n_pos",
    [(1, 16), (8, 1), (1, 1)],
    ids=["single-step", "single-position", "single-cell"],
)
def test_single_step_or_position(tmp_path, n_steps, n_pos):
    hist = make_hist(n_steps=n_steps, n_pos=n_pos)
    image = render_heatmap(GLA, hist["steps"], hist["positions"], hist["profiles"])
    assert image.shape[1] >= MIN_W
    paths = save_history_plots(tmp_path, {GLA: hist}, layer_kinds=KINDS, tss=TSS)
    assert len(paths) == 6 and all(p.stat().st_size > 10_000 for p in paths)  # heatmap, profile, 4 overviews


def test_nan_steps_tolerated(tmp_path):
    hist = make_hist(n_steps=6)
    nan_row = [math.nan] * len(hist["positions"])
    for k in (0, 3):  # a missing layer at steps 0 and 75 (the monitor records NaN)
        hist["profiles"][k] = list(nan_row)
        hist["tolerance_profiles"][k] = list(nan_row)
        hist["utilization"][k] = math.nan
    del hist["tolerance_profiles"][4:]  # an old history with fewer tolerance profiles
    fig = heatmap_figure(GLA, hist["steps"], hist["positions"], hist["profiles"])
    norm = fig.axes[0].collections[0].norm
    assert math.isfinite(norm.vmin) and math.isfinite(norm.vmax) and norm.vmin < norm.vmax
    assert "NaN" in fig._suptitle.get_text()
    fig = profile_figure(GLA, hist)
    shown = [t.get_text() for t in fig.axes[0].get_legend().get_texts() if t.get_text().startswith("step")]
    assert "step 0" not in shown and "step 75" not in shown and shown[0] == "step 25"
    all_nan = dict(hist)
    all_nan["profiles"] = [list(nan_row) for _ in hist["steps"]]
    paths = save_history_plots(tmp_path, {GLA: hist, CONV: all_nan})
    assert len(paths) == 8  # 2 per layer, 4 overviews
    assert "no finite ESS" in all_text(profile_figure(CONV, all_nan))


# ---------------------------------------------------------------------------------------------- profiles
def test_profile_steps_colours_tolerance_and_legend_outside():
    hist = make_hist(n_steps=13)  # steps 0, 25, ..., 300
    fig = profile_figure(GLA, hist, label=layer_label(GLA, "GatedLinearAttention"), tss=TSS[GLA])
    ax = fig.axes[0]
    legend = ax.get_legend()
    texts = [t.get_text() for t in legend.get_texts()]
    steps_shown = [int(t.split()[1]) for t in texts if t.startswith("step ")]
    assert steps_shown[0] == 0 and steps_shown[-1] == 300
    assert 3 <= len(steps_shown) <= 5 and steps_shown == sorted(set(steps_shown))
    assert "tolerance-ESS" in texts and "entropy-ESS" in texts
    assert any(t.startswith("rank bound") for t in texts)
    assert "GatedLinearAttention" in fig._suptitle.get_text()
    solid = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(solid) == len(dashed) == len(steps_shown)
    colours = [tuple(ln.get_color()) for ln in solid]
    assert len(set(colours)) == len(colours)  # one colour per step (sequential colormap)
    # the legend covers no data: it lies entirely to the right of the axes
    ax_box, leg_box = bbox(ax, fig), bbox(legend, fig)
    assert leg_box.x0 >= ax_box.x1 - 1
    fw, fh = fig.get_size_inches() * fig.dpi
    assert leg_box.x1 <= fw + 1 and leg_box.y0 >= -1  # and inside the figure


# ---------------------------------------------------------------------------------------------- monitor
def test_monitor_keeps_layer_kinds():
    from ess_train.callbacks import ESSMonitor

    monitor = ESSMonitor()
    monitor.layer_kinds = {GLA: "GatedLinearAttention"}
    state = monitor.state_dict()
    assert state["layer_kinds"] == {GLA: "GatedLinearAttention"}
    resumed = ESSMonitor()
    resumed.layer_kinds = {CONV: "ShortConv"}  # found by setup before the checkpoint is loaded
    resumed.load_state_dict(state)
    assert resumed.layer_kinds == {GLA: "GatedLinearAttention", CONV: "ShortConv"}
    old = {k: v for k, v in state.items() if k != "layer_kinds"}
    older = ESSMonitor()
    older.load_state_dict(old)  # a checkpoint from before layer kinds were kept
    assert older.layer_kinds == {}


def test_monitor_records_layer_kinds_through_a_resume_and_logs_a_large_heatmap(tmp_path):
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ess_train.callbacks import ESSMonitor
    from tests.toy_modules import ToyDataModule, ToyLM, make_trainer

    pl.seed_everything(0)
    monitor = ESSMonitor(every_n_steps=2)
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = make_trainer(None, [monitor], max_steps=2, val_check_interval=2, logger=tb)
    trainer.fit(ToyLM(), ToyDataModule())
    assert monitor.layer_kinds == {"layers.0": "ToyRecurrence", "layers.1": "ToyRecurrence"}
    acc = EventAccumulator(tb.log_dir, size_guidance={"images": 0})
    acc.Reload()
    (event, *_) = acc.Images("ess/layers.0/heatmap")
    assert event.width >= MIN_W and event.height >= MIN_H
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)

    # an older checkpoint without layer kinds still loads; the kinds come from this run's setup
    state = torch.load(ckpt, weights_only=False)
    (key,) = [k for k in state["callbacks"] if k.startswith("ESSMonitor")]
    assert state["callbacks"][key]["layer_kinds"] == monitor.layer_kinds
    del state["callbacks"][key]["layer_kinds"]
    torch.save(state, tmp_path / "old.ckpt")
    for path in (ckpt, tmp_path / "old.ckpt"):
        resumed = ESSMonitor(every_n_steps=2)
        make_trainer(None, [resumed], max_steps=4).fit(ToyLM(), ToyDataModule(), ckpt_path=path)
        assert resumed.layer_kinds == monitor.layer_kinds
    paths = resumed.save_plots(tmp_path / "plots")
    fig = utilization_figure(resumed.history, {n: layer_label(n, k) for n, k in resumed.layer_kinds.items()})
    assert all("(ToyRecurrence)" in t.get_text() for t in fig.axes[0].get_legend().get_texts())
    assert {p.name for p in paths} >= {"layers.0_heatmap.png", "utilization.png"}


# ------------------------------------------------------------------------------------------ many layers
def test_a_24_layer_history_gets_one_overview_per_metric(tmp_path):
    """Issue 22: real models have 24-80 layers; one panel per layer does not scale. The overview's array is
    the history's values, layers x steps, and the number of files does not grow with the layers."""
    from ess_train.plots import layer_matrix

    history = {f"model.blocks.{i}.mixer": make_hist(seed=i, n_steps=6) for i in range(24)}
    kinds = {name: "GatedLinearAttention" for name in history}
    paths = save_history_plots(tmp_path, history, layer_kinds=kinds, collapse_threshold=0.05)
    assert sorted(p.name for p in paths) == sorted(
        ["utilization_layers.png", "entropy_layers.png", "utilization.png", "entropy.png"]
    )
    layers, steps, values = layer_matrix(history, "utilization")
    assert values.shape == (24, 6) and layers == list(history)
    first = history["model.blocks.0.mixer"]
    assert values[0].tolist() == pytest.approx(first["utilization"])
    from ess_train.plots import overview_figures

    figures = overview_figures(history, layer_kinds=kinds)
    heat = figures["utilization_layers"]
    assert heat.heatmap_values.shape == (24, 6)
    assert len(heat.axes[0].get_yticklabels()) == 24  # every layer named (thinned only beyond 40)
    lines = figures["utilization"]
    assert len(lines.axes[0].lines) == 24 and lines.axes[0].get_legend() is None  # a colour bar instead
    for p in paths:
        assert imread(p).std() > 0.05


def test_a_report_of_24_layers_gets_layers_by_positions_heatmaps(tmp_path):
    from ess_train import analyze
    from ess_train.analysis.report_figures import position_utilization, report_layers_figure
    from tests.hf_models import model, tokens

    report = analyze(model("llama", layers=24), tokens(batch=1, length=24), positions=6)
    assert len(report.layers) == 24
    fig = report_layers_figure(report, "utilization")
    layer = report.layers["model.layers.3.self_attn"]
    assert fig.heatmap_values.shape == (24, len(layer.positions))
    assert fig.heatmap_values[3].tolist() == pytest.approx(
        position_utilization(layer, 24).tolist(), nan_ok=True
    )
    assert {p.name for p in report.plot(tmp_path)} >= {"ess_utilization_layers.png", "ess_entropy_layers.png"}
