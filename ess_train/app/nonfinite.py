"""``NonFiniteGuard``: stop training at the step where the loss, a gradient or a parameter stops being finite.

Three checks per optimizer step, each one scalar read back from the device:

- the loss, before its backward (``on_before_backward``);
- the gradients, before the optimizer step and before gradient clipping (``on_before_optimizer_step``);
- the parameters, after the optimizer step (``on_train_batch_end``: ``optim.lr=inf`` makes them non-finite
  from finite gradients).

The first failure raises :class:`NonFiniteError` naming the step (the index of the step, as ``train/loss``
is logged: the first batch is step 0), the loss, and the first non-finite parameter or gradient by name.
Training ends there: no later validation, and so no checkpoint of the broken model (the last checkpoint on
disk is the last finite one). The app then, by default, issues a :class:`NonFiniteWarning`, writes the
summary (``stopped``) and exits 0; with ``strict`` (the app sets it when the ESS monitor is strict) it
writes the summary and exits 1 with the message.

Lightning's ``Trainer(detect_anomaly=True)`` (autograd anomaly mode) finds the backward operation that made
a NaN, at several times the cost of a step, and misses ``lr=inf``; this guard is cheap enough to be on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

__all__ = ["NonFiniteGuard", "NonFiniteError", "NonFiniteWarning"]


class NonFiniteWarning(UserWarning):
    """Training stopped at a non-finite loss, gradient or parameter (non-strict mode)."""


class NonFiniteError(ArithmeticError):
    """The loss, a gradient or a parameter became non-finite. ``step``, ``what`` and ``name`` say where."""

    def __init__(self, step: int, what: str, name: str | None, detail: str) -> None:
        self.step, self.what, self.name = step, what, name
        super().__init__(f"non-finite {what} at step {step}: {detail}")


def _all_finite(tensors: list[Tensor]) -> bool:
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all().item())


def _first_non_finite(named: Iterable[tuple[str, Tensor | None]]) -> str | None:
    for name, tensor in named:
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def _where(name: str | None, kind: str) -> str:
    return f"first non-finite {kind}: {name}" if name else f"every {kind} is finite"


class NonFiniteGuard(Callback):
    """Raise :class:`NonFiniteError` at the first non-finite loss, gradient or parameter (module docstring).

    Args:
        strict: for the app: a non-finite run exits non-zero (the callback raises in both modes).
    """

    def __init__(self, strict: bool = False) -> None:
        super().__init__()
        self.strict = bool(strict)
        self._step = 0
        self._loss = math.nan
        self._lrs: list[float] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step = trainer.global_step

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        value = float(loss.detach().float().mean()) if loss.numel() else math.nan
        finite = math.isfinite(value)
        if trainer.world_size > 1:  # every rank stops together (the loss is per rank)
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        self._loss = value
        if not finite:
            bad = _first_non_finite(pl_module.named_parameters())
            raise NonFiniteError(self._step, "loss", bad, f"loss {value}; {_where(bad, 'parameter')}")

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._lrs = sorted({float(g["lr"]) for g in optimizer.param_groups})  # what this step uses
        named = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
        if _all_finite([g for _, g in named]):
            return
        bad = _first_non_finite(named)
        raise NonFiniteError(
            self._step, "gradient", bad, f"loss {self._loss:.6g}; {_where(bad, 'gradient')} (before clipping)"
        )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if _all_finite([p.detach() for p in pl_module.parameters()]):
            return
        bad = _first_non_finite((n, p.detach()) for n, p in pl_module.named_parameters())
        raise NonFiniteError(
            self._step,
            "parameter",
            bad,
            f"{_where(bad, 'parameter')} after the optimizer step (loss {self._loss:.6g}, finite gradients, "
            f"learning rate {', '.join(f'{lr:g}' for lr in self._lrs)})",
        )
