"""``ess_penalty``: the differentiable ESS penalty over captured operator views.

The regularizer adds it to the training loss; it needs no trainer, only the views a forward captured
(``capture_operators``) and the layers they came from, so it can be added to any loss by hand. The floor
mode uses the same utilization the monitor logs (:func:`~ess_train.measure.stats.state_utilization`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from ess_train.ess import DenseOperator, RecurrentOperator
from ess_train.measure.positions import position_bounds, resolve_positions
from ess_train.measure.stats import compute_copy, entropy_profiles, no_autocast, state_utilization
from ess_train.measure.warning import ESSWarning
from ess_train.models.protocol import OperatorView

__all__ = ["Mode", "MODES", "ess_penalty"]

Mode = Literal["floor", "ceiling", "decay_identity"]
MODES = ("floor", "ceiling", "decay_identity")


def ess_penalty(
    views: Mapping[str, OperatorView],
    layers: Mapping[str, nn.Module],
    mode: Mode = "floor",
    target: float | None = None,
    num_positions: int | None = 16,
    batch_rows: int | None = 2,
    max_operators: int | None = 8,
    offset: int = 0,
    warn: Callable[[str, str], None] | None = None,
) -> Tensor | None:
    """The differentiable penalty of ``mode`` over the captured ``views`` (``None`` when nothing applies).

    - ``floor``: ``mean over layers of relu(target - utilization)^2`` (``target`` default 0.5), with the
      utilization ESSMonitor logs (``ess/<layer>/utilization``, :func:`state_utilization`):
      ``sum_i ESS_i / sum_i min(StateSize.per_operator, i, L - i)`` over the evaluated positions, entropy-ESS
      averaged over the rows and operators used. A layer whose utilization is undefined
      (``per_operator == 0``, e.g. sliding-window attention with ``window=1``, or ``L == 1``) is skipped,
      with a warning (once per layer through ``warn``);
    - ``ceiling``: ``mean over layers of relu(mean entropy-ESS - target)`` (``target``: ESS budget per
      operator; the mean is over the evaluated positions, rows and operators);
    - ``decay_identity``: mean over recurrent layers of ``mean((1 - a)^2)`` (diagonal transitions) or
      ``mean_t ||A_t - I||_F^2 / N`` (full), which pulls transitions towards the identity (longer memory).
      Only learned transitions count (``a.requires_grad``): a fixed one (the short convolution's shift
      register, linear attention's identity) has nothing to pull and would only add a constant and
      dilute the mean over the layers that do. Hence views captured under ``torch.no_grad()`` (or with
      every parameter upstream of the gates frozen) give ``None``: nothing could receive a gradient.

    Entropy-ESS runs in float32 with autocast off, on the first ``batch_rows`` rows, ``max_operators``
    operators (stride ``G // max_operators``, starting at ``offset``) and ``num_positions`` evenly spaced
    positions in ``[1, L-1]`` (``None``: all; position 0 adds nothing to the floor's utilization either way).
    ``warn(key, message)``: warning sink (default ``warnings.warn`` with :class:`ESSWarning`); the
    regularizer passes its warn-once.
    """
    if warn is None:

        def warn(key: str, message: str) -> None:
            warnings.warn(message, ESSWarning, stacklevel=3)

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    terms: list[Tensor] = []
    # floor/ceiling: (layer, operator copy, positions, per-operator bound); ESS of all in batched calls
    jobs: list[tuple[str, DenseOperator | RecurrentOperator, list[int] | None, int]] = []
    for name, view in views.items():
        if name not in layers:
            continue
        op = view.op
        if mode == "decay_identity":
            if not isinstance(op, RecurrentOperator):
                continue
            a = op.a  # (built on each read by the lazy operators: read once)
            if not a.requires_grad:
                continue
            a = a if a.dtype == torch.float64 else a.float()
            if op.diagonal:
                terms.append((1.0 - a).square().mean())
            else:
                eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
                terms.append((a - eye).square().sum((-2, -1)).mean() / a.shape[-1])
            continue
        if mode == "ceiling" and target is None:
            raise ValueError("mode='ceiling' needs target= (ESS budget per operator)")
        seq_len = op.seq_len
        positions = resolve_positions(num_positions, seq_len)
        per_op = 0
        if mode == "floor":
            per_op = int(layers[name].state_size(seq_len).per_operator)
            if sum(position_bounds(per_op, seq_len, positions)) <= 0:
                warn(
                    f"undefined-utilization:{name}",
                    f"ESSRegularizer: layer {name!r} has no state to fill at seq_len={seq_len} "
                    f"(per_operator={per_op}): utilization is undefined; the floor skips it.",
                )
                continue
        small = compute_copy(op, rows=batch_rows, operators=max_operators, offset=offset)
        jobs.append((name, small, positions, per_op))
    if jobs:
        with no_autocast(jobs[0][1]):
            profiles = entropy_profiles([j[1] for j in jobs], [j[2] for j in jobs])
        for (_, small, positions, per_op), ent in zip(jobs, profiles):
            if mode == "floor":
                util = state_utilization(ent, per_op, small.seq_len, positions)
                assert util is not None  # bounds checked above
                terms.append(torch.relu((0.5 if target is None else target) - util).square())
            else:
                terms.append(torch.relu(ent.mean() - target))
    if not terms:
        return None
    return torch.stack(terms).mean()
