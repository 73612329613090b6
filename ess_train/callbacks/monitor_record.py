"""What ESSMonitor keeps and gives back: its history as plain data, its checkpointed state, its summary and
its plots (the measuring half, the Lightning hooks and the loop, is :mod:`ess_train.callbacks.monitor`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ess_train.callbacks.lightning_glue import log_to_loggers
from ess_train.measure import ESSHistory, ESSWarning, LayerHistory, LayerTSS, Totals
from ess_train.measure.cost import LayerShape, MeasurementPlan, plan_of_positions
from ess_train.measure.probe import Probe

__all__ = ["MonitorRecord"]

log = logging.getLogger("ess_train.callbacks.monitor")  # (the monitor's own messages)


class MonitorRecord(Callback):
    """ESSMonitor's record: ``ess_history`` (``ess_train.measure.history``), the measurement ``plan``, the
    probe and the warnings given, as the monitor sets them up (its ``__init__``), and what is read from them.
    Not used on its own."""

    ess_history: ESSHistory
    plan: MeasurementPlan | None
    _probe: Any
    _warned: set[str]
    _seconds: dict[str, float]
    positions: Any
    max_operators: int | None
    budget: float | None
    collapse_threshold: float
    saturation_threshold: float
    layers: dict[str, Any]

    def _get_probe(self, trainer: pl.Trainer, ranks: Any = None) -> Probe | None:  # pragma: no cover
        raise NotImplementedError

    # ------------------------------------------------------------------------------- history (plain data)
    @property
    def history(self) -> dict[str, LayerHistory]:  # mappings: steps, positions, profiles, ...
        return self.ess_history.layers

    @property
    def totals(self) -> Totals:  # steps, total, per_kv
        return self.ess_history.totals

    @property
    def tss(self) -> dict[str, LayerTSS]:  # total, per_operator, multiplicity, seq_len
        return self.ess_history.tss

    @property
    def flags(self) -> dict[str, list[str]]:  # "collapse", "saturation"
        return self.ess_history.flags

    @property
    def layer_kinds(self) -> dict[str, str]:
        """Class name of each layer found (``"GatedLinearAttention"``), for plot labels; checkpointed."""
        return self.ess_history.layer_kinds

    @layer_kinds.setter
    def layer_kinds(self, kinds: dict[str, str]) -> None:
        self.ess_history.layer_kinds = dict(kinds)

    # ------------------------------------------------------------------------------------------ lightning
    def state_dict(self) -> dict[str, Any]:
        """The history's state (``ess_train.measure.history``: ``version``, ``history``, ``scalars``,
        ``profiles``, ``totals``, ``tss``, ``flags``, ``layer_kinds``) plus ``probe``, ``warned`` and ``plan``
        (what is measured per layer, ``MeasurementPlan.as_dict()``). The same on every rank under ``"split"``
        (Lightning saves rank 0's), but for rank 0's warnings about its loggers; under ``"rank0"`` only rank
        0's holds measurements."""
        probe = None
        if self._probe is not None:
            inputs, slice_id = self._probe
            probe = {"inputs": inputs.cpu(), "slice_id": None if slice_id is None else slice_id.cpu()}
        plan = None if self.plan is None else self.plan.as_dict()
        return {**self.ess_history.state_dict(), "probe": probe, "warned": sorted(self._warned), "plan": plan}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        found = dict(self.layer_kinds)  # by this run's setup: these win (older checkpoints have no kinds)
        self.ess_history.load_state_dict(state_dict)
        self.layer_kinds = {**self.layer_kinds, **found}
        self._warned |= set(state_dict.get("warned", []))
        probe = state_dict.get("probe")
        if probe is not None:
            self._probe = (probe["inputs"], probe.get("slice_id"))
        if state_dict.get("plan") is not None:
            self.plan = MeasurementPlan.from_dict(state_dict["plan"])
        elif self.positions == "auto" and any(h.positions for h in self.history.values()):
            # a checkpoint of a version without plans: keep measuring the positions it has
            positions = {name: hist.positions for name, hist in self.history.items()}
            self.plan = plan_of_positions(positions, self.max_operators)

    def summary(self) -> dict[str, Any]:
        """Latest numbers per layer (with TSS, first utilization and warnings raised), model totals and
        ``measurement``: the plan (what is measured, its estimated cost and budget in FLOP equivalents) and
        the time measured in this process (``measured_fraction``: measuring over training time)."""
        out = self.ess_history.summary()
        if self.plan is not None:
            spent = dict(self._seconds)
            spent["measured_fraction"] = spent["measure"] / spent["train"] if spent["train"] > 0 else None
            out["measurement"] = {**self.plan.as_dict(), "budget_fraction": self.budget, "seconds": spent}
        return out

    def save_plots(self, directory: str | Path) -> list[Path]:
        """Write ``<layer>_heatmap.png``, ``<layer>_profile.png`` per layer and ``utilization.png`` (with the
        thresholds): ``ess_train.plots.save_history_plots``, layers labelled with their class."""
        from ess_train.plots import save_history_plots

        return save_history_plots(
            directory,
            self.history,
            layer_kinds=self.layer_kinds,
            tss=self.tss,
            collapse_threshold=self.collapse_threshold,
            saturation_threshold=self.saturation_threshold,
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        rank_zero_warn(message, category=ESSWarning)

    def _log_tss(self, trainer: pl.Trainer, probe: Probe | None = None) -> None:
        if self.tss:  # (once: at fit start, at the first measurement, or from a checkpoint)
            return
        probe = probe or self._get_probe(trainer)
        if probe is None:
            return
        seq_len = int(probe[0].shape[1])
        for name, layer in self.layers.items():
            self.ess_history.set_tss(name, layer.state_size(seq_len), seq_len)
        metrics = {f"tss/{name}": float(size.total) for name, size in self.tss.items()}
        metrics["tss/total"] = float(sum(size.total for size in self.tss.values()))
        if trainer.is_global_zero:
            log_to_loggers(trainer, metrics)

    def _announce_plan(self, shapes: dict[str, LayerShape]) -> None:
        """Say once what the (agreed) plan measures, and warn when even that is over the budget."""
        assert self.plan is not None
        fraction = "" if self.budget is None else f" of a {self.budget:.0%} budget"
        log.info(f"ESSMonitor measures{fraction}: {self.plan.describe(shapes)}")
        if not self.plan.fits:
            self._warn_once(
                "over-budget",
                "ESSMonitor: even the smallest measurement is over its budget "
                f"({self.plan.describe(shapes)}); measure less often (every_n_steps), or pass "
                "positions=/budget= explicitly.",
            )
