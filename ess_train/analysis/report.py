"""``analyze(model, input_ids)``: exact ESS of every measured layer of a model, in one call.

Works on any ``nn.Module`` whose layers implement the protocol or are adapted (``ess_train.adapters``:
unmodified Hugging Face attention, Mamba, FalconMamba and Mamba2 layers). One ``no_grad`` eval-mode
forward captures each layer's exact operator; its ESS is computed as the operator arrives (inside the
capture) and the operator dropped, so dense attention's ``[B, H, L, L]`` never outlives its layer: the
measurement loop the callbacks run (``ess_train.measure.loop.measure_model``, streaming, with the
positions given). The module is called
``analysis`` so that ``ess_train.analyze`` stays the function.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ess_train.analysis.mixing_probe import unmeasured_mixing
from ess_train.measure.layers import find_layers
from ess_train.measure.loop import MeasurementSettings, measure_model
from ess_train.measure.positions import resolve_positions
from ess_train.measure.probe import eval_mode
from ess_train.models.protocol import layer_name

__all__ = ["LayerReport", "ESSReport", "UnsupportedModelError", "analyze", "context_length"]


class UnsupportedModelError(ValueError):
    """The model has no layer that ess_train can measure exactly."""


@dataclass
class LayerReport:
    """ESS of one layer on the analyzed batch.

    ``entropy_ess``/``tolerance_ess``: per evaluated position, averaged over batch rows and operators
    (query heads, channels); ``utilization``: ``sum_i ESS_i / sum_i min(per_operator, i, L - i)``;
    ``total_ess``: ``multiplicity * sum over operators`` of the position-averaged ESS (mean over rows);
    ``tss``: the layer's theoretical state size; ``exactness_error``: the max-relative error of the
    rebuilt output at capture (adapted layers with the check on; ``None`` otherwise).
    """

    name: str
    cls: str
    kind: str
    positions: list[int]
    entropy_ess: list[float]
    tolerance_ess: list[float] | None
    avg_entropy_ess: float
    avg_tolerance_ess: float | None
    utilization: float
    total_ess: float
    tss: int
    per_operator: int
    multiplicity: int
    operators: int
    exactness_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not math.isfinite(out["utilization"]):
            out["utilization"] = None  # JSON has no NaN
        return out


@dataclass
class ESSReport:
    """What :func:`analyze` found: ``layers`` keyed by the module names of ``model.named_modules()``."""

    model: str
    seq_len: int
    batch: int
    positions: list[int]
    layers: dict[str, LayerReport]
    not_measured: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def total_ess(self) -> float:
        return float(sum(r.total_ess for r in self.layers.values()))

    @property
    def total_tss(self) -> int:
        return int(sum(r.tss for r in self.layers.values()))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable, with the same fields (plus the totals)."""
        return {
            "model": self.model,
            "seq_len": self.seq_len,
            "batch": self.batch,
            "positions": list(self.positions),
            "total_ess": self.total_ess,
            "total_tss": self.total_tss,
            "seconds": self.seconds,
            "layers": {name: r.to_dict() for name, r in self.layers.items()},
            "not_measured": dict(self.not_measured),
        }

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def plot(self, directory: str | Path) -> list[Path]:
        """Write the ESS profiles (entropy and tolerance) and per-layer utilization as PNG files."""
        from ess_train.analysis.report_figures import save_report_plots

        return save_report_plots(self, directory)

    def table(self) -> str:
        """A plain-text table of the layers (one line each)."""
        head = f"{'layer':<34} {'class':<18} {'kind':<24} {'avg ESS':>9} {'util':>7} "
        head += f"{'total ESS':>11} {'TSS':>9}"
        lines = [head, "-" * len(head)]
        for r in self.layers.values():
            lines.append(
                f"{r.name:<34} {r.cls:<18} {r.kind:<24} {r.avg_entropy_ess:>9.3f} {r.utilization:>7.3f} "
                f"{r.total_ess:>11.1f} {r.tss:>9d}"
            )
        for name, why in self.not_measured.items():
            lines.append(f"{name:<34} not measured: {why}")
        return "\n".join(lines)


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's config allows (``max_position_embeddings``, ``n_positions``)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _not_measured(
    model: nn.Module,
    found: dict[str, Any],
    run: Callable[[int], Any],
    seq_len: int,
    length: int | None = None,
) -> dict[str, str]:
    """What is not measured, from structure (:mod:`ess_train.analysis.mixing_probe`): modules that mix along
    time and are not covered by a measured layer, and instances of adapted classes that were refused (a
    GPT-2 attention used as cross-attention)."""
    from ess_train.adapters.hf_attention import routes_through_interface
    from ess_train.adapters.registry import ADAPTERS

    out = unmeasured_mixing(model, found, run, seq_len, length)
    for name, module in model.named_modules():
        cls = type(module)
        known = f"{cls.__module__}.{cls.__qualname__}" in ADAPTERS or routes_through_interface(cls)
        if name in found or name in out or not known:
            continue
        if any(name.startswith(f + ".") for f in found if f) or any(name.startswith(f + ".") for f in out):
            continue
        why = "this instance is not a causal self-attention (e.g. cross-attention)"
        out[name] = f"{cls.__name__}: {why} (not measured)"
    return out


def _check_inputs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> None:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        got = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a [batch, L] tensor with L >= 1, got {got}")
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError(
            "analyze() refuses padded batches (attention_mask holds padding): each row must be one "
            "unpadded sequence of length L"
        )
    ctx = context_length(model)
    if ctx is not None and input_ids.shape[1] > ctx:
        raise ValueError(
            f"sequence length {input_ids.shape[1]} exceeds the model's context of {ctx} tokens "
            "(config max_position_embeddings / n_positions); use a shorter --seq-len"
        )


