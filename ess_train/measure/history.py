"""An ESS history over training: typed, versioned, checkpointable (stdlib dataclasses; no Lightning).

:class:`ESSHistory` keeps what :class:`ess_train.callbacks.ESSMonitor` measures: per layer a
:class:`LayerHistory` (``steps``, ``positions``, the entropy- and tolerance-ESS ``profiles`` by position,
one list per step, and one list per summary scalar, :data:`SUMMARY_KEYS`), the model :class:`Totals`, the
theoretical state size per layer (:class:`LayerTSS`), threshold ``flags`` and ``layer_kinds`` (class names,
for plot labels). :meth:`ESSHistory.record` appends one measurement (:class:`~ess_train.measure.LayerESS`
per layer, ``None`` where a layer is missing: NaN), :meth:`~ESSHistory.summary` gives the latest numbers.

The records read as plain data: a :class:`LayerHistory`, :class:`Totals` and :class:`LayerTSS` are
read-only mappings of their field names (``history.layers[name]["steps"]``), which is what
``ess_train.plots`` takes.

Bounded: every per-step scalar (:data:`SUMMARY_KEYS`, one number per layer and measurement) is kept, but
of the ESS-by-position profiles only ``max_profiles`` per layer (default :data:`MAX_PROFILES`): the first, the
``recent`` newest and, in between, log-spaced steps (:func:`thin_profiles`: when one too many, the older
profile whose neighbours are closest in ``log(step + gap)`` goes). ``LayerHistory.profile_steps`` are
the steps of the kept ``profiles``/``tolerance_profiles``; ``steps`` those of the scalars. The rule depends
only on the steps recorded, so a resumed run keeps what an uninterrupted one does. The full record is
``ESSMonitor``'s JSON-lines file (:mod:`ess_train.measure.records`).

State format (:meth:`~ESSHistory.state_dict`): ``version``, ``history`` (per layer ``steps`` and
``positions``, plain lists), ``scalars`` (per layer a ``[steps, len(SUMMARY_KEYS)]`` tensor, float32 when
exact, as the statistics are, else float64), ``profiles`` (per layer ``steps``: the kept steps,
``entropy`` and ``tolerance``: float32 tensors ``[kept, positions]``, lossless: the profiles are float32
values), ``totals`` (``steps``, ``total``, ``per_kv``), ``tss`` (per layer ``total``, ``per_operator``,
``multiplicity``, ``seq_len``), ``flags``, ``layer_kinds``. Version 3 is written now. Versions 1 and 2 (the
monitor's state before, profiles as lists in ``history``, one per step) are read too: version 2 has every
list at full length; version 1 may have short or absent lists (checkpoints written before tolerance profiles
were kept have none; some have no ``layer_kinds``), padded with NaN; their profiles are thinned on loading.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ess_train.measure.stats import LayerESS
    from ess_train.models.protocol import StateSize

__all__ = [
    "ESSHistory",
    "LayerHistory",
    "LayerTSS",
    "Totals",
    "SUMMARY_KEYS",
    "HISTORY_VERSION",
    "MAX_PROFILES",
    "thin_profiles",
]

#: the state format :meth:`ESSHistory.state_dict` writes; :meth:`ESSHistory.load_state_dict` reads 1 to 3.
HISTORY_VERSION = 3

#: per-step summary scalars of a layer (``LayerESS.metrics()`` keys; NaN where not measured).
SUMMARY_KEYS = ("avg_entropy", "max_entropy", "avg_tolerance", "utilization", "total", "per_kv")

#: profiles kept per layer (the first, log-spaced older ones, the :data:`RECENT_PROFILES` newest).
MAX_PROFILES = 64
RECENT_PROFILES = 8


class _FieldMapping(Mapping[str, Any]):
    """Read-only mapping view of a dataclass's fields (the plain-data view readers and plots use)."""

    def __getitem__(self, key: str) -> Any:
        if key not in self._field_names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._field_names())

    def __len__(self) -> int:
        return len(self._field_names())

    @classmethod
    def _field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, Any]:
        """Plain ``dict`` of the fields (lists and their rows copied)."""
        return {k: _copy(v) for k, v in self.items()}


def _copy(value: Any) -> Any:
    return [list(v) if isinstance(v, list) else v for v in value] if isinstance(value, list) else value


def _nan(width: int) -> list[float]:
    return [math.nan] * width


