"""``ESSMonitor``: effective state-size of every supported layer, tracked during training."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from ess_train.callbacks._common import log_to_loggers, logger_step, short_traceback
from ess_train.measure import (
    ESSWarning,
    PositionSpec,
    fetch_probe,
    kv_pairs_for,
    layer_ess,
    probe_from_batch,
    probe_views,
    resolve_positions,
)
from ess_train.models.protocol import find_ess_layers

log = logging.getLogger(__name__)

__all__ = ["ESSMonitor"]

SUMMARY_KEYS = ("avg_entropy", "max_entropy", "avg_tolerance", "utilization", "total", "per_kv")


class ESSMonitor(Callback):
    """Log the effective state-size (ESS) of every protocol layer of any LightningModule.

    On a fixed probe batch (``probe_batch``, or the first ``probe_size`` rows of the validation data,
    falling back to the training data), every ``every_n_steps`` optimizer steps, at train start and at
    each validation end (not the sanity check), one ``no_grad`` eval-mode forward ``pl_module(inputs)``
    captures every layer's operator and the monitor logs, for each layer ``<layer>`` (its qualified name):

    - ``ess/<layer>/avg_entropy``: entropy-ESS averaged over the evaluated positions (with
      ``positions=None`` that includes position 0, whose ESS is 0), operators and probe rows;
    - ``ess/<layer>/max_entropy``: maximum over positions of the (row, operator)-mean entropy-ESS profile;
    - ``ess/<layer>/avg_tolerance``: tolerance-ESS, same average;
    - ``ess/<layer>/utilization``: ``sum_i ESS_i / sum_i b_i`` over the evaluated positions, with the
      per-position bound ``b_i = min(StateSize.per_operator, i, L - i)`` on ``rank(H_i)`` and ``ESS_i`` the
      (row, operator)-mean entropy-ESS (``ess_train.measure.state_utilization``; the same number
      ESSRegularizer's floor and ESSInitializer use). In ``[0, 1]``; 1 when every ``H_i`` is at its bound
      with a flat spectrum; position 0 (``b_0 = 0``) adds nothing. Not logged for a layer where it is
      undefined (``per_operator == 0``, e.g. ``window=1`` sliding-window attention, or ``L == 1``; warned
      once);
    - ``ess/<layer>/total``: ``multiplicity * sum over operators`` of avg entropy-ESS (mean over rows);
    - ``ess/<layer>/per_kv``: total / key-value pairs of the row (``num_kv_pairs``/``slice_kv_pairs``);

    plus ``ess/total`` (and ``ess/per_kv``) summed over layers, and ``tss/<layer>``, ``tss/total`` once at fit
    start. Metrics go straight to ``trainer.loggers`` at Lightning's logging step (``_common.logger_step``:
    where ``train/loss`` and ``val/acc`` of the same moment are logged, one less than the ``global_step`` that
    ``history`` and ``totals`` count; so CSV rows of ESS and loss join) (not through
    ``self.log``, so the cadence does not depend on ``log_every_n_steps``) and into
    ``trainer.callback_metrics``. Only global rank 0 computes and logs (the forward calls the bare
    LightningModule, never the DDP wrapper, so other ranks are not involved).

    A layer whose operator holds NaN/inf is *missing* for that step: its metrics are not logged (its
    history holds NaN), ``ess/missing_layers`` is logged, and a warning is emitted once per layer.
    Any other error is reported as a warning and training continues, unless ``strict=True``.

    Args:
        every_n_steps: measure when ``global_step % every_n_steps == 0``.
        probe_batch: a batch (Tensor, dict or tuple) to probe with; default from the data.
        probe_size: number of probe rows.
        positions: ``None`` (all), an ``int`` count (evenly spaced in ``[1, L-1]``) or a list of positions.
        include, exclude: ``fnmatch`` patterns on layer names (see ``find_ess_layers``).
        collapse_threshold, saturation_threshold: warn once per layer when utilization goes below/above.
        strict: re-raise errors instead of warning.
        log_heatmap: at validation end, log a position x step heatmap per layer (W&B image, TensorBoard
            image) and, at each measurement, the ESS-by-position profile (W&B line plot).
        input_key: key of the model input in dict batches.
        tolerance_rtol, tolerance_atol: thresholds passed to ``tolerance_ess``.
        forward_fn: ``forward_fn(pl_module, inputs)`` replacing ``pl_module(inputs)`` for other signatures.
        max_operators: evaluate at most this many evenly spaced operators (heads/channels) per layer
            (``None``: all). A cost knob for layers with many channels (Mamba, S4D, Hyena): averages are
            then over the subset and ``total`` is scaled up to all operators.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        probe_batch: Any = None,
        probe_size: int = 8,
        positions: PositionSpec = None,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        collapse_threshold: float = 0.05,
        saturation_threshold: float = 0.95,
        strict: bool = False,
        log_heatmap: bool = True,
        input_key: str = "inputs",
        tolerance_rtol: float | None = None,
        tolerance_atol: float = 0.0,
        forward_fn: Callable[[pl.LightningModule, Tensor], Any] | None = None,
        max_operators: int | None = None,
    ) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if probe_size < 1:
            raise ValueError(f"probe_size must be >= 1, got {probe_size}")
        if not 0 <= collapse_threshold <= saturation_threshold:
            raise ValueError(
                f"need 0 <= collapse_threshold <= saturation_threshold, got {collapse_threshold}, "
                f"{saturation_threshold}"
            )
        self.every_n_steps = every_n_steps
        self.probe_size = probe_size
        self.positions = positions
        self.include = list(include) if include else None
        self.exclude = list(exclude) if exclude else None
        self.collapse_threshold = collapse_threshold
        self.saturation_threshold = saturation_threshold
        self.strict = strict
        self.log_heatmap = log_heatmap
        self.input_key = input_key
        self.tolerance_rtol = tolerance_rtol
        self.tolerance_atol = tolerance_atol
        self.forward_fn = forward_fn
        self.max_operators = max_operators

        self.layers: dict[str, nn.Module] = {}
        #: class name of each layer found (``"GatedLinearAttention"``), for plot labels; kept in checkpoints.
        self.layer_kinds: dict[str, str] = {}
        #: per layer: ``steps``, ``positions``, ``profiles`` and ``tolerance_profiles`` (entropy- and
        #: tolerance-ESS by position, one list per step) and one list per summary key.
        self.history: dict[str, dict[str, list]] = {}
        #: model level: ``steps``, ``total``, ``per_kv``.
        self.totals: dict[str, list] = {"steps": [], "total": [], "per_kv": []}
        #: theoretical state size per layer: ``total``, ``per_operator``, ``multiplicity``, ``seq_len``.
        self.tss: dict[str, dict[str, int]] = {}
        self.flags: dict[str, list[str]] = {}
        self._probe: tuple[Tensor, Tensor | None] | None = None
        if probe_batch is not None:
            self._probe = probe_from_batch(probe_batch, probe_size, input_key)
        self._warned: set[str] = set()
        self._disabled = False
        self._tss_logged = False

    # ------------------------------------------------------------------------------------------ lightning
    @property
    def state_key(self) -> str:
        positions = self.positions
        if positions is not None and not isinstance(positions, int):
            positions = sorted({int(p) for p in positions})
        return self._generate_state_key(
            every_n_steps=self.every_n_steps,
            positions=positions,
            include=self.include,
            exclude=self.exclude,
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.layers = find_ess_layers(pl_module, include=self.include, exclude=self.exclude)
        self.layer_kinds.update({name: type(layer).__name__ for name, layer in self.layers.items()})
        self._disabled = not self.layers
        if self._disabled:
            self._warn_once(
                "no-layers",
                f"ESSMonitor: {type(pl_module).__name__} has no layer implementing the ESS protocol "
                f"(operator() and state_size()) matching include={self.include} exclude={self.exclude}; "
                "the monitor stands aside.",
            )
        sharded = sharding_strategy(trainer)
        if sharded is not None and not self._disabled:
            self._disabled = True
            self._warn_once(
                "sharded",
                f"ESSMonitor: the {sharded} strategy shards the parameters, and the monitor's probe forward "
                "runs on rank 0 alone (it would wait forever for the other ranks' all-gathers); the "
                "monitor stands aside. Measure a checkpoint or a DDP run instead (ESSRegularizer works "
                "on each rank's own batch and is not affected).",
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._disabled or not trainer.is_global_zero:
            return
        self._guarded(trainer, lambda: self._log_tss(trainer))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0:
            self.measure(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0:
            self.measure(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.measure(trainer, pl_module)
        if self.log_heatmap and not self._disabled and trainer.is_global_zero:
            self._guarded(trainer, lambda: self._log_heatmaps(trainer))

    def state_dict(self) -> dict[str, Any]:
        probe = None
        if self._probe is not None:
            probe = {
                "inputs": self._probe[0].cpu(),
                "slice_id": None if self._probe[1] is None else self._probe[1].cpu(),
            }
        return {
            "version": 1,
            "history": self.history,
            "totals": self.totals,
            "tss": self.tss,
            "flags": self.flags,
            "probe": probe,
            "warned": sorted(self._warned),
            "layer_kinds": dict(self.layer_kinds),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = state_dict.get("history", {})
        self.totals = state_dict.get("totals", {"steps": [], "total": [], "per_kv": []})
        self.tss = state_dict.get("tss", {})
        self.flags = state_dict.get("flags", {})
        self._warned |= set(state_dict.get("warned", []))
        self._tss_logged = bool(self.tss)
        # (older checkpoints have no layer kinds; the ones found by this run's setup win)
        self.layer_kinds = {**state_dict.get("layer_kinds", {}), **self.layer_kinds}
        probe = state_dict.get("probe")
        if probe is not None:
            self._probe = (probe["inputs"], probe.get("slice_id"))

    # ------------------------------------------------------------------------------------------- public
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float] | None:
        """Measure and log now (rank 0; once per global step). Returns the logged metrics."""
        if self._disabled or not trainer.is_global_zero:
            return None
        step = trainer.global_step
        if self.totals["steps"] and self.totals["steps"][-1] == step:
            return None
        return self._guarded(trainer, lambda: self._measure(trainer, pl_module, step))

    def summary(self) -> dict[str, Any]:
        """Latest numbers per layer (with TSS, first utilization and warnings raised) and model totals."""
        out: dict[str, Any] = {"step": None, "total": None, "per_kv": None, "layers": {}}
        if self.totals["steps"]:
            out["step"] = self.totals["steps"][-1]
            out["total"] = self.totals["total"][-1]
            out["per_kv"] = self.totals["per_kv"][-1]
        for name, hist in self.history.items():
            if not hist["steps"]:
                continue
            layer: dict[str, Any] = {k: hist[k][-1] for k in SUMMARY_KEYS if k in hist}
            if not math.isfinite(layer.get("per_kv", 0.0)) and all(
                not math.isfinite(v) for v in hist["per_kv"]
            ):
                layer.pop("per_kv")  # not a recall task
            layer["initial_utilization"] = hist["utilization"][0]
            if name in self.tss:
                layer["tss"] = self.tss[name]["total"]
                layer["tss_per_operator"] = self.tss[name]["per_operator"]
            layer["flags"] = list(self.flags.get(name, []))
            if name in self.layer_kinds:
                layer["mixer"] = self.layer_kinds[name]
            out["layers"][name] = layer
        return out

    def save_plots(self, directory: str | Path) -> list[Path]:
        """Write, per layer, ``<layer>_heatmap.png`` (entropy-ESS by position and step) and
        ``<layer>_profile.png`` (first, a few intermediate and last ESS-by-position profiles), plus
        ``utilization.png`` (all layers over steps, with the collapse/saturation thresholds); see
        ``ess_train.plots``. Layers are labelled with their class, e.g. ``model.blocks.1.mixer
        (GatedLinearAttention)``."""
        from ess_train.plots import save_history_plots

        return save_history_plots(
            directory,
            self.history,
            layer_kinds=self.layer_kinds,
            tss=self.tss,
            collapse_threshold=self.collapse_threshold,
            saturation_threshold=self.saturation_threshold,
        )

    # ---------------------------------------------------------------------------------------- internals
    def _guarded(self, trainer: pl.Trainer, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:
            if self.strict:
                raise
            key = f"error:{type(exc).__name__}:{exc}"
            self._warn_once(
                key,
                f"ESSMonitor failed at step {trainer.global_step} and is skipping this measurement "
                f"(training continues; pass strict=True to raise): {short_traceback(exc)}",
            )
            return None

    def _warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        rank_zero_warn(message, category=ESSWarning)

    def _get_probe(self, trainer: pl.Trainer) -> tuple[Tensor, Tensor | None] | None:
        if self._probe is None:
            self._probe = fetch_probe(trainer, self.probe_size, self.input_key)
        return self._probe

    def _log_tss(self, trainer: pl.Trainer) -> None:
        if self._tss_logged:
            return
        probe = self._get_probe(trainer)
        if probe is None:
            return
        seq_len = int(probe[0].shape[1])
        metrics: dict[str, float] = {}
        for name, layer in self.layers.items():
            size = layer.state_size(seq_len)
            self.tss[name] = {
                "total": int(size.total),
                "per_operator": int(size.per_operator),
                "multiplicity": int(size.multiplicity),
                "seq_len": seq_len,
            }
            metrics[f"tss/{name}"] = float(size.total)
        metrics["tss/total"] = float(sum(v["total"] for v in self.tss.values()))
        log_to_loggers(trainer, metrics)
        self._tss_logged = True

    def _measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> dict[str, float] | None:
        probe = self._get_probe(trainer)
        if probe is None:
            self._warn_once(
                "no-probe",
                "ESSMonitor: no probe batch (pass probe_batch= or give the trainer validation/training "
                "data); skipping.",
            )
            return None
        self._log_tss(trainer)
        inputs = probe[0].to(pl_module.device)
        kv = kv_pairs_for(getattr(trainer, "datamodule", None), probe[1])
        views = probe_views(
            pl_module, inputs, self.layers, self.forward_fn, trainer.precision_plugin.forward_context()
        )

        metrics: dict[str, float] = {}
        totals: list[float] = []
        per_kvs: list[float] = []
        missing = 0
        for name, layer in self.layers.items():
            view = views.get(name)
            hist = self.history.setdefault(
                name, {"steps": [], "positions": [], "profiles": [], "tolerance_profiles": []}
            )
            if view is None:
                missing += 1
                self._warn_once(
                    f"not-called:{name}", f"ESSMonitor: layer {name!r} was not called by the forward."
                )
                self._record(hist, step, None)
                continue
            seq_len = view.op.seq_len
            positions = resolve_positions(self.positions, seq_len)
            size = layer.state_size(seq_len)
            try:
                stats = layer_ess(
                    view,
                    size,
                    positions,
                    rtol=self.tolerance_rtol,
                    atol=self.tolerance_atol,
                    kv_pairs=kv,
                    max_operators=self.max_operators,
                )
            except ValueError as exc:  # non-finite operator (check_finite)
                missing += 1
                self._warn_once(
                    f"nonfinite:{name}",
                    f"ESSMonitor: ESS of layer {name!r} is missing at step {step}: {exc}. Its metrics "
                    "are not logged while this lasts (history holds NaN).",
                )
                self._record(hist, step, None)
                continue
            self._record(hist, step, stats)
            for key, value in stats.metrics().items():
                if key == "utilization" and not math.isfinite(value):
                    continue
                metrics[f"ess/{name}/{key}"] = value
            totals.append(stats.total)
            if stats.per_kv is not None:
                per_kvs.append(stats.per_kv)
            if math.isfinite(stats.utilization):
                self._check_thresholds(name, stats.utilization, step)
            else:
                self._warn_once(
                    f"undefined-utilization:{name}",
                    f"ESSMonitor: layer {name!r} has no state to fill at seq_len={seq_len} "
                    f"(per_operator={size.per_operator}): utilization is undefined and not logged.",
                )

        total = float(sum(totals)) if totals else math.nan
        per_kv = float(sum(per_kvs)) if per_kvs else math.nan
        self.totals["steps"].append(step)
        self.totals["total"].append(total)
        self.totals["per_kv"].append(per_kv)
        if totals:
            metrics["ess/total"] = total
        if per_kvs:
            metrics["ess/per_kv"] = per_kv
        if missing:
            metrics["ess/missing_layers"] = float(missing)
        log_to_loggers(trainer, metrics)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if self.log_heatmap:
            self._log_profiles(trainer, step)
        return metrics

    def _record(self, hist: dict[str, list], step: int, stats: Any) -> None:
        hist["steps"].append(step)
        # (a history from a checkpoint of an older version has no tolerance profiles: NaN for those steps)
        tol_hist = hist.setdefault("tolerance_profiles", [])
        tol_hist.extend([[math.nan] * len(hist["positions"])] * (len(hist["profiles"]) - len(tol_hist)))
        if stats is None:
            width = len(hist["positions"]) or 1
            hist["profiles"].append([math.nan] * width)
            tol_hist.append([math.nan] * width)
            for key in SUMMARY_KEYS:
                hist.setdefault(key, []).append(math.nan)
            return
        if hist["positions"] != stats.positions:  # first record, or the probe length changed
            hist["positions"] = list(stats.positions)
            hist["profiles"] = [[math.nan] * len(stats.positions) for _ in hist["profiles"]]
            hist["tolerance_profiles"] = tol_hist = [[math.nan] * len(stats.positions) for _ in tol_hist]
        hist["profiles"].append(stats.profile)
        tol = stats.tolerance_profile
        tol_hist.append(list(tol) if tol is not None else [math.nan] * len(stats.positions))
        values = stats.metrics()
        for key in SUMMARY_KEYS:
            hist.setdefault(key, []).append(values.get(key, math.nan))

    def _check_thresholds(self, name: str, utilization: float, step: int) -> None:
        flags = self.flags.setdefault(name, [])
        if utilization < self.collapse_threshold and "collapse" not in flags:
            flags.append("collapse")
            self._warn_once(
                f"collapse:{name}",
                f"ESSMonitor: state collapse in {name!r} at step {step}: utilization {utilization:.3g} < "
                f"{self.collapse_threshold} (ESS uses little of the layer's state).",
            )
        if utilization > self.saturation_threshold and "saturation" not in flags:
            flags.append("saturation")
            self._warn_once(
                f"saturation:{name}",
                f"ESSMonitor: state saturation in {name!r} at step {step}: utilization {utilization:.3g} > "
                f"{self.saturation_threshold} (the layer's state is full).",
            )

    # ------------------------------------------------------------------------------------------ media
    def _media_loggers(self, trainer: pl.Trainer) -> tuple[list[WandbLogger], list[TensorBoardLogger]]:
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        tb_loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        others = [type(lg).__name__ for lg in trainer.loggers if not isinstance(lg, WandbLogger)]
        if others and "media" not in self._warned:
            # information, not a warning: the user chose these loggers, and save_plots() draws the same
            self._warned.add("media")
            log.info(
                "ESSMonitor: ESS-by-position plots and heatmaps are W&B/TensorBoard media; "
                f"{', '.join(others)} "
                "gets the scalars (the profiles are in ESSMonitor.history, checkpoints and save_plots())."
            )
        return wandb_loggers, tb_loggers

    def _log_profiles(self, trainer: pl.Trainer, step: int) -> None:
        wandb_loggers, _ = self._media_loggers(trainer)
        if not wandb_loggers:
            return
        import wandb

        payload = {}
        for name, hist in self.history.items():
            if not hist["steps"] or hist["steps"][-1] != step or not hist["positions"]:
                continue
            profile = hist["profiles"][-1]
            if not all(math.isfinite(v) for v in profile):
                continue
            tol = (hist.get("tolerance_profiles") or [[]])[-1]
            ys, keys = [profile], ["entropy-ESS"]
            if len(tol) == len(profile) and all(math.isfinite(v) for v in tol):
                ys.append(tol)
                keys.append("tolerance-ESS")
            payload[f"ess/{name}/profile"] = wandb.plot.line_series(
                xs=hist["positions"],
                ys=ys,
                keys=keys,
                title=f"{name}: ESS by position (step {step})",
                xname="position",
            )
        for logger in wandb_loggers:
            logger.log_metrics(payload, step=logger_step(trainer))

    def _log_heatmaps(self, trainer: pl.Trainer) -> None:
        wandb_loggers, tb_loggers = self._media_loggers(trainer)
        if not (wandb_loggers or tb_loggers):
            return
        from ess_train.plots import layer_label

        step = trainer.global_step
        for name, hist in self.history.items():
            if not hist["steps"] or not hist["positions"]:
                continue
            image = render_heatmap(
                name,
                hist["steps"],
                hist["positions"],
                hist["profiles"],
                label=layer_label(name, self.layer_kinds.get(name)),
                tss=self.tss.get(name),
            )
            for logger in tb_loggers:
                logger.experiment.add_image(
                    f"ess/{name}/heatmap", image, logger_step(trainer), dataformats="HWC"
                )
            if wandb_loggers:
                import wandb

                for logger in wandb_loggers:
                    logger.log_metrics({f"ess/{name}/heatmap": wandb.Image(image)}, step=logger_step(trainer))
        log.debug(f"ESSMonitor: logged ESS heatmaps for {len(self.history)} layer(s) at step {step}")


def sharding_strategy(trainer: pl.Trainer) -> str | None:
    """Name of the trainer's strategy when it shards parameters across ranks (FSDP, ModelParallel,
    DeepSpeed ZeRO-3), where a forward on one rank alone would hang; None otherwise."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
        return type(strategy).__name__
    if isinstance(strategy, DeepSpeedStrategy) and getattr(strategy, "zero_stage_3", False):
        return "DeepSpeedStrategy (ZeRO stage 3)"
    return None


def render_heatmap(
    name: str, steps: list[int], positions: list[int], profiles: list[list[float]], **kwargs: Any
) -> Any:
    """An RGB ``uint8`` image ``[H, W, 3]``: entropy-ESS by position (y) and training step (x); see
    ``ess_train.plots.render_heatmap`` (kept here for existing imports)."""
    from ess_train.plots import render_heatmap as _render

    return _render(name, steps, positions, profiles, **kwargs)