def analyze(
    model: nn.Module,
    input_ids: Tensor,
    positions: int | Sequence[int] | str | None = 16,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    tolerance: bool = True,
    rtol: float | None = None,
    check: bool = True,
    max_operators: int | None = None,
    attention_mask: Tensor | None = None,
    forward_fn: Callable[[nn.Module, Tensor], Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> ESSReport:
    """Exact ESS of every measured layer of ``model`` on ``input_ids`` (``[batch, L]``).

    Args:
        positions: an int ``k`` (``k`` evenly spaced positions in ``[1, L-1]``; default 16: dense attention
            ESS is quartic in ``L``), a list of positions, or ``"all"``/``None`` for every position.
        include, exclude: ``fnmatch`` patterns on layer names (``"model.layers.*.self_attn"``).
        tolerance, rtol: also compute tolerance-ESS (threshold relative to the largest singular value).
        check: the exactness check at first capture of each adapted layer (on by default).
        max_operators: evaluate an evenly spaced subset of operators per layer (``total_ess`` scaled up).
        attention_mask: refused when it holds padding (a padded row is not one causal operator).
        forward_fn: ``forward_fn(model, input_ids)`` instead of ``model(input_ids, use_cache=False)``.
        progress: called with each layer's name once its ESS is computed.

    Raises :class:`UnsupportedModelError` (listing what was found) when no layer can be measured,
    ``ValueError`` for bad input (padding, a sequence longer than the context), and
    ``ess_train.adapters.CaptureError`` when a layer's forward cannot be measured exactly.
    """
    _check_inputs(model, input_ids, attention_mask)
    spec = None if positions in (None, "all") else positions
    if isinstance(spec, str):
        raise ValueError(f"positions must be an int, a list of ints or 'all', got {positions!r}")
    L = int(input_ids.shape[1])
    evaluated = resolve_positions(spec, L)
    layers = find_layers(model, include=include, exclude=exclude)

    def run(ids: Tensor) -> Any:
        if forward_fn is not None:
            return forward_fn(model, ids)
        if getattr(model, "config", None) is not None and hasattr(model, "can_generate"):
            return model(ids, use_cache=False)  # a transformers model: a prefill forward, no cache
        return model(ids)

    measurable = find_layers(model) if include is not None or exclude is not None else layers
    with eval_mode(model):
        try:
            not_measured = _not_measured(model, measurable, lambda n: run(input_ids[:1, :n]), L)
        except Exception:
            if not layers:  # the model does not even run: the error below says what was found
                not_measured = {}
            else:  # a forward_fn of fixed shapes: probe on the input itself
                not_measured = _not_measured(model, measurable, lambda n: run(input_ids), L, length=L)
    for name, layer in measurable.items():
        if name not in layers:
            not_measured[name] = f"{_cls(layer)}: excluded by include/exclude (not measured)"
    if not layers:
        modules = dict(model.named_modules())
        classes = sorted(
            {type(m).__name__ for _, m in model.named_children()}
            | {type(modules[n]).__name__ for n in not_measured if n in modules}
        )
        raise UnsupportedModelError(
            f"{type(model).__name__} has no layer ess_train can measure exactly (no protocol layer and no "
            f"adapted class; see ess_train.adapters.ADAPTERS). Found: {', '.join(classes) or 'nothing'}; "
            f"sequence mixing not measured: {sorted(set(not_measured.values())) or 'none found'}"
        )
    for layer in layers.values():
        if hasattr(layer, "check"):
            layer.check = check
    settings = MeasurementSettings(
        positions=spec, max_operators=max_operators, tolerance=tolerance, rtol=rtol
    )
    start = time.perf_counter()
    done = measure_model(
        model,
        input_ids,
        layers,
        settings,
        forward_fn=lambda _, ids: run(ids),
        progress=progress,
        cost_plan=False,
    )
    seconds = time.perf_counter() - start
    reports: dict[str, LayerReport] = {}
    for name, result in done.results.items():  # the layers, then later call sites (name#2, ...)
        layer = layers[layer_name(name)]
        stats, size = result.stats, result.size
        if stats is None or size is None:  # not called by the forward, or a non-finite operator
            why = "not called by the forward" if size is None else "; ".join(m for _, m in result.notes)
            not_measured[name] = f"{_cls(layer)}: {why}"
            continue
        reports[name] = LayerReport(
            name=name,
            cls=_cls(layer),
            kind=str(getattr(layer, "kind", type(layer).__name__)),
            positions=list(stats.positions),
            entropy_ess=stats.profile,
            tolerance_ess=stats.tolerance_profile,
            avg_entropy_ess=stats.avg_entropy,
            avg_tolerance_ess=stats.avg_tolerance,
            utilization=stats.utilization,
            total_ess=stats.total,
            tss=int(size.total),
            per_operator=int(size.per_operator),
            multiplicity=int(size.multiplicity),
            operators=int(result.operators),
            exactness_error=getattr(layer, "checked_error", None),
        )
    return ESSReport(
        model=type(model).__name__,
        seq_len=L,
        batch=int(input_ids.shape[0]),
        positions=list(range(L)) if evaluated is None else evaluated,
        layers=reports,
        not_measured=not_measured,
        seconds=seconds,
    )


def _cls(layer: Any) -> str:
    module = getattr(layer, "module", layer)
    return type(module).__name__
