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

State format (:meth:`~ESSHistory.state_dict`), plain dicts and lists: ``version``, ``history`` (per layer a
dict of lists, the field names of :class:`LayerHistory`), ``totals`` (``steps``, ``total``, ``per_kv``),
``tss`` (per layer ``total``, ``per_operator``, ``multiplicity``, ``seq_len``), ``flags``, ``layer_kinds``.
Version 2 (written now) has every per-step list of every layer at full length. Version 1 (the monitor's
state before this module) has the same keys, but lists may be short or absent (checkpoints written before
tolerance profiles were kept have none; some have no ``layer_kinds``): the loader pads them with NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ess_train.measure.stats import LayerESS
    from ess_train.models.protocol import StateSize

__all__ = ["ESSHistory", "LayerHistory", "LayerTSS", "Totals", "SUMMARY_KEYS", "HISTORY_VERSION"]

#: the state format :meth:`ESSHistory.state_dict` writes; :meth:`ESSHistory.load_state_dict` reads 1 and 2.
HISTORY_VERSION = 2

#: per-step summary scalars of a layer (``LayerESS.metrics()`` keys; NaN where not measured).
SUMMARY_KEYS = ("avg_entropy", "max_entropy", "avg_tolerance", "utilization", "total", "per_kv")


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


@dataclass(eq=False)
class LayerHistory(_FieldMapping):
    """One layer's measurements, one entry per step in every list."""

    steps: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    profiles: list[list[float]] = field(default_factory=list)
    tolerance_profiles: list[list[float]] = field(default_factory=list)
    avg_entropy: list[float] = field(default_factory=list)
    max_entropy: list[float] = field(default_factory=list)
    avg_tolerance: list[float] = field(default_factory=list)
    utilization: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    per_kv: list[float] = field(default_factory=list)

    def record(self, step: int, stats: LayerESS | None) -> None:
        """Append ``stats`` at ``step`` (``None``: missing, NaN). When the evaluated positions change (the
        first measurement, or another probe length), the earlier profiles become NaN at the new width."""
        self.steps.append(step)
        if stats is None:
            width = len(self.positions) or 1
            self.profiles.append(_nan(width))
            self.tolerance_profiles.append(_nan(width))
            for key in SUMMARY_KEYS:
                getattr(self, key).append(math.nan)
            return
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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerHistory:
        """From a state dict's layer entry; short or absent per-step lists (version 1) are padded with NaN."""
        steps = [int(s) for s in data.get("steps", [])]
        positions = [int(p) for p in data.get("positions", [])]
        n, width = len(steps), len(positions) or 1

        def profiles(key: str) -> list[list[float]]:
            rows = [list(r) for r in data.get(key, [])][:n]
            return rows + [_nan(width) for _ in range(n - len(rows))]

        def scalars(key: str) -> list[float]:
            values = list(data.get(key, []))[:n]
            return values + _nan(n - len(values))

        return cls(
            steps=steps,
            positions=positions,
            profiles=profiles("profiles"),
            tolerance_profiles=profiles("tolerance_profiles"),
            **{key: scalars(key) for key in SUMMARY_KEYS},
        )


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
            self.layers.setdefault(name, LayerHistory()).record(step, layer_stats)
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
        """Plain data (copies): ``version``, ``history``, ``totals``, ``tss``, ``flags``, ``layer_kinds``."""
        return {
            "version": HISTORY_VERSION,
            "history": {name: hist.as_dict() for name, hist in self.layers.items()},
            "totals": self.totals.as_dict(),
            "tss": {name: size.as_dict() for name, size in self.tss.items()},
            "flags": {name: list(f) for name, f in self.flags.items()},
            "layer_kinds": dict(self.layer_kinds),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace everything with ``state`` (version 1 or 2; missing keys read as empty)."""
        version = int(state.get("version", 1))
        if version > HISTORY_VERSION:
            raise ValueError(
                f"ESS history state version {version} is newer than this ess_train reads ({HISTORY_VERSION})"
            )
        self.layers = {name: LayerHistory.from_dict(h) for name, h in state.get("history", {}).items()}
        totals = state.get("totals") or {}
        self.totals = Totals(
            steps=list(totals.get("steps", [])),
            total=list(totals.get("total", [])),
            per_kv=list(totals.get("per_kv", [])),
        )
        self.tss = {
            name: LayerTSS(**{k: int(size[k]) for k in LayerTSS._field_names()})
            for name, size in state.get("tss", {}).items()
        }
        self.flags = {name: list(f) for name, f in state.get("flags", {}).items()}
        self.layer_kinds = dict(state.get("layer_kinds", {}))