def thin_profiles(
    steps: list[int], max_profiles: int, recent: int = RECENT_PROFILES, gap: int = 1
) -> int | None:
    """Index into ``steps`` (the kept profiles' steps, ascending) of the one to drop when there are more than
    ``max_profiles``, else ``None``. Never the first nor the ``recent`` newest; of the others, the one whose
    neighbours are closest in ``log(step + gap)`` (ties: the earliest), which keeps the older profiles
    log-spaced in step (``gap``: the measurement interval, so that step 0 counts)."""
    if len(steps) <= max(max_profiles, 2):
        return None
    last = len(steps) - 1 - min(max(recent, 1), max(max_profiles - 2, 1))
    if last < 1:
        return len(steps) - 2
    g = max(int(gap), 1)
    spans = [math.log(steps[i + 1] + g) - math.log(steps[i - 1] + g) for i in range(1, last + 1)]
    return 1 + min(range(len(spans)), key=spans.__getitem__)


@dataclass(eq=False)
class LayerHistory(_FieldMapping):
    """One layer's measurements: one entry per step in ``steps`` and each :data:`SUMMARY_KEYS` list; one row
    per kept step (``profile_steps``, thinned) in ``profiles`` and ``tolerance_profiles``."""

    steps: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    profile_steps: list[int] = field(default_factory=list)
    profiles: list[list[float]] = field(default_factory=list)
    tolerance_profiles: list[list[float]] = field(default_factory=list)
    avg_entropy: list[float] = field(default_factory=list)
    max_entropy: list[float] = field(default_factory=list)
    avg_tolerance: list[float] = field(default_factory=list)
    utilization: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    per_kv: list[float] = field(default_factory=list)

    def record(self, step: int, stats: LayerESS | None, max_profiles: int = MAX_PROFILES) -> None:
        """Append ``stats`` at ``step`` (``None``: missing, NaN), then thin the profiles to ``max_profiles``.
        When the evaluated positions change (the first measurement, or another probe length), the earlier
        profiles become NaN at the new width."""
        self.steps.append(step)
        self.profile_steps.append(step)
        if stats is None:
            width = len(self.positions) or 1
            self.profiles.append(_nan(width))
            self.tolerance_profiles.append(_nan(width))
            for key in SUMMARY_KEYS:
                getattr(self, key).append(math.nan)
        else:
            width = len(stats.positions)
            if self.positions != stats.positions:
                self.positions = list(stats.positions)
                self.profiles = [_nan(width) for _ in self.profiles]
                self.tolerance_profiles = [_nan(width) for _ in self.tolerance_profiles]
            self.profiles.append(list(stats.profile))
            tol = stats.tolerance_profile
            self.tolerance_profiles.append(list(tol) if tol is not None else _nan(width))
            values = stats.metrics()
            for key in SUMMARY_KEYS:
                getattr(self, key).append(values.get(key, math.nan))
        self.thin(max_profiles)

    def thin(self, max_profiles: int = MAX_PROFILES) -> None:
        """Drop profiles (:func:`thin_profiles`) until at most ``max_profiles`` are kept."""
        gap = self.steps[1] - self.steps[0] if len(self.steps) > 1 else 1
        while (i := thin_profiles(self.profile_steps, max_profiles, gap=gap)) is not None:
            del self.profile_steps[i], self.profiles[i], self.tolerance_profiles[i]

    def state(self) -> tuple[dict[str, Any], Tensor, dict[str, Any]]:
        """``(history, scalars, profiles)`` entries of the state format (module docstring)."""
        width = len(self.positions) or 1
        rows = [r if len(r) == width else _nan(width) for r in self.profiles]
        tols = [r if len(r) == width else _nan(width) for r in self.tolerance_profiles]
        profiles = {
            "steps": list(self.profile_steps),
            "entropy": torch.tensor(rows, dtype=torch.float32).reshape(len(rows), width),
            "tolerance": torch.tensor(tols, dtype=torch.float32).reshape(len(tols), width),
        }
        values = [getattr(self, k) for k in SUMMARY_KEYS]
        scalars = torch.tensor(values, dtype=torch.float64).reshape(len(SUMMARY_KEYS), -1).T.contiguous()
        return {"steps": list(self.steps), "positions": list(self.positions)}, _compact(scalars), profiles

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], scalars: Any = None, profiles: Mapping[str, Any] | None = None
    ) -> LayerHistory:
        """From a state dict's layer entry and (version 3) its scalars and profiles entries; without them
        (versions 1 and 2) all is read from ``data``, one entry per step, short or absent lists NaN-padded."""
        steps = [int(s) for s in data.get("steps", [])]
        positions = [int(p) for p in data.get("positions", [])]
        n, width = len(steps), len(positions) or 1
        table = None if scalars is None else torch.as_tensor(scalars, dtype=torch.float64)

        def column(key: str) -> list[float]:
            if table is not None:
                values = table[:n, SUMMARY_KEYS.index(key)].tolist() if table.numel() else []
            else:
                values = [float(v) for v in list(data.get(key, []))[:n]]
            return values + _nan(n - len(values))

        hist = cls(steps=steps, positions=positions, **{key: column(key) for key in SUMMARY_KEYS})
        if profiles is not None:
            hist.profile_steps = [int(s) for s in profiles.get("steps", [])]
            k = len(hist.profile_steps)
            for key, name in (("entropy", "profiles"), ("tolerance", "tolerance_profiles")):
                got = profiles.get(key)
                out = (
                    []
                    if got is None
                    else torch.as_tensor(got, dtype=torch.float64).reshape(-1, width).tolist()
                )
                setattr(hist, name, out[:k] + [_nan(width) for _ in range(k - len(out))])
            return hist

        def rows(key: str) -> list[list[float]]:
            got = [[float(v) for v in r] for r in data.get(key, [])][:n]
            return got + [_nan(width) for _ in range(n - len(got))]

        hist.profile_steps = list(steps)
        hist.profiles, hist.tolerance_profiles = rows("profiles"), rows("tolerance_profiles")
        return hist


