"""``ESSMonitor``: effective state-size of every supported layer, tracked during training."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from ess_train.callbacks.lightning_glue import (
    check_distributed,
    log_to_loggers,
    measure_mode,
    sharding_strategy,
)
from ess_train.callbacks.media import log_heatmaps, log_profiles, stream_record
from ess_train.callbacks.monitor_record import MonitorRecord
from ess_train.checks import (
    check_bool,
    check_callable,
    check_float,
    check_non_negative_float,
    check_patterns,
    check_position_spec,
    check_positive_int,
)
from ess_train.measure import (
    ESSHistory,
    LayerESS,
    PositionSpec,
    fetch_probe,
    kv_pairs_for,
    probe_from_batch,
)
from ess_train.measure.cost import MeasurementPlan, check_limits
from ess_train.measure.distributed import Ranks, describe_error
from ess_train.measure.history import MAX_PROFILES
from ess_train.measure.layers import find_layers
from ess_train.measure.loop import LayerResult, Measurement, MeasurementSettings, measure_model
from ess_train.measure.probe import Probe

log = logging.getLogger(__name__)

__all__ = ["ESSMonitor"]

#: warning of each threshold flag: comparison, threshold attribute, meaning
_FLAGS = {
    "collapse": ("<", "collapse_threshold", "ESS uses little of the layer's state"),
    "saturation": (">", "saturation_threshold", "the layer's state is full"),
}


class ESSMonitor(MonitorRecord):
    """Log the effective state-size (ESS) of every protocol layer of any LightningModule.

    On a fixed probe batch (``probe_batch``, or the first ``probe_size`` rows of the validation data, else
    the training data), at train start, every ``every_n_steps`` optimizer steps and at each validation end
    (not the sanity check), one ``no_grad`` eval-mode forward ``pl_module(inputs)`` captures every layer's
    operator, and the monitor logs ``ess/<layer>/<key>`` for each key of ``LayerESS.metrics()``
    (``ess_train.measure.layer_ess``, whose docstring defines them; conventions in docs/DESIGN.md):
    ``avg_entropy``, ``max_entropy``, ``avg_tolerance``, ``utilization`` (not logged where undefined:
    ``per_operator == 0`` or ``L == 1``, warned once), ``total`` and ``per_kv``; plus ``ess/total`` (and
    ``ess/per_kv``) summed over layers, and ``tss/<layer>``, ``tss/total`` once at fit start (at the first
    measurement under ``"split"``). Metrics go straight to ``trainer.loggers`` (not ``self.log``: the
    cadence does not depend on ``log_every_n_steps``) at Lightning's logging step
    (``lightning_glue.logger_step``, where ``train/loss`` and ``val/acc`` of the same moment go; one less
    than the ``global_step`` the history counts), and into ``trainer.callback_metrics``.

    Multi-process runs (``distributed``): under DDP (``"rank0"``, the default there) global rank 0 alone
    measures and logs (the forward calls the bare LightningModule, never the DDP wrapper). Under strategies
    that shard the parameters (FSDP, ModelParallel, DeepSpeed ZeRO-3: ``"split"``, the default there) the
    probe forward runs on every rank, on rank 0's probe batch (each rank all-gathers the others' shards),
    and the layers' ESS is split across ranks by the plan's cost estimate
    (``ess_train.measure.distributed``); the results are exchanged, so every rank records the full
    measurement (the same state, which Lightning checkpoints from rank 0) and rank 0 logs it, as one process
    would have; ``measured_here`` counts the layers this process measured. A rank whose part fails still
    joins the exchange with an error marker: every rank then skips that measurement (warned) or, with
    ``strict``, raises. In that mode ``measure()`` is a collective: every rank must call it.

    What is measured is kept in ``ess_history`` (:class:`ess_train.measure.ESSHistory`, the checkpointed
    state, bounded: every per-step scalar, but at most ``max_profiles`` log-spaced ESS-by-position profiles
    per layer); ``history``, ``totals``, ``tss``, ``flags`` and ``layer_kinds`` read it as plain data
    (``monitor.history[layer]["steps"]``). The full record, one JSON line per measurement, goes to
    ``history_file`` (``ess_history.jsonl`` next to the checkpoints; read it with
    ``ess_train.measure.records.read_records``).
    Media go through ``callbacks/media.py``, PNG files through ``ess_train.plots``.

    Cost: with ``positions="auto"`` (default) the first measurement fits, per layer, how many positions
    (evenly spaced, at most ``max_positions``), probe rows and operators are measured into ``budget`` (a
    fraction of the training between two measurements), by a deterministic cost model
    (``ess_train.measure.cost``: SVD work from the operators' shapes against the training step's counted
    FLOPs): a dense (softmax attention) layer gets far fewer positions than a recurrent one. What it chose
    is logged once, kept in the state (a resumed run measures the same) and in ``summary()["measurement"]``
    with the measured time fraction.

    A layer whose operator holds NaN/inf is *missing* for that step: its metrics are not logged (its
    history holds NaN), ``ess/missing_layers`` is logged, and a warning is emitted once per layer.
    Any other error is reported as a warning and training continues, unless ``strict=True``.

    Args:
        every_n_steps: measure when ``global_step % every_n_steps == 0``.
        probe_batch: a batch (Tensor, dict or tuple) to probe with; default from the data.
        probe_size: number of probe rows.
        positions: ``"auto"`` (fitted to ``budget``), ``None`` or ``"all"`` (all), an ``int`` count (evenly
            spaced in ``[1, L-1]``) or a list of positions; an explicit value wins over the budget.
        budget: the share of training time (between two measurements) a measurement may take, with
            ``positions="auto"``; ``None``: no budget (all positions).
        max_positions, min_positions: bounds of the positions ``"auto"`` chooses per layer (fewer than
            ``min_positions`` only when even one probe row and operator do not fit).
        max_rows: measure at most this many probe rows per layer (``None``: as the budget allows).
        max_profiles: ESS-by-position profiles kept per layer in the history (thinned, log-spaced).
        history_file: the full record (JSON lines), relative to the checkpoint directory (not written
            without checkpointing), or an absolute path; ``None``: not written.
        include, exclude: ``fnmatch`` patterns on layer names (see ``ess_train.measure.find_layers``).
        collapse_threshold, saturation_threshold: warn once per layer when utilization goes below/above.
        strict: re-raise errors instead of warning.
        log_heatmap: log a position x step heatmap per layer at validation end (W&B, TensorBoard image)
            and the ESS-by-position profile at each measurement (W&B line plot): ``callbacks/media.py``.
        input_key: key of the model input in dict batches.
        tolerance_rtol, tolerance_atol: thresholds passed to ``tolerance_ess``.
        forward_fn: ``forward_fn(pl_module, inputs)`` replacing ``pl_module(inputs)`` for other signatures.
        max_operators: evaluate at most this many evenly spaced operators (heads/channels) per layer
            (``None``: all). A cost knob for layers with many channels (Mamba, S4D, Hyena): averages are
            then over the subset and ``total`` is scaled up to all operators.
        distributed: ``"auto"`` (``"split"`` where parameters are sharded, else ``"rank0"``), ``"rank0"``
            (rank 0 alone; the monitor stands aside under sharding, where that would hang) or ``"split"``
            (every rank forwards, layers split across ranks; also under DDP, to share the ESS work).
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        probe_batch: Any = None,
        probe_size: int = 8,
        positions: PositionSpec | str = "auto",
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
        budget: float | None = 0.05,
        max_positions: int = 256,
        min_positions: int = 16,
        max_rows: int | None = None,
        max_profiles: int = MAX_PROFILES,
        history_file: str | None = "ess_history.jsonl",
        distributed: str = "auto",
    ) -> None:
        super().__init__()
        self.distributed = check_distributed(distributed)
        positions = check_limits(
            check_position_spec("positions", positions, auto=True),
            budget,
            min_positions,
            max_positions,
            max_rows,
            max_operators,
            max_profiles,
        )
        every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        probe_size = check_positive_int("probe_size", probe_size)
        check_float("collapse_threshold", collapse_threshold, 0.0, 1.0)
        check_float("saturation_threshold", saturation_threshold, 0.0, 1.0)
        if not collapse_threshold <= saturation_threshold:
            raise ValueError(
                f"need 0 <= collapse_threshold <= saturation_threshold, got {collapse_threshold}, "
                f"{saturation_threshold}"
            )
        if tolerance_rtol is not None:
            check_float("tolerance_rtol", tolerance_rtol, 0.0, 1.0, low_open=True, high_open=True)
        check_non_negative_float("tolerance_atol", tolerance_atol)
        if budget is not None:
            check_float("budget", budget, 0.0, 1.0, low_open=True)
        check_bool("strict", strict)
        check_bool("log_heatmap", log_heatmap)
        if not isinstance(input_key, str):
            raise ValueError(f"input_key must be a str (the batch key of the token ids), got {input_key!r}")
        check_callable("forward_fn", forward_fn)
        if history_file is not None and not isinstance(history_file, (str, os.PathLike)):
            raise ValueError(f"history_file must be a file name (or None), got {history_file!r}")
        self.every_n_steps = every_n_steps
        self.probe_size = probe_size
        self.positions = positions
        self.include = check_patterns("include", include)
        self.exclude = check_patterns("exclude", exclude)
        self.collapse_threshold = collapse_threshold
        self.saturation_threshold = saturation_threshold
        self.strict = strict
        self.log_heatmap = log_heatmap
        self.input_key = input_key
        self.tolerance_rtol = tolerance_rtol
        self.tolerance_atol = tolerance_atol
        self.forward_fn = forward_fn
        self.max_operators = max_operators
        self.budget = budget
        self.max_positions = max_positions
        self.min_positions = min_positions
        self.max_rows = max_rows
        self.max_profiles = max_profiles
        self.history_file = history_file

        self.layers: dict[str, nn.Module] = {}
        #: everything measured (checkpointed); ``history`` etc. below read it.
        self.ess_history = ESSHistory(max_profiles=max_profiles)
        #: what is measured per layer (chosen at the first measurement; checkpointed).
        self.plan: MeasurementPlan | None = None
        self._seconds = {"measure": 0.0, "train": 0.0, "measurements": 0}
        self._batch_t0: float | None = None
        self._wrote_file = False
        self._probe: Probe | None = None
        if probe_batch is not None:
            self._probe = probe_from_batch(probe_batch, probe_size, input_key)
        self._warned: set[str] = set()
        self._disabled = False
        self._split = False  # measure on every rank, layers split ("split" mode; resolved in setup)
        self._probe_shared = False  # rank 0's probe broadcast to every rank (once per process)
        #: per layer, how many measurements of it this process computed (under "split": its share only).
        self.measured_here: dict[str, int] = {}

    @property
    def state_key(self) -> str:
        positions = None if self.positions == "auto" else self.positions  # (the key of earlier versions)
        if positions is not None and not isinstance(positions, int):
            positions = sorted({int(p) for p in positions})
        return self._generate_state_key(
            every_n_steps=self.every_n_steps,
            positions=positions,
            include=self.include,
            exclude=self.exclude,
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.layers = find_layers(pl_module, include=self.include, exclude=self.exclude)
        self.layer_kinds.update({name: type(layer).__name__ for name, layer in self.layers.items()})
        self._disabled = not self.layers
        if self._disabled:
            self._warn_once(
                "no-layers",
                f"ESSMonitor: {type(pl_module).__name__} has no layer implementing the ESS protocol "
                f"(operator() and state_size()) matching include={self.include} exclude={self.exclude}; "
                "the monitor stands aside.",
            )
        self._split = measure_mode(self.distributed, trainer) == "split"
        sharded = sharding_strategy(trainer)
        if sharded is not None and not self._split and not self._disabled:
            self._disabled = True
            self._warn_once(
                "sharded",
                f"ESSMonitor: the {sharded} strategy shards the parameters, and with distributed='rank0' the "
                "monitor's probe forward runs on rank 0 alone (it would wait forever for the other ranks' "
                "all-gathers); the monitor stands aside. Pass distributed='auto' or 'split' to measure on "
                "every rank.",
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # (under "split" the TSS comes with the first measurement, once every rank has rank 0's probe)
        if not self._disabled and trainer.is_global_zero and not self._split:
            self._guarded(trainer, lambda: self._log_tss(trainer))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0:
            self.measure(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._batch_t0 is not None:  # training time, for the measured share in summary()
            self._seconds["train"] += time.perf_counter() - self._batch_t0
            self._batch_t0 = None
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0:
            self.measure(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.measure(trainer, pl_module)
        if self.log_heatmap and not self._disabled and trainer.is_global_zero:
            self._guarded(trainer, lambda: log_heatmaps(trainer, self.ess_history, self._warned))

    # ------------------------------------------------------------------------------------------- public
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float] | None:
        """Measure and log now (once per global step; rank 0, or every rank together under ``"split"``).
        Returns the logged metrics."""
        if self._disabled or not (self._split or trainer.is_global_zero):
            return None
        step = trainer.global_step
        if self.ess_history.last_step == step:
            return None
        return self._guarded(trainer, lambda: self._measure(trainer, pl_module, step))

    # ---------------------------------------------------------------------------------------- internals
    def _guarded(self, trainer: pl.Trainer, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:
            if self.strict:
                raise
            self._warn_once(
                f"error:{type(exc).__name__}:{exc}",
                f"ESSMonitor failed at step {trainer.global_step} and is skipping this measurement "
                f"(training continues; pass strict=True to raise): {describe_error(exc)}",
            )
            return None

    def _get_probe(self, trainer: pl.Trainer, ranks: Ranks | None = None) -> Probe | None:
        """The probe batch; with active ``ranks`` (a collective) rank 0's, fetched there, on every rank."""
        if ranks is not None and ranks.active and not (self._probe_shared and self._probe is not None):
            probe = None
            if ranks.rank == 0:
                try:
                    probe = self._probe or fetch_probe(trainer, self.probe_size, self.input_key)
                except Exception:  # (fetch_probe skips failing sources itself) no probe: every rank skips
                    probe = None
                if probe is not None:  # (pickled: CPU tensors, whatever device rank 0's are on)
                    probe = (probe[0].cpu(), None if probe[1] is None else probe[1].cpu())
            self._probe, self._probe_shared = ranks.broadcast(probe), True
        elif self._probe is None:
            self._probe = fetch_probe(trainer, self.probe_size, self.input_key)
        return self._probe

    def _settle(self, step: int, done: Measurement) -> None:
        """A rank failed (every rank saw the same failures and skips): raise with ``strict``, else warn."""
        failures = done.failures
        if self.strict:
            if done.error is not None:
                raise done.error
            raise RuntimeError(f"ESSMonitor failed at step {step} on {failures[0]}")
        self._warn_once(
            f"error:{failures[0]}",
            f"ESSMonitor failed at step {step} on {'; '.join(map(str, failures))}; every rank skips this "
            "measurement (training continues; pass strict=True to raise).",
        )

    @property
    def settings(self) -> MeasurementSettings:
        """What a measurement computes (``ess_train.measure.loop``), from the monitor's arguments."""
        return MeasurementSettings(
            positions=self.positions,
            budget=self.budget,
            every_n_steps=self.every_n_steps,
            min_positions=self.min_positions,
            max_positions=self.max_positions,
            max_rows=self.max_rows,
            max_operators=self.max_operators,
            rtol=self.tolerance_rtol,
            atol=self.tolerance_atol,
        )

    def _measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> dict[str, float] | None:
        ranks = Ranks(self._split)  # (one process, collectives the identity, unless "split" on several)
        probe = self._get_probe(trainer, ranks)
        if probe is None:
            self._warn_once(
                "no-probe",
                "ESSMonitor: no probe batch (pass probe_batch= or give the trainer validation/training "
                "data); skipping.",
            )
            return None
        t0 = time.perf_counter()
        kv, error = None, None
        try:  # (an error here still joins the ranks' exchange, inside measure_model)
            self._log_tss(trainer, probe)
            kv = kv_pairs_for(getattr(trainer, "datamodule", None), probe[1])
        except Exception as exc:
            error = exc
        done = measure_model(
            pl_module,
            probe[0].to(pl_module.device),
            self.layers,
            self.settings,
            plan=self.plan,
            forward_fn=self.forward_fn,
            context=trainer.precision_plugin.forward_context(),
            kv_pairs=kv,
            ranks=ranks,
            trainer=trainer,
            error=error,
        )
        for name in done.computed:  # (this process's share, also where another rank's part failed)
            self.measured_here[name] = self.measured_here.get(name, 0) + 1
        if done.new_plan:  # (agreed by every rank, also where a rank's share failed afterwards)
            self.plan = done.plan
            self._announce_plan(done.shapes)
        if done.failures:
            self._settle(step, done)
            return None
        stats = {name: self._checked(name, result, step) for name, result in done.results.items()}
        # every rank records (identical state); rank 0 logs
        metrics = {f"ess/{key}": value for key, value in self.ess_history.record(step, stats).items()}
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if trainer.is_global_zero:
            log_to_loggers(trainer, metrics)
            if self.log_heatmap:
                log_profiles(trainer, self.ess_history, step, self._warned)
            self._wrote_file |= stream_record(
                trainer, self.ess_history, step, self.history_file, self._wrote_file
            )
        self._seconds["measure"] += time.perf_counter() - t0
        self._seconds["measurements"] += 1
        return metrics

    def _checked(self, name: str, result: LayerResult, step: int) -> LayerESS | None:
        """Give a layer's warnings and check its utilization against the thresholds (flags: state)."""
        for key, message in result.notes:
            self._warn_once(key, f"ESSMonitor: {message} (first at step {step})")
        stats = result.stats
        util = math.nan if stats is None else stats.utilization
        if math.isfinite(util):
            thresholds = (self.collapse_threshold, self.saturation_threshold)
            for flag in self.ess_history.check_thresholds(name, util, *thresholds):
                sign, threshold, meaning = _FLAGS[flag]
                self._warn_once(
                    f"{flag}:{name}",
                    f"ESSMonitor: state {flag} in {name!r} at step {step}: utilization {util:.3g} {sign} "
                    f"{getattr(self, threshold)} ({meaning}).",
                )
        return stats
