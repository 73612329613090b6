"""ESSMonitor's media on W&B and TensorBoard: ESS-by-position line plots and position x step heatmaps; and
the full record of every measurement, one JSON line each, in the run's checkpoint directory.

Drawn from an :class:`ess_train.measure.ESSHistory` (the figures themselves are ``ess_train.plots``); other
loggers get the scalars only (one info line says so). PNG files are ``ess_train.plots.save_history_plots``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from ess_train.callbacks.lightning_glue import logger_step
from ess_train.measure.history import ESSHistory
from ess_train.measure.records import append_record, measurement_record

log = logging.getLogger(__name__)

__all__ = [
    "media_loggers",
    "log_profiles",
    "log_heatmaps",
    "log_overviews",
    "render_heatmap",
    "record_path",
    "stream_record",
]


def render_heatmap(
    name: str, steps: list[int], positions: list[int], profiles: list[list[float]], **kwargs: Any
) -> Any:
    """An RGB ``uint8`` image ``[H, W, 3]``: entropy-ESS by position (y) and training step (x); see
    ``ess_train.plots.render_heatmap`` (imported when first drawn: matplotlib stays out of the import)."""
    from ess_train.plots import render_heatmap as _render

    return _render(name, steps, positions, profiles, **kwargs)


def media_loggers(trainer: pl.Trainer, told: set[str]) -> tuple[list[WandbLogger], list[TensorBoardLogger]]:
    """The trainer's W&B and TensorBoard loggers. Says once (``"media"`` added to ``told``), at info level,
    that the other loggers get the scalars only."""
    wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    tb_loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    others = [type(lg).__name__ for lg in trainer.loggers if not isinstance(lg, WandbLogger)]
    if others and "media" not in told:
        # information, not a warning: the user chose these loggers, and save_plots() draws the same
        told.add("media")
        log.info(
            "ESSMonitor: ESS-by-position plots and heatmaps are W&B/TensorBoard media; "
            f"{', '.join(others)} "
            "gets the scalars (the profiles are in ESSMonitor.history, checkpoints and save_plots())."
        )
    return wandb_loggers, tb_loggers


def _many_layers(history: ESSHistory) -> bool:
    """More layers than ``ess_train.plots.PER_LAYER_UP_TO``: one overview per metric, not a panel per
    layer."""
    from ess_train.plots import PER_LAYER_UP_TO

    return len(history.layers) > PER_LAYER_UP_TO


def log_profiles(trainer: pl.Trainer, history: ESSHistory, step: int, told: set[str]) -> None:
    """W&B line plot of the entropy- (and tolerance-) ESS profile of every layer measured at ``step`` (for
    models with few layers; deeper ones get the overviews of :func:`log_heatmaps`)."""
    wandb_loggers, _ = media_loggers(trainer, told)
    if not wandb_loggers or _many_layers(history):
        return
    import wandb

    payload = {}
    for name, hist in history.layers.items():
        if not hist.profile_steps or hist.profile_steps[-1] != step or not hist.positions:
            continue
        profile = hist.profiles[-1]
        if not all(math.isfinite(v) for v in profile):
            continue
        tol = hist.tolerance_profiles[-1] if hist.tolerance_profiles else []
        ys, keys = [profile], ["entropy-ESS"]
        if len(tol) == len(profile) and all(math.isfinite(v) for v in tol):
            ys.append(tol)
            keys.append("tolerance-ESS")
        payload[f"ess/{name}/profile"] = wandb.plot.line_series(
            xs=hist.positions,
            ys=ys,
            keys=keys,
            title=f"{name}: ESS by position (step {step})",
            xname="position",
        )
    for logger in wandb_loggers:
        logger.log_metrics(payload, step=logger_step(trainer))


def log_heatmaps(trainer: pl.Trainer, history: ESSHistory, told: set[str]) -> None:
    """Position x step heatmap of every layer, as a TensorBoard image and a W&B image; beyond
    ``PER_LAYER_UP_TO`` layers, one overview per metric instead (:func:`log_overviews`)."""
    wandb_loggers, tb_loggers = media_loggers(trainer, told)
    if not (wandb_loggers or tb_loggers):
        return
    if _many_layers(history):
        log_overviews(trainer, history, wandb_loggers, tb_loggers)
        return
    from ess_train.plots import layer_label

    for name, hist in history.layers.items():
        if not hist.steps or not hist.positions:
            continue
        image = render_heatmap(
            name,
            hist.profile_steps,
            hist.positions,
            hist.profiles,
            label=layer_label(name, history.layer_kinds.get(name)),
            tss=history.tss.get(name),
        )
        for logger in tb_loggers:
            logger.experiment.add_image(f"ess/{name}/heatmap", image, logger_step(trainer), dataformats="HWC")
        if wandb_loggers:
            import wandb

            for logger in wandb_loggers:
                logger.log_metrics({f"ess/{name}/heatmap": wandb.Image(image)}, step=logger_step(trainer))
    log.debug(
        f"ESSMonitor: logged ESS heatmaps for {len(history.layers)} layer(s) at step {trainer.global_step}"
    )


def log_overviews(
    trainer: pl.Trainer,
    history: ESSHistory,
    wandb_loggers: list[WandbLogger],
    tb_loggers: list[TensorBoardLogger],
) -> dict[str, Any]:
    """One image per metric for all layers (``ess/overview/<metric>_layers``: layers x steps heatmaps of
    utilization and entropy-ESS; ``ess/overview/<metric>``: every layer's line), whatever the depth: the
    number of media keys does not grow with the layers. Returns the images by key."""
    from ess_train.plots import figure_to_rgb, overview_figures

    data = {name: dict(hist) for name, hist in history.layers.items()}
    figures = overview_figures(data, layer_kinds=history.layer_kinds)
    images = {f"ess/overview/{stem}": figure_to_rgb(fig) for stem, fig in figures.items()}
    step = logger_step(trainer)
    for logger in tb_loggers:
        for key, image in images.items():
            logger.experiment.add_image(key, image, step, dataformats="HWC")
    if wandb_loggers:
        import wandb

        for logger in wandb_loggers:
            logger.log_metrics({key: wandb.Image(image) for key, image in images.items()}, step=step)
    return images


def record_path(trainer: pl.Trainer, history_file: str | None) -> Path | None:
    """Where the full record goes: ``history_file`` in the checkpoint directory (``None`` without
    checkpointing, or without ``history_file``), or ``history_file`` itself when it is absolute."""
    if history_file is None:
        return None
    path = Path(history_file)
    if path.is_absolute():
        return path
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
    return Path(dirpath) / path if dirpath else None


def stream_record(
    trainer: pl.Trainer, history: ESSHistory, step: int, history_file: str | None, wrote: bool
) -> bool:
    """Append the measurement at ``step`` to :func:`record_path` (``wrote``: this process wrote before; its
    first write drops what a resumed run's checkpoint does not have). True when written."""
    path = record_path(trainer, history_file)
    if path is None:
        return False
    append_record(path, measurement_record(history, step), first=not wrote)
    return True
