"""ESS with the Hugging Face ``Trainer``: a monitoring ``TrainerCallback``, the penalty in ``compute_loss``.

:class:`ESSTrainerCallback` measures every adapted (or protocol) layer on a fixed probe batch every
``every_n_steps`` optimizer steps, in one ``no_grad`` eval-mode forward (the monitor's measurement loop,
``ess_train.measure.loop.measure_model``), and writes ``ess/<layer>/<key>`` (``avg_entropy``,
``max_entropy``, ``avg_tolerance``, ``utilization``, ``total``) and ``ess/total`` into
``state.log_history`` and ``self.history``.

HF callbacks cannot change the loss, so the regularizer's penalty goes into ``compute_loss``
(:func:`loss_with_ess_penalty`)::

    class ESSTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            loss, outputs = loss_with_ess_penalty(model, inputs, weight=0.01, min_utilization=0.5)
            return (loss, outputs) if return_outputs else loss

Imports transformers at module level: import this module only where transformers is installed.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from ess_train.measure.layers import find_layers
from ess_train.measure.loop import MeasurementSettings, measure_model
from ess_train.measure.penalty import ess_penalty
from ess_train.models.protocol import capture_operators

__all__ = ["ESSTrainerCallback", "loss_with_ess_penalty"]

#: model -> (include, exclude, its layers): found once per model and patterns
_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layers_of(
    model: nn.Module, include: Iterable[str] | None, exclude: Iterable[str] | None
) -> dict[str, Any]:
    key = (tuple(include or ()), tuple(exclude or ()))
    got = _LAYERS.get(model)
    if got is None or got[0] != key:
        got = _LAYERS[model] = (key, find_layers(model, include=include, exclude=exclude))
    return got[1]


def loss_with_ess_penalty(
    model: nn.Module,
    inputs: dict[str, Any],
    *,
    weight: float = 1e-2,
    mode: str = "floor",
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    **penalty_kwargs: Any,
) -> tuple[Tensor, Any]:
    """``(outputs.loss + weight * ess_penalty(...), outputs)`` from one forward ``model(**inputs)`` that
    captures every layer's operator (the ESSRegularizer's penalty; ``penalty_kwargs`` go to
    :func:`~ess_train.measure.ess_penalty`: ``min_utilization``, ``max_ess``, ``positions``, ...)."""
    layers = _layers_of(model, include, exclude)
    inputs = {"use_cache": False, **inputs}
    with capture_operators(layers) as views:
        outputs = model(**inputs)
    loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
    penalty = ess_penalty(views, layers, mode, **penalty_kwargs) if layers else None  # type: ignore[arg-type]
    if penalty is not None and bool(torch.isfinite(penalty)):
        loss = loss + weight * penalty
    return loss, outputs


class ESSTrainerCallback(TrainerCallback):
    """Monitor ESS during ``transformers.Trainer`` training (see the module docstring).

    Args:
        probe_input_ids: ``[batch, L]`` token ids measured each time (default: the first ``probe_size``
            rows of the first training batch's ``input_ids``).
        every_n_steps: measure when ``global_step % every_n_steps == 0`` (and at the first step).
        positions: as everywhere (an int count, a list, ``None`` for all; default 16).
        probe_size: rows of the default probe.
        max_operators: evaluate a subset of operators per layer (``None``: all).
        include, exclude: ``fnmatch`` patterns on layer names.
    """

    def __init__(
        self,
        probe_input_ids: Tensor | None = None,
        every_n_steps: int = 100,
        positions: int | list[int] | None = 16,
        probe_size: int = 4,
        max_operators: int | None = None,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.probe = probe_input_ids
        self.every_n_steps, self.positions, self.probe_size = every_n_steps, positions, probe_size
        self.max_operators = max_operators
        self.include, self.exclude = include, exclude
        self.layers: dict[str, Any] = {}
        #: one entry per measurement: {"step": ..., "ess/<layer>/<key>": ...}
        self.history: list[dict[str, float]] = []

    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: nn.Module | None = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            return
        self.layers = find_layers(model, include=self.include, exclude=self.exclude)
        if not self.layers:
            raise ValueError(f"ESSTrainerCallback: {type(model).__name__} has no layer ess_train can measure")
        if self.probe is None and train_dataloader is not None:
            batch = next(iter(train_dataloader))
            self.probe = batch["input_ids"][: self.probe_size].detach().clone()
        if self.probe is None:
            raise ValueError("ESSTrainerCallback: no probe (pass probe_input_ids=)")

    def on_step_end(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        step = int(state.global_step)
        if model is None or not self.layers or (step % self.every_n_steps and step != 1):
            return
        metrics = self.measure(model)
        metrics["step"] = step
        self.history.append(metrics)
        state.log_history.append(dict(metrics))

    def measure(self, model: nn.Module) -> dict[str, float]:
        """``ess/<layer>/<key>`` and ``ess/total`` of ``model`` on the probe now."""
        device = next(model.parameters()).device
        settings = MeasurementSettings(positions=self.positions, max_operators=self.max_operators)
        done = measure_model(
            model,
            self.probe.to(device),
            self.layers,
            settings,
            forward_fn=lambda m, x: m(input_ids=x, use_cache=False),
        )
        out: dict[str, float] = {}
        total = 0.0
        for name, result in done.results.items():
            if result.stats is None:
                continue
            out.update({f"ess/{name}/{k}": v for k, v in result.stats.metrics().items()})
            total += result.stats.total
        out["ess/total"] = total
        return out
