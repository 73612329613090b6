"""State utilization: one definition (sum_i ESS_i / sum_i min(per_operator, i, L - i)) in all callbacks."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch

import ess_train.callbacks.regularizer as regularizer_module
from ess_train.callbacks import ESSMonitor, ESSRegularizer, ESSWarning, ess_penalty
from ess_train.measure import position_bounds
from ess_train.models.protocol import find_ess_layers, operators_of
from tests.tolerances import tol
from tests.toy_modules import ToyDataModule, ToyDense, ToyDenseNet, ToyLM, ToyRecurrence, make_trainer

# float32 sums and means of at most 8 rows x 8 channels x 12 positions of ESS values (all >= 0: no
# cancellation), taken in different orders by the callbacks and by the test (tests/tolerances.py)
AGG = tol(torch.float32, n=8 * 8 * 12)


def ess_warnings(record, text: str = "") -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, ESSWarning) and text in str(w.message)]


def test_full_rank_dense_operator_saturates():
    """A generic full-rank dense operator (delay L/2 + noise, attention-like size) reaches ~1 and is flagged;
    the floor penalty is then 0 for any target up to its utilization."""
    pl.seed_everything(0)
    L = 12
    lm = ToyLM(model=ToyDenseNet([ToyDense(kind="delay")]))
    monitor = ESSMonitor(every_n_steps=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(None, [monitor], max_steps=1, limit_val_batches=0).fit(lm, ToyDataModule(seq_len=L))
    hist = monitor.history["model.layers.0"]
    util = hist["utilization"][-1]
    assert 0.95 < util <= 1 + AGG
    # the old definition (position average / largest bound) could not exceed mean(b_i) / max(b_i)
    bounds = position_bounds(L // 2, L, None)
    assert hist["avg_entropy"][-1] / (L // 2) < sum(bounds) / len(bounds) / max(bounds) + AGG < 0.6
    assert util == pytest.approx(sum(hist["profiles"][-1]) / sum(bounds), rel=AGG)
    assert monitor.flags["model.layers.0"] == ["saturation"]
    assert len(ess_warnings(record, "state saturation")) == 1
    # the regularizer's floor sees the same number: no penalty for a saturated layer
    inputs = ToyDataModule(seq_len=L).train_dataloader().dataset.inputs[:8]
    layers = find_ess_layers(lm)
    views = operators_of(lm, inputs)
    pen = ess_penalty(
        views, layers, "floor", min_utilization=0.95, positions=None, batch_rows=None, max_operators=None
    )
    assert float(pen) == 0.0


def test_zero_state_layer_is_skipped_with_a_warning():
    """per_operator == 0 (like window=1 sliding-window attention): finite loss, no NaN metric, one warning."""
    pl.seed_everything(0)
    lm = ToyLM(model=ToyDenseNet([ToyDense(per_operator=0), ToyRecurrence()]))
    reg = ESSRegularizer(weight=0.5, mode="floor", min_utilization=0.9)
    monitor = ESSMonitor(every_n_steps=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(None, [monitor, reg], max_steps=3, limit_val_batches=0).fit(lm, ToyDataModule())
    assert reg.num_calls == 3 and reg.last_penalty is not None and math.isfinite(reg.last_penalty)
    assert reg.last_penalty > 0  # the recurrence still counts
    assert math.isfinite(float(lm.trainer.callback_metrics["train/loss"]))
    assert all(math.isfinite(p.detach().sum()) for p in lm.parameters())
    assert len(ess_warnings(record, "ESSRegularizer: layer 'model.layers.0' has no state")) == 1
    assert len(ess_warnings(record, "ESSMonitor: layer 'model.layers.0' has no state")) == 1
    cm = lm.trainer.callback_metrics
    assert "ess/model.layers.0/utilization" not in cm and "ess/model.layers.0/avg_entropy" in cm
    assert math.isfinite(float(cm["ess/model.layers.1/utilization"]))
    assert "model.layers.0" not in monitor.flags or not monitor.flags["model.layers.0"]
    # only the zero-state layer: nothing applies
    layers = {"model.layers.0": find_ess_layers(lm)["model.layers.0"]}
    views = {"model.layers.0": operators_of(lm, torch.zeros(2, 12, dtype=torch.long))["model.layers.0"]}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert ess_penalty(views, layers, "floor") is None
    assert ess_warnings(record, "utilization is undefined")


def test_nonfinite_penalty_is_never_added(monkeypatch):
    monkeypatch.setattr(
        regularizer_module, "ess_penalty", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True)
    )
    pl.seed_everything(0)
    lm = ToyLM()
    reg = ESSRegularizer(weight=1.0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(None, [reg], max_steps=2, limit_val_batches=0).fit(lm, ToyDataModule())
    assert len(ess_warnings(record, "not finite")) == 1
    assert reg.num_calls == 0 and reg.last_penalty is None
    assert math.isfinite(float(lm.trainer.callback_metrics["train/loss"]))
    assert all(torch.isfinite(p).all() for p in lm.parameters())


def test_monitor_state_key_includes_cadence_and_positions():
    keys = {
        ESSMonitor(every_n_steps=10).state_key,
        ESSMonitor(every_n_steps=50).state_key,
        ESSMonitor(every_n_steps=50, positions=8).state_key,
        ESSMonitor(every_n_steps=50, positions=[1, 3]).state_key,
        ESSMonitor(every_n_steps=50, include=["layers.0"]).state_key,
    }
    assert len(keys) == 5
    assert ESSMonitor(positions=(3, 1)).state_key == ESSMonitor(positions=[1, 3]).state_key
