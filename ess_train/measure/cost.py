"""What a measurement costs, and how many positions, probe rows and operators per layer fit a budget.

A deterministic cost model in *training-FLOP equivalents* (the unit a training step is counted in, with
``torch.utils.flop_counter``), so that a budget is a count, not a timing, and a resumed run chooses what the
first one did:

- a dense operator (softmax attention): one SVD of ``H_i = T[i:, :i]`` (``(L - i) x i``) per position, row
  and operator, ``(L - i) * i * (min(i, L - i) + SVD_OVERHEAD)`` units each (quartic in ``L`` over all
  positions);
- a recurrent operator (Gramians, ``ess_train.ess.gramian``): ``4 L N^2`` units per row and operator for the
  two Gramian recursions (``L N^3`` with full transitions), plus ``3 N^2 (N + EIGEN_OVERHEAD)`` per
  position (Cholesky, product and ``eigvalsh`` of ``N x N`` matrices);

each unit weighted by :data:`UNIT_FLOPS` (training FLOPs that take as long as one unit on that device:
measured with ``benchmarks/bench_scale.py --calibrate``), plus the probe forward itself.

:func:`plan_measurement` fits per-layer choices (:class:`LayerChoice`) into a budget by water-filling: the
cheapest layers (recurrent ones, typically) take all they need, the rest share what is left, each cutting
positions (evenly spaced, at least ``min_positions``), then probe rows, then operators, then positions again.
Pure counting: no forward passes, no data (those are :mod:`~ess_train.measure.planning`'s).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ess_train.measure.positions import resolve_positions

__all__ = [
    "UNIT_FLOPS",
    "BUDGET_FLOOR_FLOPS",
    "FORWARD_FACTOR",
    "LayerShape",
    "LayerChoice",
    "MeasurementPlan",
    "layer_cost",
    "plan_measurement",
    "training_budget",
    "plan_of_positions",
    "check_limits",
]

#: training FLOPs per cost unit, by device type and operator kind (this CPU: ``bench_scale.py --calibrate``
#: measured ~14-17 for dense SVDs and ~30 for the Gramian path against a d_model 128 training step).
UNIT_FLOPS: dict[str, dict[str, float]] = {
    "cpu": {"dense": 16.0, "recurrent": 30.0},
    "default": {"dense": 200.0, "recurrent": 500.0},  # accelerators: SVDs are far slower than matmuls
}

#: fixed work of one SVD, in columns: an ``m x n`` SVD costs ``m n (min(m, n) + SVD_OVERHEAD)`` units (small
#: SVDs run far below the large ones' rate: 0.4 against 3.9 Gunit/s at 16 against 512 on this CPU).
SVD_OVERHEAD = 64

#: the same for the ``N x N`` Cholesky, product and ``eigvalsh`` of each position of a recurrent operator:
#: ``3 N^2 (N + EIGEN_OVERHEAD)`` units (measured 13.5 us per position and operator at N = 16).
EIGEN_OVERHEAD = 32

#: a measurement that costs less than this (training-FLOP equivalents, ~0.1 s on this CPU) is never cut:
#: at that size a run's time goes to Python overhead, not to FLOPs, on both sides.
BUDGET_FLOOR_FLOPS = 5e9

#: what the probe forward costs relative to its counted FLOPs (capturing operators materializes them).
FORWARD_FACTOR = 3.0


@dataclass(frozen=True)
class LayerShape:
    """What a layer's measurement costs depends on: operator kind, length, rows, operators, state size."""

    form: str  # operator form: "dense" or "recurrent"
    seq_len: int
    rows: int
    operators: int
    state_dim: int = 0
    diagonal: bool = True

    @classmethod
    def of(cls, op: Any) -> LayerShape:
        """The shape of a ``DenseOperator`` or ``RecurrentOperator`` with batch shape ``[rows, G...]``."""
        batch = tuple(op.batch_shape)
        rows = batch[0] if batch else 1
        operators = math.prod(batch[1:]) if len(batch) > 1 else 1
        if hasattr(op, "state_dim"):
            return cls("recurrent", op.seq_len, rows, operators, int(op.state_dim), bool(op.diagonal))
        return cls("dense", op.seq_len, rows, operators)


