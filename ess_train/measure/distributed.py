"""A measurement's per-layer work split across the ranks of a process group (``torch.distributed`` only).

Under parameter sharding (FSDP, ModelParallel, DeepSpeed ZeRO-3) the probe forward must run on every rank,
since each one all-gathers the others' parameter shards; once every rank holds every layer's operator, the
ESS work (the SVDs, the Gramians) is split by layer (:func:`assign_layers`, balanced by the plan's cost
estimate) and the per-layer results are exchanged (:meth:`Ranks.exchange`), so that every rank ends up with
the full measurement, as one process would have measured it.

Collectives are where a distributed run hangs: a rank that raises before one leaves the others waiting
forever. :meth:`Ranks.exchange` therefore sends a :class:`Failure` marker in place of a result that could not
be computed (or pickled), and every rank learns of it from the same exchange, so all of them take the same
decision (skip, or raise). No Lightning here (``ess_train.measure``).
"""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

__all__ = ["Failure", "Ranks", "assign_layers", "describe_error"]


def describe_error(exc: BaseException, limit: int = 3) -> str:
    """``Type: message`` plus the last ``limit`` frames, one line (what a :class:`Failure` carries)."""
    frames = traceback.extract_tb(exc.__traceback__)[-limit:]
    where = " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} in {f.name}" for f in reversed(frames))
    return f"{type(exc).__name__}: {exc} (at {where})" if where else f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class Failure:
    """Sent by a rank in place of its part when computing (or pickling) it raised: the rank still joins
    the collective, and every rank learns what went wrong where."""

    rank: int
    error: str  # describe_error(exc)

    def __str__(self) -> str:
        return f"rank {self.rank}: {self.error}"


class Ranks:
    """The ranks taking part in one measurement: the default process group when ``active`` and initialized,
    else this process alone (every collective is then the identity, so one code path serves both)."""

    def __init__(self, active: bool = True) -> None:
        self.active = bool(active) and dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world_size = dist.get_world_size() if self.active else 1

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank (pickled: send CPU tensors, a CUDA tensor would be unpickled
        on the sender's device index)."""
        if not self.active:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def exchange(self, value: Any, error: BaseException | None = None) -> tuple[list[Any], list[Failure]]:
        """Every rank's ``value`` (index = rank), and the :class:`Failure` of each rank that sent one.

        A rank whose part raised passes ``error`` (its ``value`` is then ignored); a value that does not
        pickle becomes a failure too. Either way this rank still takes part, so no rank waits forever."""
        payload: Any = Failure(self.rank, describe_error(error)) if error is not None else value
        if not self.active:
            parts = [payload]
        else:
            try:
                blob = pickle.dumps(payload)
            except Exception as exc:  # unpicklable result: say so instead of leaving the others waiting
                blob = pickle.dumps(Failure(self.rank, describe_error(exc)))
            blobs: list[Any] = [None] * self.world_size
            dist.all_gather_object(blobs, blob)
            parts = [pickle.loads(b) for b in blobs]
        return parts, [p for p in parts if isinstance(p, Failure)]

    def split(
        self, names: Sequence[str], costs: Mapping[str, float], compute: Callable[[str], Any]
    ) -> tuple[dict[str, Any], list[Failure], BaseException | None]:
        """``compute(name)`` for this rank's share of ``names`` (:func:`assign_layers`), exchanged: every
        rank's results by name (in ``names`` order; empty when a rank failed), the failures, and this rank's
        own error (``None`` when its share went through)."""
        owner = assign_layers(names, costs, self.world_size)
        mine: dict[str, Any] = {}
        error: BaseException | None = None
        try:
            for name in names:
                if owner[name] == self.rank:
                    mine[name] = compute(name)
        except Exception as exc:
            error = exc
        parts, failures = self.exchange(mine, error)
        if failures:
            return {}, failures, error
        found = {name: value for part in parts for name, value in part.items()}
        return {name: found[name] for name in names}, failures, error


def assign_layers(names: Sequence[str], costs: Mapping[str, float], world_size: int) -> dict[str, int]:
    """The rank that measures each layer: costliest first, each to the rank with the least cost so far
    (then the fewest layers, then the lowest rank); deterministic, so every rank computes the same split.
    A layer without a cost counts 0 (equal costs: round-robin in ``names`` order)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    order = sorted(range(len(names)), key=lambda i: (-float(costs.get(names[i], 0.0)), i))
    load = [(0.0, 0) for _ in range(world_size)]
    owner: dict[str, int] = {}
    for i in order:
        rank = min(range(world_size), key=lambda r: (*load[r], r))
        owner[names[i]] = rank
        load[rank] = (load[rank][0] + float(costs.get(names[i], 0.0)), load[rank][1] + 1)
    return {name: owner[name] for name in names}
