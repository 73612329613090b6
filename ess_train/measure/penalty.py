"""``ess_penalty``: the differentiable ESS penalty over captured operator views.

The regularizer adds it to the training loss; it needs no trainer, only the views a forward captured
(``capture_operators``) and the layers they came from, so it can be added to any loss by hand. The floor
mode uses the same utilization the monitor logs (:func:`~ess_train.measure.stats.layer_utilization`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from ess_train.ess import Operator, RecurrentOperator
from ess_train.measure.positions import PositionSpec, position_bounds, resolve_positions
from ess_train.measure.stats import compute_copy, entropy_profiles, layer_utilization, no_autocast
from ess_train.measure.warning import ESSWarning
from ess_train.models.protocol import OperatorView, layer_name

__all__ = ["Mode", "MODES", "ess_penalty", "penalty_targets"]

Mode = Literal["floor", "ceiling", "decay_identity"]
MODES = ("floor", "ceiling", "decay_identity")
#: the floor's default: penalize layers using less than half of their state
DEFAULT_MIN_UTILIZATION = 0.5
#: positions of the penalty's ESS estimate: 16 evenly spaced ones (cheap enough for every step).
DEFAULT_PENALTY_POSITIONS = 16


def penalty_targets(
    mode: str, min_utilization: float | None, max_ess: float | None
) -> tuple[float, float | None]:
    """``(min_utilization, max_ess)`` for ``mode``, checked: ``min_utilization`` (``None``: 0.5) must lie in
    ``(0, 1]`` for ``floor``; ``ceiling`` needs ``max_ess``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if min_utilization is None:
        min_utilization = DEFAULT_MIN_UTILIZATION
    if mode == "floor" and not (
        isinstance(min_utilization, (int, float))
        and not isinstance(min_utilization, bool)
        and 0 < min_utilization <= 1
    ):
        raise ValueError(f"mode='floor' takes min_utilization in (0, 1], got {min_utilization!r}")
    if mode == "ceiling" and max_ess is None:
        raise ValueError("mode='ceiling' needs max_ess= (the mean entropy-ESS per operator it allows)")
    return float(min_utilization), max_ess


def ess_penalty(
    views: Mapping[str, OperatorView],
    layers: Mapping[str, nn.Module],
    mode: Mode = "floor",
    *,
    min_utilization: float = DEFAULT_MIN_UTILIZATION,
    max_ess: float | None = None,
    positions: PositionSpec = DEFAULT_PENALTY_POSITIONS,
    batch_rows: int | None = 2,
    max_operators: int | None = 8,
    offset: int = 0,
    warn: Callable[[str, str], None] | None = None,
) -> Tensor | None:
    """The differentiable penalty of ``mode`` over the captured ``views`` (``None`` when nothing applies).

    - ``floor``: ``mean over layers of relu(min_utilization - utilization)^2`` (default 0.5), with the
      utilization ESSMonitor logs (``ess/<layer>/utilization``, :func:`layer_utilization`):
      ``sum_i ESS_i / sum_i min(StateSize.per_operator, i, L - i)`` over the evaluated positions, entropy-ESS
      averaged over the rows and operators used. A layer whose utilization is undefined
      (``per_operator == 0``, e.g. sliding-window attention with ``window=1``, or ``L == 1``) is skipped,
      with a warning (once per layer through ``warn``);
    - ``ceiling``: ``mean over layers of relu(mean entropy-ESS - max_ess)`` (``max_ess``: ESS budget per
      operator; the mean is over the evaluated positions, rows and operators);
    - ``decay_identity``: mean over recurrent layers of ``mean((1 - a)^2)`` (diagonal transitions) or
      ``mean_t ||A_t - I||_F^2 / N`` (full), which pulls transitions towards the identity (longer memory).
      Only learned transitions count (``a.requires_grad``): a fixed one (the short convolution's shift
      register, linear attention's identity) has nothing to pull and would only add a constant and
      dilute the mean over the layers that do. Hence views captured under ``torch.no_grad()`` (or with
      every parameter upstream of the gates frozen) give ``None``: nothing could receive a gradient.

    Entropy-ESS runs in float32 with autocast off, on the first ``batch_rows`` rows, ``max_operators``
    operators (stride ``G // max_operators``, starting at ``offset``) and ``positions``
    (:data:`~ess_train.measure.positions.PositionSpec`: an int ``k`` is ``k`` evenly spaced positions in
    ``[1, L-1]``, ``None`` all, a list those; position 0 adds nothing to the floor's utilization either way).
    ``warn(key, message)``: warning sink (default ``warnings.warn`` with :class:`ESSWarning`); the
    regularizer passes its warn-once.
    """
    min_utilization, max_ess = penalty_targets(mode, min_utilization, max_ess)
    if warn is None:

        def warn(key: str, message: str) -> None:
            warnings.warn(message, ESSWarning, stacklevel=3)

    terms: list[Tensor] = []
    # floor/ceiling: (layer, operator copy, positions, per-operator bound); ESS of all in batched calls
    jobs: list[tuple[str, Operator, list[int] | None, int]] = []
    for name, view in views.items():
        if layer_name(name) not in layers:  # (name#2: a later call site of the layer)
            continue
        op = view.op
        if mode == "decay_identity":
            if not isinstance(op, RecurrentOperator):
                continue
            a = op.a
            if not a.requires_grad:
                continue
            a = a if a.dtype == torch.float64 else a.float()
            if op.diagonal:
                terms.append((1.0 - a).square().mean())
            else:
                eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
                terms.append((a - eye).square().sum((-2, -1)).mean() / a.shape[-1])
            continue
        seq_len = op.seq_len
        evaluated = resolve_positions(positions, seq_len)
        per_op = 0
        if mode == "floor":
            per_op = int(layers[layer_name(name)].state_size(seq_len).per_operator)
            if sum(position_bounds(per_op, seq_len, evaluated)) <= 0:
                warn(
                    f"undefined-utilization:{name}",
                    f"ESSRegularizer: layer {name!r} has no state to fill at seq_len={seq_len} "
                    f"(per_operator={per_op}): utilization is undefined; the floor skips it.",
                )
                continue
        small = compute_copy(op, rows=batch_rows, operators=max_operators, offset=offset)
        jobs.append((name, small, evaluated, per_op))
    if jobs:
        with no_autocast(jobs[0][1]):
            profiles = entropy_profiles([j[1] for j in jobs], [j[2] for j in jobs])
        for (_, small, evaluated, per_op), ent in zip(jobs, profiles):
            if mode == "floor":
                util = layer_utilization(ent, per_op, small.seq_len, evaluated)
                assert util is not None  # bounds checked above
                terms.append(torch.relu(min_utilization - util).square())
            else:
                terms.append(torch.relu(ent.mean() - max_ess))
    if not terms:
        return None
    return torch.stack(terms).mean()