@dataclass
class LayerChoice:
    """What is measured of one layer: ``positions`` (a count, evenly spaced; ``None``: all), ``rows`` and
    ``operators`` (``None``: all), and its ``cost`` in training-FLOP equivalents."""

    positions: int | list[int] | None
    rows: int | None
    operators: int | None
    cost: float

    def resolve(self, seq_len: int) -> list[int] | None:
        """The positions at ``seq_len`` (``None``: all)."""
        return resolve_positions(self.positions, seq_len)


@dataclass
class MeasurementPlan:
    """Per-layer choices, with the budget they were fitted to (training-FLOP equivalents per measurement).

    ``mode``: ``"budget"`` (fitted), ``"all"`` (no budget, or everything fits), ``"given"`` (the user's
    positions); ``fits``: whether ``cost <= budget`` (``False`` when even the smallest choice is over it).
    """

    layers: dict[str, LayerChoice] = field(default_factory=dict)
    budget_flops: float = math.inf
    forward: float = 0.0
    step_flops: float = 0.0
    mode: str = "budget"

    @property
    def cost(self) -> float:
        """Estimated cost of one measurement: the probe forward plus every layer's choice."""
        return self.forward + sum(c.cost for c in self.layers.values())

    @property
    def fits(self) -> bool:
        return self.cost <= self.budget_flops

    @property
    def rows(self) -> int | None:
        """Probe rows any layer measures (``None``: all): the probe forward needs no more."""
        rows = [c.rows for c in self.layers.values()]
        return None if not rows or any(r is None for r in rows) else max(rows)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (callback state, ``summary.json``)."""
        return {
            "mode": self.mode,
            "budget_flops": None if math.isinf(self.budget_flops) else self.budget_flops,  # (None: no budget)
            "cost_flops": self.cost,
            "forward_flops": self.forward,
            "step_flops": self.step_flops,
            "fits": self.fits,
            "layers": {name: asdict(c) for name, c in self.layers.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MeasurementPlan:
        return cls(
            layers={name: LayerChoice(**c) for name, c in data.get("layers", {}).items()},
            budget_flops=math.inf if data.get("budget_flops") is None else float(data["budget_flops"]),
            forward=float(data.get("forward_flops", 0.0)),
            step_flops=float(data.get("step_flops", 0.0)),
            mode=str(data.get("mode", "budget")),
        )

    def describe(self, shapes: Mapping[str, LayerShape] | None = None) -> str:
        """One line: the mode, the cost against the budget, and what is measured (layers with the same shape
        and choice grouped)."""
        shapes = shapes or {}
        groups: dict[str, list[str]] = {}
        for name, c in self.layers.items():
            shape = shapes.get(name)
            count = len(c.positions) if isinstance(c.positions, list) else c.positions
            what = f"{shape.form} L={shape.seq_len}: " if shape else ""
            what += f"positions {'all' if count is None else count}"
            for label, value, total in (
                ("rows", c.rows, shape.rows if shape else None),
                ("operators", c.operators, shape.operators if shape else None),
            ):
                what += f", {label} " + (
                    "all" if value is None else f"{value}" + (f"/{total}" if total else "")
                )
            groups.setdefault(what, []).append(name)
        parts = [f"{len(n)} layer(s) ({n[0]}{', ...' if len(n) > 1 else ''}) {w}" for w, n in groups.items()]
        budget = "no budget" if math.isinf(self.budget_flops) else f"budget {self.budget_flops:.3g}"
        share = f", {self.cost / self.step_flops:.3g} training steps" if self.step_flops else ""
        over = "" if self.fits else " (OVER BUDGET even at the smallest choice)"
        head = f"{self.mode}: {self.cost:.3g} FLOP-eq per measurement ({budget}{share}){over}"
        return "; ".join([head, *parts])


def _unit_flops(device_type: str) -> dict[str, float]:
    return UNIT_FLOPS.get(device_type, UNIT_FLOPS["default"])


def layer_cost(
    shape: LayerShape,
    positions: list[int] | None,
    rows: int | None = None,
    operators: int | None = None,
    device_type: str = "cpu",
) -> float:
    """Cost of measuring one layer at ``positions`` (``None``: all) on ``rows`` rows and ``operators``
    operators (``None``: all), in training-FLOP equivalents (module docstring)."""
    L = shape.seq_len
    n = min(shape.rows, rows or shape.rows) * min(shape.operators, operators or shape.operators)
    pos = range(L) if positions is None else positions
    weights = _unit_flops(device_type)
    if shape.form == "dense":
        units = sum((L - i) * i * (min(i, L - i) + SVD_OVERHEAD) for i in pos if 0 < i < L)
        return float(n * units * weights["dense"])
    N = shape.state_dim
    gramians = 4 * L * N * N if shape.diagonal else 2 * L * N**3
    units = gramians + 3 * len(pos) * N * N * (N + EIGEN_OVERHEAD)
    return float(n * units * weights["recurrent"])


def _fit_layer(
    shape: LayerShape,
    share: float,
    *,
    min_positions: int,
    max_positions: int,
    max_rows: int | None,
    max_operators: int | None,
    device_type: str,
) -> LayerChoice:
    """The richest choice for one layer that costs at most ``share``: most positions (down to
    ``min_positions``) at all rows and operators, then fewer rows (halving, down to 2), then fewer
    operators (halving, down to 1), then 1 row, then fewer positions (down to 2). The smallest when none
    fits."""
    L = shape.seq_len
    top = min(max_positions, max(L - 1, 1))
    rows0 = min(shape.rows, max_rows or shape.rows)
    ops0 = min(shape.operators, max_operators or shape.operators)

    def cost(p: int, r: int, o: int) -> float:
        return layer_cost(shape, resolve_positions(p, L), r, o, device_type)

    def most_positions(r: int, o: int, floor: int) -> int | None:
        if cost(floor, r, o) > share:
            return None
        lo, hi = floor, top  # cost(lo) fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if cost(mid, r, o) <= share else (lo, mid - 1)
        return lo

    floor = min(min_positions, top)
    ladder = []
    r, o = rows0, ops0
    ladder.append((r, o))
    while r > 2:
        r = max(2, r // 2)
        ladder.append((r, o))
    while o > 1:
        o = max(1, o // 2)
        ladder.append((r, o))
    if r > 1:
        ladder.append((1, o))
    for r, o in ladder:
        p = most_positions(r, o, floor)
        if p is not None:
            return _choice(shape, p, r, o, cost(p, r, o), top)
    r, o = ladder[-1]
    p = most_positions(r, o, min(2, top)) or min(2, top)
    return _choice(shape, p, r, o, cost(p, r, o), top)


def _choice(shape: LayerShape, p: int, r: int, o: int, cost: float, top: int) -> LayerChoice:
    every = shape.seq_len <= 1 or p >= shape.seq_len - 1
    return LayerChoice(
        positions=None if every and top >= shape.seq_len - 1 else p,
        rows=None if r >= shape.rows else r,
        operators=None if o >= shape.operators else o,
        cost=cost,
    )


def training_budget(
    step_flops: float, every_n_steps: int, fraction: float, floor: float | None = None
) -> float:
    """Budget of one measurement: ``fraction`` of the training FLOPs between two measurements
    (``every_n_steps`` steps of ``step_flops``), and at least ``floor`` (:data:`BUDGET_FLOOR_FLOPS`)."""
    floor = BUDGET_FLOOR_FLOPS if floor is None else floor
    return max(float(fraction) * int(every_n_steps) * float(step_flops), float(floor))


def plan_measurement(
    shapes: Mapping[str, LayerShape],
    budget: float | None,
    *,
    forward: float = 0.0,
    step_flops: float = 0.0,
    positions: Any = "auto",
    min_positions: int = 16,
    max_positions: int = 256,
    max_rows: int | None = None,
    max_operators: int | None = None,
    device_type: str = "cpu",
    probe_rows: int | None = None,
) -> MeasurementPlan:
    """Per-layer choices whose total cost, with the probe ``forward``, fits ``budget`` (module docstring).

    ``probe_rows``: the rows ``forward`` is for; when the plan measures fewer on every layer, the probe
    forward runs on those only, so the plan is refitted once with the forward scaled down.

    ``positions="auto"`` fits counts to the budget (at most ``max_positions``; all when ``L - 1`` is within
    that and they fit); any other value (``None``: all, a count, a list) is the user's and is used for every
    layer as given, only its cost reported. ``budget=None``: no budget (all positions).
    ``max_rows``/``max_operators`` cap every layer (the user's, never exceeded)."""
    plan = MeasurementPlan(
        budget_flops=math.inf if budget is None else float(budget),
        forward=float(forward),
        step_flops=step_flops,
    )
    if positions != "auto" or budget is None:
        plan.mode = "given" if positions != "auto" else "all"
        spec_in = None if positions == "auto" else positions
        for name, shape in shapes.items():
            pos = resolve_positions(spec_in, shape.seq_len)
            spec = spec_in if spec_in is None or isinstance(spec_in, int) else list(pos or [])
            cost = layer_cost(shape, pos, max_rows, max_operators, device_type)
            plan.layers[name] = LayerChoice(spec, max_rows, max_operators, cost)
        return plan
    fit = {
        "min_positions": min_positions,
        "max_positions": max_positions,
        "max_rows": max_rows,
        "max_operators": max_operators,
        "device_type": device_type,
    }
    full = {name: _fit_layer(shape, math.inf, **fit) for name, shape in shapes.items()}
    remaining = plan.budget_flops - plan.forward
    if sum(c.cost for c in full.values()) <= remaining:
        plan.mode = "all" if all(c.positions is None for c in full.values()) else "budget"
        plan.layers = full
        return plan
    # water-filling over groups of layers of one shape (they get one choice): cheapest first, each group
    # taking all it needs or an equal share per layer of what is left
    groups: dict[LayerShape, list[str]] = {}
    for name, shape in shapes.items():
        groups.setdefault(shape, []).append(name)
    left = len(shapes)
    chosen: dict[str, LayerChoice] = {}
    for shape, names in sorted(groups.items(), key=lambda kv: (full[kv[1][0]].cost, kv[1][0])):
        share = max(remaining, 0.0) / left
        best = full[names[0]]
        choice = best if best.cost <= share else _fit_layer(shape, share, **fit)
        chosen.update({name: choice for name in names})
        remaining -= choice.cost * len(names)
        left -= len(names)
    plan.layers = {name: chosen[name] for name in shapes}  # in the model's order
    rows = plan.rows
    if probe_rows and rows is not None and rows < probe_rows:
        again = plan_measurement(
            shapes, budget, forward=forward * rows / probe_rows, step_flops=step_flops, **fit
        )
        if again.rows is not None and again.rows <= rows:
            again.forward = forward * again.rows / probe_rows
            return again
    return plan


def plan_of_positions(
    positions: Mapping[str, list[int]], max_operators: int | None = None
) -> MeasurementPlan:
    """A plan that measures the given positions per layer (``mode="given"``, cost unknown: 0): what a
    checkpoint of a version without plans keeps measuring."""
    layers = {
        name: LayerChoice(list(pos), None, max_operators, 0.0) for name, pos in positions.items() if pos
    }
    return MeasurementPlan(layers=layers, mode="given")


def check_limits(
    positions: Any,
    budget: float | None,
    min_positions: int,
    max_positions: int,
    max_rows: int | None,
    max_operators: int | None,
    max_profiles: int,
) -> Any:
    """Validate the monitor's cost settings (``ValueError`` naming the bad one); returns ``positions`` with
    ``"all"`` read as ``None``."""
    if positions == "all":
        positions = None
    if isinstance(positions, str) and positions != "auto":
        raise ValueError(f"positions must be 'auto', 'all', None, an int or a list, got {positions!r}")
    if budget is not None and not budget > 0:
        raise ValueError(f"budget must be > 0 (a fraction of training time) or None, got {budget}")
    if not 1 <= min_positions <= max_positions:
        raise ValueError(f"need 1 <= min_positions <= max_positions, got {min_positions}, {max_positions}")
    for key, value in (("max_rows", max_rows), ("max_operators", max_operators)):
        if value is not None and value < 1:
            raise ValueError(f"{key} must be >= 1 or None, got {value}")
    if max_profiles < 2:
        raise ValueError(f"max_profiles must be >= 2, got {max_profiles}")
    return positions
