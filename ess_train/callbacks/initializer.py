"""``ESSInitializer``: choose each layer's initialization hyperparameters by the ESS they give at step 0."""

from __future__ import annotations

import copy
import itertools
import math
import random
import zlib
from collections.abc import Callable, Iterable, Mapping
from fnmatch import fnmatchcase
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from ess_train.callbacks.lightning_glue import log_to_loggers
from ess_train.checks import (
    check_callable,
    check_float,
    check_int,
    check_keywords,
    check_optional_positive_int,
    check_patterns,
    check_position_spec,
    check_positive_float,
    check_positive_int,
)
from ess_train.measure import ESSWarning, LayerESS, PositionSpec, fetch_probe, probe_from_batch
from ess_train.measure.layers import find_layers
from ess_train.measure.loop import MeasurementSettings, measure_model

__all__ = ["ESSInitializer"]

Metric = Literal["utilization", "ess", "total"]
SearchSpace = Mapping[str, list] | Mapping[str, Mapping[str, list]]


class ESSInitializer(Callback):
    """At fit start, greedily pick each layer's init setting by entropy-ESS on a probe batch.

    For every protocol layer (in order) that has ``apply_init(**setting)`` and a search space
    (``init_search_space()``, overridden key by key by ``search_space``), the candidates are the grid of the
    search space (first entry: all defaults), or the defaults plus a seeded random subset when the grid
    has more than ``max_trials`` settings. Each candidate is applied to the layer's original parameters
    (``apply_init`` runs under a seed derived from ``seed``, the layer name and the setting), scored by a
    ``no_grad`` eval-mode forward on the probe (``ess_train.measure.loop.measure_model``), and the best one is
    kept: highest ``metric``, or closest to ``metric_target`` when given (ties: the earlier candidate).
    Layers that come later see the earlier choices.

    ``metric``: ``"utilization"`` (the one ESSMonitor logs:
    ``sum_i ESS_i / sum_i min(per_operator, i, L - i)`` over the evaluated positions,
    ``ess_train.measure.layer_utilization``; a layer where it is undefined, ``per_operator == 0``, keeps its
    defaults, with a warning), ``"ess"`` (mean entropy-ESS) or
    ``"total"`` (layer total ESS). Logs ``init/<layer>/ess_before``, ``init/<layer>/ess_after`` (mean
    entropy-ESS) and ``init/<layer>/utilization_before``/``_after`` at step 0; ``report`` holds, per layer,
    the chosen setting, the numbers before/after and every trial. Skipped when resuming from a checkpoint
    (its state records that initialization happened). Under DDP every rank runs the search and applies
    rank 0's choice for each layer (seeded ``apply_init``: identical replicas).

    Args:
        metric: what a candidate is scored by (above).
        metric_target: a value of ``metric``, in its units (a utilization in ``(0, 1]``, a mean entropy-ESS,
            a layer total ESS): keep the candidate closest to it instead of the highest (``None``).
        search_space: ``{name: candidates}`` for every layer, or ``{layer pattern: {name: candidates}}``.
        positions: positions for the ESS estimate (``None``: all, as ESSMonitor; an int ``k``: ``k`` in
            ``[1, L-1]``).
        max_operators: score on at most this many evenly spaced operators per layer (``None``: all).
        forward_fn: ``forward_fn(pl_module, inputs)`` replacing ``pl_module(inputs)`` in each scoring
            forward, for modules with another signature (as ESSMonitor's ``forward_fn``).
    """

    def __init__(
        self,
        metric: Metric = "utilization",
        metric_target: float | None = None,
        probe_batch: Any = None,
        probe_size: int = 8,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        search_space: SearchSpace | None = None,
        max_trials: int = 16,
        seed: int = 0,
        positions: PositionSpec = None,
        input_key: str = "inputs",
        max_operators: int | None = None,
        forward_fn: Callable[[nn.Module, Tensor], Any] | None = None,
    ) -> None:
        super().__init__()
        if metric not in ("utilization", "ess", "total"):
            raise ValueError(f"metric must be 'utilization', 'ess' or 'total', got {metric!r}")
        if metric_target is not None:
            if metric == "utilization":
                check_float("metric_target", metric_target, 0.0, 1.0, low_open=True)
            else:
                check_positive_float("metric_target", metric_target)
        self.metric = metric
        self.metric_target = metric_target
        self.probe_size = check_positive_int("probe_size", probe_size)
        self.include = check_patterns("include", include)
        self.exclude = check_patterns("exclude", exclude)
        self.search_space = search_space
        self.max_trials = check_positive_int("max_trials", max_trials)
        self.seed = check_int("seed", seed, low=0)
        self.positions = check_position_spec("positions", positions)
        self.input_key = input_key
        self.max_operators = check_optional_positive_int("max_operators", max_operators)
        self.forward_fn = check_callable("forward_fn", forward_fn)
        self._probe = (
            probe_from_batch(probe_batch, probe_size, input_key) if probe_batch is not None else None
        )
        #: per layer: setting, ess_before/after, utilization_before/after, trials.
        self.report: dict[str, dict[str, Any]] = {}
        self.done = False

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "report": self.report}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = bool(state_dict.get("done", False))
        self.report = state_dict.get("report", {})

    # ------------------------------------------------------------------------------------------ lightning
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.done or trainer.ckpt_path is not None:
            return
        self.initialize(pl_module, trainer)
        self.done = True

    # ------------------------------------------------------------------------------------------- public
    def initialize(
        self, pl_module: nn.Module, trainer: pl.Trainer | None = None
    ) -> dict[str, dict[str, Any]]:
        """Run the search on ``pl_module`` now (also usable without a trainer, given ``probe_batch``)."""
        layers = find_layers(pl_module, include=self.include, exclude=self.exclude)
        spaces = {name: self._space_for(name, layer) for name, layer in layers.items()}
        spaces = {
            name: sp
            for name, sp in spaces.items()
            if sp and callable(getattr(layers[name], "apply_init", None))
        }
        for name, sp in spaces.items():
            where = f"the init search space of layer {name!r} ({type(layers[name]).__name__}.apply_init)"
            check_keywords(sp, layers[name].apply_init, where=where)
        if not spaces:
            rank_zero_warn(
                "ESSInitializer: no layer with apply_init() and a search space "
                f"(include={self.include} exclude={self.exclude}); nothing to do.",
                category=ESSWarning,
            )
            return self.report
        if self._probe is None and trainer is not None:
            self._probe = fetch_probe(trainer, self.probe_size, self.input_key)
        if self._probe is None:
            rank_zero_warn(
                "ESSInitializer: no probe batch (pass probe_batch=); skipped.", category=ESSWarning
            )
            return self.report
        device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
        inputs = self._probe[0].to(device)
        metrics: dict[str, float] = {}
        for name, space in spaces.items():
            layer = layers[name]
            entry = self._search(pl_module, name, layer, space, inputs, trainer)
            self.report[name] = entry
            metrics.update(
                {
                    f"init/{name}/ess_before": entry["ess_before"],
                    f"init/{name}/ess_after": entry["ess_after"],
                    f"init/{name}/utilization_before": entry["utilization_before"],
                    f"init/{name}/utilization_after": entry["utilization_after"],
                }
            )
            rank_zero_info(
                f"ESSInitializer: {name}: {entry['setting']} "
                f"(utilization {entry['utilization_before']:.3g} -> {entry['utilization_after']:.3g}, "
                f"ESS {entry['ess_before']:.3g} -> {entry['ess_after']:.3g})"
            )
        if trainer is not None:
            log_to_loggers(trainer, metrics)
        return self.report

    # ---------------------------------------------------------------------------------------- internals
    def _space_for(self, name: str, layer: nn.Module) -> dict[str, list]:
        """The layer's own space, overridden by ``search_space``: a flat ``{name: candidates}`` replaces the
        keys the layer's own space has (all keys for a layer without one); ``{pattern: {...}}`` entries
        matching the layer name replace or add their keys."""
        space: dict[str, list] = {}
        own = callable(getattr(layer, "init_search_space", None))
        if own:
            space.update({k: list(v) for k, v in layer.init_search_space().items()})
        user = self.search_space or {}
        if user and all(isinstance(v, Mapping) for v in user.values()):
            for pattern, sub in user.items():
                if fnmatchcase(name, pattern):
                    space.update({k: list(v) for k, v in sub.items()})
        else:
            space.update({k: list(v) for k, v in user.items() if not own or k in space})
        return {k: v for k, v in space.items() if v}

    def _candidates(self, name: str, space: dict[str, list]) -> list[dict[str, Any]]:
        keys = list(space)
        grid = [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]
        if len(grid) <= self.max_trials:
            return grid
        rng = random.Random(zlib.crc32(f"{self.seed}:{name}".encode()))
        rest = sorted(rng.sample(range(1, len(grid)), self.max_trials - 1))
        return [grid[0]] + [grid[i] for i in rest]

    def _measure(
        self, pl_module: nn.Module, name: str, layer: nn.Module, inputs: Tensor, trainer: Any
    ) -> LayerESS | None:
        """Layer ``name``'s ESS on the probe (``ess_train.measure.loop``), or ``None`` when its operator is
        non-finite."""
        context = trainer.precision_plugin.forward_context() if trainer is not None else None
        settings = MeasurementSettings(
            positions=self.positions, max_operators=self.max_operators, tolerance=False
        )
        done = measure_model(
            pl_module, inputs, {name: layer}, settings, forward_fn=self.forward_fn, context=context
        )
        result = done.results[name]
        if result.size is None:  # not called by the forward
            raise RuntimeError(f"ESSInitializer: {result.notes[0][1]}")
        return result.stats

    def _score(self, stats: Any) -> float:
        value = {"utilization": stats.utilization, "ess": stats.avg_entropy, "total": stats.total}[
            self.metric
        ]
        if not math.isfinite(value):
            return -math.inf
        return -abs(value - self.metric_target) if self.metric_target is not None else value

    def _search(
        self,
        pl_module: nn.Module,
        name: str,
        layer: nn.Module,
        space: dict[str, list],
        inputs: Tensor,
        trainer: Any,
    ) -> dict[str, Any]:
        original = {  # tensors, and extra state (e.g. GLA's normalizer) as a deep copy
            k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v)
            for k, v in layer.state_dict().items()
        }
        before = self._measure(pl_module, name, layer, inputs, trainer)
        if self.metric == "utilization" and before is not None and not math.isfinite(before.utilization):
            rank_zero_warn(
                f"ESSInitializer: layer {name!r} has no state to fill (per_operator == 0 at this "
                "sequence length): utilization is undefined; its defaults are kept.",
                category=ESSWarning,
            )
        candidates = self._candidates(name, space)
        best_score, best_index = -math.inf, -1
        trials = []
        for i, setting in enumerate(candidates):
            self._apply(layer, name, setting, original, inputs.device)
            stats = self._measure(pl_module, name, layer, inputs, trainer)
            score = -math.inf if stats is None else self._score(stats)
            trials.append(
                {
                    "setting": dict(setting),
                    "score": score,
                    "utilization": math.nan if stats is None else stats.utilization,
                    "ess": math.nan if stats is None else stats.avg_entropy,
                }
            )
            if score > best_score:
                best_score, best_index = score, i
        # Re-apply the winner from the original parameters under its seed: identical to its trial, and
        # also right for settings kept outside the state dict (plain attributes such as GLA's normalizer).
        chosen: dict[str, Any] | None = candidates[best_index] if best_index >= 0 else None
        if trainer is not None and trainer.world_size > 1:  # rank 0's choice wins (probes could differ)
            chosen = trainer.strategy.broadcast(chosen, src=0)
        self._apply(layer, name, chosen or candidates[0], original, inputs.device)
        after = self._measure(pl_module, name, layer, inputs, trainer)
        return {
            "setting": chosen,
            "ess_before": math.nan if before is None else before.avg_entropy,
            "ess_after": math.nan if after is None else after.avg_entropy,
            "utilization_before": math.nan if before is None else before.utilization,
            "utilization_after": math.nan if after is None else after.utilization,
            "trials": trials,
        }

    def _apply(
        self,
        layer: nn.Module,
        name: str,
        setting: dict[str, Any],
        original: dict[str, Tensor],
        device: torch.device,
    ) -> None:
        """Original parameters, then ``apply_init(**setting)`` under a seed from (seed, layer, setting)."""
        layer.load_state_dict(original)
        seed = zlib.crc32(f"{self.seed}:{name}:{sorted(setting.items())!r}".encode())
        devices = (
            [device.index if device.index is not None else torch.cuda.current_device()]
            if device.type == "cuda"
            else []
        )
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            layer.apply_init(**setting)
