"""One measurement of a model's ESS: the probe forward, the plan, and every layer's statistics.

The one loop that ESSMonitor, the Hugging Face Trainer callback, ESSInitializer and ``analyze`` run, below
Lightning: :func:`measure_model` captures every layer's operator in one ``no_grad`` eval-mode forward, makes
the plan at the first measurement (``ess_train.measure.planning``) or reuses the one given, cuts each view to
the plan's rows and operators, and computes each layer's :class:`~ess_train.measure.stats.LayerESS` at the
plan's positions (:func:`measure_layer`). It returns a :class:`Measurement`: a :class:`LayerResult` per
layer and the warnings to give, as ``(key, message)`` notes; the caller decides how to show them, what to
record and what to log.

When the plan is known before the forward (given, or explicit positions) and one process measures, each
view is reduced to its statistics as it arrives (:class:`_ReducingSink`), so no layer's operator (a dense
``[B, H, L, L]`` attention matrix) outlives its forward. Otherwise the views are collected, the plan is
fitted to their shapes, and across the ranks of a ``"split"`` measurement the layers are shared out by the
plan's costs and the results exchanged (``ess_train.measure.distributed``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ess_train.measure.cost import LayerChoice, LayerShape, MeasurementPlan
from ess_train.measure.distributed import Failure, Ranks
from ess_train.measure.planning import plan_for_training
from ess_train.measure.positions import PositionSpec
from ess_train.measure.probe import eval_mode, probe_views
from ess_train.measure.stats import LayerESS, layer_ess, view_rows
from ess_train.models.protocol import OperatorView, StateSize, capture_operators, layer_name

__all__ = ["MeasurementSettings", "LayerResult", "Measurement", "measure_layer", "measure_model"]

Note = tuple[str, str]  # (key: warn once per key, message)


@dataclass(frozen=True)
class MeasurementSettings:
    """What a measurement computes, and within what cost (``ess_train.measure.cost``).

    ``positions``: ``"auto"`` (fitted to ``budget``), ``None`` (all), a count (evenly spaced) or a list;
    ``budget``: the share of the training between two measurements (``every_n_steps`` steps) a measurement
    may take, with ``"auto"``; ``min_positions``/``max_positions``: the bounds ``"auto"`` fits within;
    ``max_rows``/``max_operators``: caps on probe rows and operators per layer; ``tolerance``, ``rtol``,
    ``atol``: tolerance-ESS too, with that threshold.
    """

    positions: PositionSpec | str = "auto"
    budget: float | None = None
    every_n_steps: int = 1
    min_positions: int = 16
    max_positions: int = 256
    max_rows: int | None = None
    max_operators: int | None = None
    tolerance: bool = True
    rtol: float | None = None
    atol: float = 0.0

    def default_choice(self) -> LayerChoice:
        """What a layer absent from the plan is measured with: the given positions, or the fewest."""
        spec = self.min_positions if self.positions == "auto" else self.positions
        return LayerChoice(spec, self.max_rows, self.max_operators, 0.0)


@dataclass
class LayerResult:
    """One layer's measurement: its statistics (``None``: missing: not called, or a non-finite operator), its
    state size and operator count (``None``/0 when not called), and the warnings it gives."""

    stats: LayerESS | None
    size: StateSize | None = None
    operators: int = 0
    notes: list[Note] = field(default_factory=list)


@dataclass
class Measurement:
    """What :func:`measure_model` found.

    ``results``: per layer, in the order of ``layers``, then a layer's later call sites in the forward
    (``name#2``, ...: ``ess_train.models.protocol.call_site``; empty when the measurement was skipped);
    ``plan``: the plan it measured with; ``new_plan``: made by this measurement (``shapes`` then holds the
    layers' shapes, for describing it); ``failures``: the ranks that failed (every rank then skips);
    ``error``: this process's own error where it failed; ``computed``: the layers this process computed.
    """

    results: dict[str, LayerResult] = field(default_factory=dict)
    plan: MeasurementPlan | None = None
    new_plan: bool = False
    shapes: dict[str, LayerShape] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    error: BaseException | None = None
    computed: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> bool:
        return bool(self.failures)


def measure_layer(
    name: str,
    layer: Any,
    view: OperatorView | None,
    choice: LayerChoice,
    settings: MeasurementSettings,
    kv_pairs: Tensor | None = None,
) -> LayerResult:
    """One layer's statistics from its captured ``view`` at ``choice`` (rows, operators, positions): the
    view -> state size -> positions -> ``layer_ess`` step every caller shares."""
    if view is None:
        return LayerResult(
            None, notes=[(f"not-called:{name}", f"layer {name!r} was not called by the forward.")]
        )
    seq_len = view.op.seq_len
    size = layer.state_size(seq_len)
    operators = math.prod(view.op.batch_shape[1:])
    view = view_rows(view, choice.rows)
    try:
        stats = layer_ess(
            view,
            size,
            choice.resolve(seq_len),
            tolerance=settings.tolerance,
            rtol=settings.rtol,
            atol=settings.atol,
            kv_pairs=kv_pairs,
            max_operators=choice.operators,
        )
    except ValueError as exc:  # a non-finite operator (the engine's check)
        message = (
            f"ESS of layer {name!r} is missing: {exc}. Its metrics are not logged while this lasts "
            "(history holds NaN)."
        )
        return LayerResult(None, size, operators, [(f"nonfinite:{name}", message)])
    notes: list[Note] = []
    if not math.isfinite(stats.utilization):
        notes.append(
            (
                f"undefined-utilization:{name}",
                f"layer {name!r} has no state to fill at seq_len={seq_len} "
                f"(per_operator={size.per_operator}): utilization is undefined and not logged.",
            )
        )
    return LayerResult(stats, size, operators, notes)


class _ReducingSink(dict):
    """A capture sink that reduces each view to its :class:`LayerResult` as it arrives (the view is dropped:
    no operator outlives its layer's forward)."""

    def __init__(
        self,
        layers: Mapping[str, Any],
        plan: MeasurementPlan | None,
        settings: MeasurementSettings,
        kv_pairs: Tensor | None,
        progress: Callable[[str], None] | None,
    ) -> None:
        super().__init__()
        self.layers, self.plan, self.settings, self.kv_pairs = layers, plan, settings, kv_pairs
        self.progress = progress
        self.results: dict[str, LayerResult] = {}
        self.shapes: dict[str, LayerShape] = {}

    def __setitem__(self, name: str, view: OperatorView) -> None:
        choice = self.plan.layers.get(name) if self.plan is not None else None
        self.shapes[name] = LayerShape.of(view.op)
        self.results[name] = measure_layer(
            name,
            self.layers[layer_name(name)],
            view,
            choice or self.settings.default_choice(),
            self.settings,
            self.kv_pairs,
        )
        if self.progress is not None:
            self.progress(name)


def _forward(
    module: nn.Module,
    inputs: Tensor,
    layers: Mapping[str, Any],
    sink: dict,
    forward_fn: Callable[[nn.Module, Tensor], Any] | None,
    context: contextlib.AbstractContextManager | None,
) -> None:
    with torch.no_grad(), eval_mode(module), capture_operators(dict(layers), sink):
        with context if context is not None else contextlib.nullcontext():
            forward_fn(module, inputs) if forward_fn is not None else module(inputs)


def measure_model(
    module: nn.Module,
    inputs: Tensor,
    layers: Mapping[str, Any],
    settings: MeasurementSettings,
    *,
    plan: MeasurementPlan | None = None,
    forward_fn: Callable[[nn.Module, Tensor], Any] | None = None,
    context: contextlib.AbstractContextManager | None = None,
    kv_pairs: Tensor | None = None,
    ranks: Ranks | None = None,
    trainer: Any = None,
    error: BaseException | None = None,
    progress: Callable[[str], None] | None = None,
    cost_plan: bool = True,
) -> Measurement:
    """Measure every one of ``layers`` (by name) of ``module`` on ``inputs`` (module docstring).

    ``plan``: the plan to reuse (``None``: made here, fitted to ``settings.budget`` of a training step of
    ``trainer``, read by duck type); ``forward_fn(module, inputs)`` replaces ``module(inputs)``;
    ``context``: entered innermost around the forward (a trainer's precision context); ``kv_pairs``: per
    row, for ``per_kv``; ``ranks``: the ranks sharing a ``"split"`` measurement (a collective: every rank
    calls this); ``error``: an error the caller hit preparing this measurement, sent to the other ranks in
    place of this rank's part; ``progress(name)``: called as each layer's statistics are computed;
    ``cost_plan``: with explicit positions and no plan, also cost them (a FLOP-counted forward: what the
    monitor reports they take of training; ``analyze``, which trains nothing, skips it).

    One process re-raises its errors; across ranks every rank gets the same ``failures`` and skips.
    """
    ranks = ranks or Ranks(False)
    rows = None if plan is None else plan.rows  # (the rows the plan measures: less to capture)
    inputs = inputs[:rows]
    streaming = not ranks.active and (plan is not None or settings.positions != "auto")
    if streaming:
        if error is not None:
            raise error
        sink = _ReducingSink(layers, plan, settings, kv_pairs, progress)
        _forward(module, inputs, layers, sink, forward_fn, context)
        missing = settings.default_choice()
        results = {
            name: sink.results.get(name) or measure_layer(name, layer, None, missing, settings)
            for name, layer in layers.items()
        }
        results.update({key: got for key, got in sink.results.items() if key not in results})  # call sites
        out = Measurement(results=results, plan=plan, computed=list(sink.results))
        if plan is None and cost_plan:  # explicit positions: the plan only reports what they cost
            out.plan = _plan(module, inputs, sink.shapes, settings, trainer, forward_fn)
            out.new_plan, out.shapes = True, sink.shapes
        return out
    # 1. the probe forward (and the plan, at the first measurement) on every rank: a sharded model's
    # all-gathers need them all; every rank then adopts rank 0's plan
    views: dict[str, OperatorView] = {}
    made, shapes = plan, {}
    if error is None:
        try:
            views = probe_views(module, inputs, layers, forward_fn, context)
            if made is None:  # (layer shapes only where the plan is made)
                shapes = {n: LayerShape.of(v.op) for n, v in views.items()}
                made = _plan(module, inputs, shapes, settings, trainer, forward_fn)
        except Exception as exc:
            error = exc
    agreed = plan is not None or made is None  # (the plan travels only until every rank has agreed on it)
    parts, failures = ranks.exchange(None if agreed else made.as_dict(), error)
    if error is not None and not ranks.active:
        raise error
    if failures:
        return Measurement(plan=plan, failures=failures, error=error)
    new_plan = plan is None
    if new_plan:
        plan = made if ranks.rank == 0 else MeasurementPlan.from_dict(parts[0])
    assert plan is not None
    # 2. each rank measures its share of the layers (by the plan's costs); the results are exchanged
    computed: list[str] = []

    def one(name: str) -> LayerResult:
        choice = plan.layers.get(name) or settings.default_choice()
        got = measure_layer(name, layers[layer_name(name)], views.get(name), choice, settings, kv_pairs)
        computed.append(name)
        if progress is not None:
            progress(name)
        return got

    costs = {name: choice.cost for name, choice in plan.layers.items()}
    keys = [*layers, *(key for key in views if key not in layers)]  # (later call sites of a layer: name#2)
    found, failures, error = ranks.split(keys, costs, one)
    views.clear()
    if error is not None and not ranks.active:
        raise error
    out = Measurement(plan=plan, new_plan=new_plan, shapes=shapes, failures=failures, error=error)
    out.computed = computed
    if not failures:
        out.results = {name: found[name] for name in keys}
    return out


def _plan(
    module: nn.Module,
    inputs: Tensor,
    shapes: dict[str, LayerShape],
    settings: MeasurementSettings,
    trainer: Any,
    forward_fn: Callable[[nn.Module, Tensor], Any] | None,
) -> MeasurementPlan:
    return plan_for_training(
        module,
        inputs,
        shapes,
        every_n_steps=settings.every_n_steps,
        fraction=settings.budget,
        positions=settings.positions,
        trainer=trainer,
        forward_fn=forward_fn,
        min_positions=settings.min_positions,
        max_positions=settings.max_positions,
        max_rows=settings.max_rows,
        max_operators=settings.max_operators,
    )