def _compact(values: Tensor) -> Tensor:
    """``values`` as float32 when that is exact (the statistics are float32 numbers), else float64."""
    small = values.float()
    same = (small.double() == values) | (values.isnan() & small.isnan())
    return small if bool(same.all()) else values


@dataclass(eq=False)
class Totals(_FieldMapping):
    """Model level, one entry per measurement: the sum over layers of ``total`` and of ``per_kv`` (NaN when
    no layer had one)."""

    steps: list[int] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    per_kv: list[float] = field(default_factory=list)


@dataclass(eq=False)
class LayerTSS(_FieldMapping):
    """Theoretical state size of a layer at ``seq_len`` (``StateSize`` of the protocol)."""

    total: int
    per_operator: int
    multiplicity: int
    seq_len: int


@dataclass(eq=False)
class ESSHistory:
    """Everything measured over a run; see the module docstring for the state format."""

    layers: dict[str, LayerHistory] = field(default_factory=dict)
    totals: Totals = field(default_factory=Totals)
    tss: dict[str, LayerTSS] = field(default_factory=dict)
    #: per layer the thresholds crossed (``"collapse"``, ``"saturation"``), each once, in order.
    flags: dict[str, list[str]] = field(default_factory=dict)
    #: class name of each layer (``"GatedLinearAttention"``), for plot labels.
    layer_kinds: dict[str, str] = field(default_factory=dict)
    #: profiles kept per layer (:func:`thin_profiles`); not part of the state (the monitor's setting).
    max_profiles: int = MAX_PROFILES

    @property
    def last_step(self) -> int | None:
        return self.totals.steps[-1] if self.totals.steps else None

    def record(self, step: int, stats: Mapping[str, LayerESS | None]) -> dict[str, float]:
        """Append one measurement at ``step``: per layer its stats (``None``: missing, NaN in the history).

        Returns the scalars of this measurement worth logging: ``<layer>/<key>`` for each key of
        ``LayerESS.metrics()`` (an undefined, NaN utilization left out), ``total`` (sum over the measured
        layers) and ``per_kv`` (over those that have one) when any layer has them, and ``missing_layers``
        when a layer is missing. The totals history records NaN where there is no sum."""
        scalars: dict[str, float] = {}
        measured = [s for s in stats.values() if s is not None]
        for name, layer_stats in stats.items():
            self.layers.setdefault(name, LayerHistory()).record(step, layer_stats, self.max_profiles)
            for key, value in (layer_stats.metrics() if layer_stats is not None else {}).items():
                if key != "utilization" or math.isfinite(value):
                    scalars[f"{name}/{key}"] = value
        per_kvs = [s.per_kv for s in measured if s.per_kv is not None]
        total = float(sum(s.total for s in measured)) if measured else math.nan
        per_kv = float(sum(per_kvs)) if per_kvs else math.nan
        self.totals.steps.append(step)
        self.totals.total.append(total)
        self.totals.per_kv.append(per_kv)
        if measured:
            scalars["total"] = total
        if per_kvs:
            scalars["per_kv"] = per_kv
        if len(measured) < len(stats):
            scalars["missing_layers"] = float(len(stats) - len(measured))
        return scalars

    def set_tss(self, name: str, size: StateSize, seq_len: int) -> None:
        """Record layer ``name``'s theoretical state size (``state_size(seq_len)`` of the protocol)."""
        self.tss[name] = LayerTSS(
            int(size.total), int(size.per_operator), int(size.multiplicity), int(seq_len)
        )

    def flag(self, name: str, flag: str) -> bool:
        """Raise ``flag`` for layer ``name``; True the first time."""
        flags = self.flags.setdefault(name, [])
        if flag in flags:
            return False
        flags.append(flag)
        return True

    def check_thresholds(
        self, name: str, utilization: float, collapse: float, saturation: float
    ) -> list[str]:
        """Flags raised now for layer ``name`` (each once a run): ``"collapse"`` when ``utilization`` is
        below ``collapse``, ``"saturation"`` when above ``saturation``."""
        crossed = [("collapse", utilization < collapse), ("saturation", utilization > saturation)]
        return [flag for flag, hit in crossed if hit and self.flag(name, flag)]

    def summary(self) -> dict[str, Any]:
        """Latest numbers per layer (with TSS, first utilization, flags and kind) and model totals."""
        out: dict[str, Any] = {"step": None, "total": None, "per_kv": None, "layers": {}}
        if self.totals.steps:
            out["step"] = self.totals.steps[-1]
            out["total"] = self.totals.total[-1]
            out["per_kv"] = self.totals.per_kv[-1]
        for name, hist in self.layers.items():
            if not hist.steps:
                continue
            layer: dict[str, Any] = {k: hist[k][-1] for k in SUMMARY_KEYS}
            if all(not math.isfinite(v) for v in hist.per_kv):
                layer.pop("per_kv")  # not a recall task
            layer["initial_utilization"] = hist.utilization[0]
            if name in self.tss:
                layer["tss"] = self.tss[name].total
                layer["tss_per_operator"] = self.tss[name].per_operator
            layer["flags"] = list(self.flags.get(name, []))
            if name in self.layer_kinds:
                layer["mixer"] = self.layer_kinds[name]
            out["layers"][name] = layer
        return out

    def state_dict(self) -> dict[str, Any]:
        """Version 3 state (module docstring): plain lists, and float32 tensors for the kept profiles."""
        layers = {name: hist.state() for name, hist in self.layers.items()}
        return {
            "version": HISTORY_VERSION,
            "history": {name: entry[0] for name, entry in layers.items()},
            "scalars": {name: entry[1] for name, entry in layers.items()},
            "profiles": {name: entry[2] for name, entry in layers.items()},
            "totals": self.totals.as_dict(),
            "tss": {name: size.as_dict() for name, size in self.tss.items()},
            "flags": {name: list(f) for name, f in self.flags.items()},
            "layer_kinds": dict(self.layer_kinds),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace everything with ``state`` (version 1, 2 or 3; missing keys read as empty); profiles beyond
        ``max_profiles`` (an older, unbounded state) are thinned."""
        version = int(state.get("version", 1))
        if version > HISTORY_VERSION:
            raise ValueError(
                f"ESS history state version {version} is newer than this ess_train reads ({HISTORY_VERSION})"
            )
        v3 = version >= 3
        scalars, profiles = state.get("scalars", {}), state.get("profiles", {})
        self.layers = {
            name: LayerHistory.from_dict(
                h, scalars.get(name, ()) if v3 else None, profiles.get(name, {}) if v3 else None
            )
            for name, h in state.get("history", {}).items()
        }
        for hist in self.layers.values():
            hist.thin(self.max_profiles)
        totals = state.get("totals") or {}
        self.totals = Totals(
            steps=[int(s) for s in totals.get("steps", [])],
            total=[float(v) for v in totals.get("total", [])],
            per_kv=[float(v) for v in totals.get("per_kv", [])],
        )
        self.tss = {
            name: LayerTSS(**{k: int(size[k]) for k in LayerTSS._field_names()})
            for name, size in state.get("tss", {}).items()
        }
        self.flags = {name: list(f) for name, f in state.get("flags", {}).items()}
        self.layer_kinds = dict(state.get("layer_kinds", {}))
