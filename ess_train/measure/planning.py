"""Planning a measurement during training: the counted FLOPs of a forward, the training batch's rows, and
the plan that fits :mod:`~ess_train.measure.cost`'s cost model into a share of the training step.

The glue between the pure cost model and a live model: it runs one FLOP-counted forward
(``torch.utils.flop_counter``) and reads the trainer's (or a datamodule's) training loader. No Lightning
import: the trainer is read by duck type.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ess_train.measure.cost import (
    FORWARD_FACTOR,
    LayerShape,
    MeasurementPlan,
    plan_measurement,
    training_budget,
)
from ess_train.measure.probe import eval_mode, first_loader

__all__ = ["forward_flops", "train_batch_rows", "plan_for_training"]


def forward_flops(module: Any, inputs: Any, forward_fn: Any = None) -> float:
    """FLOPs of one ``no_grad`` eval-mode forward of ``module`` on ``inputs`` (``torch.utils.flop_counter``:
    matmuls, convolutions, attention; deterministic). Falls back to ``2 * parameters * tokens``."""
    try:
        with torch.no_grad(), eval_mode(module), FlopCounterMode(display=False) as counter:
            forward_fn(module, inputs) if forward_fn is not None else module(inputs)
        flops = float(counter.get_total_flops())
    except Exception:  # an op the counter cannot trace: a parameter count is the next best thing
        flops = 0.0
    if flops <= 0:
        flops = 2.0 * sum(p.numel() for p in module.parameters()) * float(inputs.numel())
    return flops


def train_batch_rows(source: Any) -> int | None:
    """Rows of a training batch: ``batch_size`` of the trainer's (or a datamodule's) training loader, else
    of the datamodule; ``None`` when unknown."""
    loader = getattr(source, "train_dataloader", None)
    try:
        loader = first_loader(loader() if callable(loader) else loader)
    except Exception:
        loader = None
    for candidate in (loader, getattr(source, "datamodule", None)):
        size = getattr(candidate, "batch_size", None)
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            return size
    return None


def plan_for_training(
    module: Any,
    inputs: Any,
    shapes: Mapping[str, LayerShape],
    *,
    every_n_steps: int,
    fraction: float | None,
    positions: Any = "auto",
    trainer: Any = None,
    forward_fn: Any = None,
    **limits: Any,
) -> MeasurementPlan:
    """:func:`plan_measurement` against ``fraction`` of the training between two measurements: a training
    step is 3 counted forwards (forward + backward) of ``module`` at the training batch's rows
    (:func:`train_batch_rows` of ``trainer``, else the probe's), times its gradient accumulation; the probe
    forward costs :data:`FORWARD_FACTOR` forwards of ``inputs`` (of the rows the plan measures: refitted once
    when it measures fewer rows than the probe has). ``limits``: ``min_positions``,
    ``max_positions``, ``max_rows``, ``max_operators``. Only counts: the same shapes give the same plan."""
    step_flops = forward = 0.0
    budget = None
    if positions == "auto" and fraction is not None:
        fwd = forward_flops(module, inputs, forward_fn)
        probe_rows = max(int(inputs.shape[0]), 1)
        train_rows = train_batch_rows(trainer) or probe_rows
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        step_flops = 3.0 * fwd * train_rows / probe_rows * accumulate
        budget = training_budget(step_flops, every_n_steps, fraction)
        forward = FORWARD_FACTOR * fwd
    fit = {"step_flops": step_flops, "positions": positions, "device_type": inputs.device.type, **limits}
    return plan_measurement(shapes, budget, forward=forward, probe_rows=int(inputs.shape[0]), **fit)
