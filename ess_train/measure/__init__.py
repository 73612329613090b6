"""Measuring a model's ESS: one home, below Lightning.

What ESS means for a model with protocol layers (``ess_train.models.protocol``), on top of the engine
(``ess_train.ess``): which positions (:mod:`~ess_train.measure.positions`), the per-layer statistics and the
one state-utilization definition (:mod:`~ess_train.measure.stats`), probe batches and the one probe forward
(:mod:`~ess_train.measure.probe`), the differentiable penalty (:mod:`~ess_train.measure.penalty`) and the
typed, checkpointable history of measurements over training (:mod:`~ess_train.measure.history`). The
Lightning callbacks (``ess_train.callbacks``) schedule and log these; nothing here imports Lightning, so a
script, a notebook or another trainer measures a model the same way.
"""

from ess_train.measure.history import (
    HISTORY_VERSION,
    SUMMARY_KEYS,
    ESSHistory,
    LayerHistory,
    LayerTSS,
    Totals,
)
from ess_train.measure.layers import find_layers
from ess_train.measure.penalty import MODES, Mode, ess_penalty
from ess_train.measure.positions import PositionSpec, position_bounds, resolve_positions
from ess_train.measure.probe import (
    eval_mode,
    extract_inputs,
    fetch_probe,
    kv_pairs_for,
    probe_from_batch,
    probe_rows,
    probe_views,
)
from ess_train.measure.stats import (
    LayerESS,
    compute_copy,
    concat_operators,
    entropy_profile,
    entropy_profiles,
    layer_ess,
    layer_utilization,
    no_autocast,
)
from ess_train.measure.warning import ESSWarning

__all__ = [
    "find_layers",
    "compute_copy",
    "concat_operators",
    "entropy_profile",
    "entropy_profiles",
    "ess_penalty",
    "ESSHistory",
    "ESSWarning",
    "eval_mode",
    "extract_inputs",
    "HISTORY_VERSION",
    "fetch_probe",
    "kv_pairs_for",
    "layer_ess",
    "LayerESS",
    "LayerHistory",
    "LayerTSS",
    "Mode",
    "MODES",
    "no_autocast",
    "position_bounds",
    "PositionSpec",
    "probe_from_batch",
    "probe_rows",
    "probe_views",
    "resolve_positions",
    "layer_utilization",
    "SUMMARY_KEYS",
    "Totals",
]
