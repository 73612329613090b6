"""ess_train.measure.history: the typed, versioned ESS history (record, summary, state format, old states)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from ess_train.callbacks import ESSMonitor
from ess_train.measure import HISTORY_VERSION, SUMMARY_KEYS, ESSHistory, LayerESS, LayerHistory
from ess_train.models.protocol import StateSize
from tests.toy_modules import ToyDataModule, ToyLM, make_trainer


def stats(
    positions: list[int], scale: float = 1.0, per_kv: float | None = 2.0, util: float = 0.5
) -> LayerESS:
    profile = [scale * p for p in positions]
    return LayerESS(
        positions=list(positions),
        profile=profile,
        tolerance_profile=[v / 2 for v in profile],
        avg_entropy=sum(profile) / len(profile),
        max_entropy=max(profile),
        avg_tolerance=sum(profile) / len(profile) / 2,
        utilization=util,
        total=8 * scale,
        per_kv=per_kv,
        row_totals=torch.zeros(1),
    )


def test_record_missing_layers_and_logged_scalars():
    history = ESSHistory()
    scalars = history.record(0, {"a": stats([0, 1, 2]), "b": None})
    assert scalars["a/avg_entropy"] == 1.0 and scalars["a/per_kv"] == 2.0
    assert scalars["total"] == 8.0 and scalars["per_kv"] == 2.0 and scalars["missing_layers"] == 1.0
    assert not any(k.startswith("b/") for k in scalars)
    scalars = history.record(
        2, {"a": stats([0, 1, 2], per_kv=None, util=math.nan), "b": stats([0, 1, 2], 2.0)}
    )
    assert "a/utilization" not in scalars and "missing_layers" not in scalars  # undefined: not logged
    assert scalars["total"] == 24.0 and scalars["per_kv"] == 2.0
    a, b = history.layers["a"], history.layers["b"]
    assert a["steps"] == b["steps"] == [0, 2] and history.totals["steps"] == [0, 2]
    assert a.profiles == [[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]] and a.tolerance_profiles[0] == [0.0, 0.5, 1.0]
    # b was missing before its first measurement: its earlier row is NaN at the width it now has
    assert b.positions == [0, 1, 2] and all(math.isnan(v) for v in b.profiles[0] + b.tolerance_profiles[0])
    assert len(b.profiles[0]) == 3 and all(math.isnan(b[k][0]) for k in SUMMARY_KEYS)
    assert math.isnan(a.per_kv[1]) and math.isnan(a.utilization[1])
    assert history.last_step == 2
    scalars = history.record(4, {"a": None, "b": None})
    assert scalars == {"missing_layers": 2.0} and math.isnan(history.totals.total[-1])


def test_positions_change_resets_earlier_profiles():
    history = ESSHistory()
    history.record(0, {"a": stats([0, 1, 2])})
    history.record(1, {"a": stats([0, 2, 4, 6])})  # another probe length
    a = history.layers["a"]
    assert (
        a.positions == [0, 2, 4, 6] and len(a.profiles[0]) == 4 and all(math.isnan(v) for v in a.profiles[0])
    )
    assert a.profiles[1] == [0.0, 2.0, 4.0, 6.0] and a.avg_entropy == [1.0, 3.0]


def test_mapping_view_reads_like_the_old_dicts():
    history = ESSHistory()
    history.record(0, {"a": stats([0, 1])})
    hist = history.layers["a"]
    assert set(hist) == {"steps", "positions", "profiles", "tolerance_profiles", *SUMMARY_KEYS}
    assert hist.get("tolerance_profiles") == [[0.0, 0.5]] and hist.get("nope") is None
    with pytest.raises(KeyError):
        hist["record"]
    assert dict(history.totals) == {"steps": [0], "total": [8.0], "per_kv": [2.0]}


def test_summary_tss_flags_and_kinds():
    history = ESSHistory(layer_kinds={"a": "ToyRecurrence"})
    history.set_tss("a", StateSize(total=32, per_operator=4, multiplicity=1), seq_len=12)
    history.record(0, {"a": stats([0, 1], util=0.9)})
    history.record(1, {"a": stats([0, 1], util=0.01, per_kv=None)})
    assert history.check_thresholds("a", 0.01, 0.05, 0.95) == ["collapse"]
    assert history.check_thresholds("a", 0.01, 0.05, 0.95) == []  # once a run
    assert history.check_thresholds("a", 0.99, 0.05, 0.95) == ["saturation"]
    layer = history.summary()["layers"]["a"]
    assert layer["utilization"] == 0.01 and layer["initial_utilization"] == 0.9
    assert layer["tss"] == 32 and layer["tss_per_operator"] == 4 and layer["mixer"] == "ToyRecurrence"
    assert layer["flags"] == ["collapse", "saturation"] and "per_kv" in layer  # a finite per_kv once
    assert history.summary()["step"] == 1 and history.tss["a"]["seq_len"] == 12
    nokv = ESSHistory()
    nokv.record(0, {"a": stats([0, 1], per_kv=None)})
    assert "per_kv" not in nokv.summary()["layers"]["a"]  # not a recall task
    assert ESSHistory().summary() == {"step": None, "total": None, "per_kv": None, "layers": {}}


def test_state_dict_round_trip_is_plain_data():
    history = ESSHistory(layer_kinds={"a": "X"})
    history.set_tss("a", StateSize(total=8, per_operator=2, multiplicity=4), seq_len=6)
    history.record(0, {"a": stats([0, 1, 2])})
    history.check_thresholds("a", 0.0, 0.05, 0.95)
    state = history.state_dict()
    assert state["version"] == HISTORY_VERSION == 2
    assert set(state) == {"version", "history", "totals", "tss", "flags", "layer_kinds"}
    assert type(state["history"]["a"]) is dict and state["history"]["a"]["steps"] == [0]
    assert state["tss"] == {"a": {"total": 8, "per_operator": 2, "multiplicity": 4, "seq_len": 6}}
    assert state["flags"] == {"a": ["collapse"]} and state["totals"]["total"] == [8.0]
    state["history"]["a"]["steps"].append(99)  # a copy: the history is not changed through it
    assert history.layers["a"].steps == [0]
    loaded = ESSHistory()
    loaded.load_state_dict(history.state_dict())
    assert loaded.state_dict() == history.state_dict()
    loaded.record(1, {"a": stats([0, 1, 2])})
    assert loaded.layers["a"].steps == [0, 1] and loaded.totals.steps == [0, 1]


def version1_state() -> dict:
    """The monitor's state dict before ess_train.measure.history (version 1), without tolerance profiles
    (checkpoints written before they were kept) and without layer kinds."""
    hist = {"steps": [0, 2], "positions": [0, 1, 2], "profiles": [[0.0, 1.0, 1.0], [0.0, 1.5, 1.0]]}
    hist.update({k: [1.0, 2.0] for k in SUMMARY_KEYS})
    return {
        "version": 1,
        "history": {"layers.0": hist},
        "totals": {"steps": [0, 2], "total": [8.0, 9.0], "per_kv": [math.nan, math.nan]},
        "tss": {"layers.0": {"total": 32, "per_operator": 4, "multiplicity": 1, "seq_len": 12}},
        "flags": {"layers.0": []},
        "probe": None,
        "warned": ["media"],
    }


def test_loads_a_version_1_state_without_tolerance_profiles():
    history = ESSHistory()
    history.load_state_dict(version1_state())
    hist = history.layers["layers.0"]
    assert isinstance(hist, LayerHistory) and hist.steps == [0, 2] and hist.avg_entropy == [1.0, 2.0]
    tol = hist.tolerance_profiles
    assert len(tol) == 2 and all(len(r) == 3 and all(math.isnan(v) for v in r) for r in tol)
    assert history.layer_kinds == {} and history.tss["layers.0"].per_operator == 4
    history.record(4, {"layers.0": stats([0, 1, 2])})
    assert hist.steps == [0, 2, 4] and hist.tolerance_profiles[2] == [0.0, 0.5, 1.0]
    assert history.state_dict()["version"] == 2


def test_loads_a_version_1_state_with_short_lists():
    """Version 1 padded tolerance profiles only when recording; a summary key may be absent too."""
    state = version1_state()
    hist = state["history"]["layers.0"]
    hist["tolerance_profiles"] = [[0.0, 0.5, 0.5]]  # one of two steps
    del hist["avg_tolerance"]
    history = ESSHistory()
    history.load_state_dict(state)
    loaded = history.layers["layers.0"]
    assert loaded.tolerance_profiles[0] == [0.0, 0.5, 0.5] and all(
        math.isnan(v) for v in loaded.tolerance_profiles[1]
    )
    assert len(loaded.avg_tolerance) == 2 and all(math.isnan(v) for v in loaded.avg_tolerance)
    assert ESSHistory().load_state_dict({}) is None  # an empty state is an empty history


def test_refuses_a_newer_version():
    with pytest.raises(ValueError, match="newer"):
        ESSHistory().load_state_dict({"version": HISTORY_VERSION + 1})


def test_plots_take_the_plain_data_view(tmp_path):
    from ess_train.plots import save_history_plots

    history = ESSHistory(layer_kinds={"a": "X"})
    history.set_tss("a", StateSize(total=8, per_operator=2, multiplicity=4), seq_len=3)
    for step in range(3):
        history.record(step, {"a": stats([0, 1, 2], scale=1 + step)})
    paths = save_history_plots(tmp_path, history.layers, layer_kinds=history.layer_kinds, tss=history.tss)
    assert {p.name for p in paths} == {"a_heatmap.png", "a_profile.png", "utilization.png"}


# ------------------------------------------------------------------------------ through a monitor checkpoint
def test_resume_from_a_history_without_tolerance_profiles(tmp_path):
    """Checkpoints written before tolerance profiles were kept still resume: the old steps read NaN."""
    pl.seed_everything(0)
    monitor = ESSMonitor(every_n_steps=2)
    trainer = make_trainer(None, [monitor], max_steps=2)
    trainer.fit(ToyLM(), ToyDataModule())
    ckpt = tmp_path / "old.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)
    (key,) = [k for k in state["callbacks"] if k.startswith("ESSMonitor")]
    state["callbacks"][key]["version"] = 1
    for hist in state["callbacks"][key]["history"].values():
        del hist["tolerance_profiles"]
    torch.save(state, ckpt)

    resumed = ESSMonitor(every_n_steps=2)
    make_trainer(None, [resumed], max_steps=4).fit(ToyLM(), ToyDataModule(), ckpt_path=ckpt)
    hist = resumed.history["layers.0"]
    assert hist["steps"] == [0, 2, 4]
    tol = hist["tolerance_profiles"]
    assert len(tol) == 3 and all(math.isnan(v) for v in tol[0] + tol[1])
    assert all(math.isfinite(v) for v in tol[2])
    assert resumed.save_plots(tmp_path / "plots")
