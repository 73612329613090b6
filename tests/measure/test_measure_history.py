"""ess_train.measure.history: the typed, versioned ESS history (record, summary, state format, old states)."""

from __future__ import annotations

import io
import math

import lightning.pytorch as pl
import pytest
import torch

from ess_train.callbacks import ESSMonitor
from ess_train.measure import HISTORY_VERSION, SUMMARY_KEYS, ESSHistory, LayerESS, LayerHistory
from ess_train.measure.history import MAX_PROFILES
from ess_train.measure.records import append_record, history_from_records, measurement_record, read_records
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
    assert set(hist) == {
        "steps",
        "positions",
        "profile_steps",
        "profiles",
        "tolerance_profiles",
        *SUMMARY_KEYS,
    }
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
    assert state["version"] == HISTORY_VERSION == 3
    assert set(state) == {
        "version",
        "history",
        "scalars",
        "profiles",
        "totals",
        "tss",
        "flags",
        "layer_kinds",
    }
    assert state["history"]["a"] == {"steps": [0], "positions": [0, 1, 2]}  # plain lists
    scalars = state["scalars"]["a"]
    assert scalars.dtype == torch.float32 and scalars.shape == (1, len(SUMMARY_KEYS))  # float32: exact here
    assert scalars[0, SUMMARY_KEYS.index("total")] == 8.0
    profiles = state["profiles"]["a"]
    assert profiles["steps"] == [0] and profiles["entropy"].tolist() == [[0.0, 1.0, 2.0]]
    assert profiles["tolerance"].dtype == torch.float32 and profiles["tolerance"].tolist() == [
        [0.0, 0.5, 1.0]
    ]
    assert state["tss"] == {"a": {"total": 8, "per_operator": 2, "multiplicity": 4, "seq_len": 6}}
    assert state["flags"] == {"a": ["collapse"]} and state["totals"]["total"] == [8.0]
    state["history"]["a"]["steps"].append(99)  # a copy: the history is not changed through it
    assert history.layers["a"].steps == [0]
    loaded = ESSHistory()
    loaded.load_state_dict(history.state_dict())
    assert loaded.layers["a"].as_dict() == history.layers["a"].as_dict()
    assert loaded.totals.as_dict() == history.totals.as_dict() and loaded.flags == history.flags
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


def as_old_state(state: dict, version: int) -> dict:
    """A version-3 monitor or history state written as version 1 or 2 would have it (profiles and scalars as
    per-step lists in ``history``, no ``plan``): what checkpoints of those versions hold."""
    old = {k: v for k, v in state.items() if k not in ("scalars", "profiles", "plan")}
    old["version"] = version
    old["history"] = {}
    for name, hist in state["history"].items():
        entry = dict(hist)
        table = state["scalars"][name].double()
        entry.update({key: table[:, i].tolist() for i, key in enumerate(SUMMARY_KEYS)})
        entry["profiles"] = state["profiles"][name]["entropy"].double().tolist()
        entry["tolerance_profiles"] = state["profiles"][name]["tolerance"].double().tolist()
        old["history"][name] = entry
    return old


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
    assert history.state_dict()["version"] == 3


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
    assert {p.name for p in paths} >= {
        "a_heatmap.png",
        "a_profile.png",
        "utilization.png",
        "utilization_layers.png",
    }


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
    state["callbacks"][key] = as_old_state(state["callbacks"][key], 1)
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


# ------------------------------------------------------------------------------------- bounded history (v3)
def _record_run(history: ESSHistory, steps, layers: int = 1, width: int = 4) -> None:
    for step in steps:
        history.record(step, {f"l{i}": stats(list(range(width)), scale=1.0 + step) for i in range(layers)})


def test_profiles_are_thinned_log_spaced_with_every_scalar_kept():
    history = ESSHistory()
    steps = range(0, 50 * 400 + 1, 50)
    _record_run(history, steps)
    hist = history.layers["l0"]
    assert hist.steps == list(steps) and len(hist.avg_entropy) == 401  # every per-step scalar
    kept = hist.profile_steps
    assert len(kept) == len(hist.profiles) == len(hist.tolerance_profiles) == MAX_PROFILES
    assert kept[0] == 0 and kept[-8:] == list(steps)[-8:]  # the first and the 8 newest
    # each kept row is the profile recorded at its step (scale = 1 + step)
    assert all(row == [(1.0 + s) * p for p in range(4)] for s, row in zip(kept, hist.profiles))
    older = kept[:-8]
    assert sum(s < 2000 for s in older) > 3 * sum(s >= 10000 for s in older)  # dense early, sparse late
    gaps = [b - a for a, b in zip(older, older[1:])]
    assert gaps[-1] > 5 * gaps[0]  # log-spaced: older gaps grow with the step


def test_thinning_is_the_same_through_a_checkpoint():
    """A resumed history keeps what an uninterrupted one does (the kept set is in the state)."""
    full, first = ESSHistory(), ESSHistory()
    _record_run(full, range(0, 300))
    _record_run(first, range(0, 150))
    resumed = ESSHistory()
    resumed.load_state_dict(first.state_dict())
    _record_run(resumed, range(150, 300))
    assert resumed.layers["l0"].as_dict() == full.layers["l0"].as_dict()


def test_state_bytes_are_bounded_after_100_and_400_measurements():
    """The target: a 12-layer model's checkpointed history (25 positions, what the budget gives a 12-layer
    attention model at L = 1024) within 2x after 100 and 400 measurements, the profiles' part constant."""

    def nbytes(obj) -> int:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return len(buf.getvalue())

    sizes, profile_sizes = [], []
    for n in (100, 400):
        history = ESSHistory()
        _record_run(history, range(0, 50 * n, 50), layers=12, width=25)
        state = history.state_dict()
        sizes.append(nbytes(state))
        profile_sizes.append(nbytes(state["profiles"]))
    assert sizes[1] < 2 * sizes[0], sizes
    assert abs(profile_sizes[1] - profile_sizes[0]) < 0.01 * profile_sizes[0], profile_sizes


@pytest.mark.parametrize("version", [1, 2])
def test_an_unbounded_older_state_loads_thinned(version):
    history = ESSHistory(max_profiles=10_000)
    _record_run(history, range(0, 100))
    old = as_old_state(history.state_dict(), version)
    assert len(old["history"]["l0"]["profiles"]) == 100  # as versions 1 and 2 kept them
    loaded = ESSHistory()
    loaded.load_state_dict(old)
    hist = loaded.layers["l0"]
    assert hist.steps == list(range(100)) and hist.avg_entropy == history.layers["l0"].avg_entropy
    assert len(hist.profiles) == MAX_PROFILES and hist.profile_steps[0] == 0 and hist.profile_steps[-1] == 99
    assert all(row == [(1.0 + s) * p for p in range(4)] for s, row in zip(hist.profile_steps, hist.profiles))


def test_full_record_file_round_trip_and_resume(tmp_path):
    history = ESSHistory()
    path = tmp_path / "ess_history.jsonl"
    for step in range(0, 100, 10):
        _record_run(history, [step], layers=2)
        append_record(path, measurement_record(history, step), first=step == 0)
    records = read_records(path)
    assert [r["step"] for r in records] == list(range(0, 100, 10))
    assert (
        records[3]["layers"]["l1"]["profile"] == [0.0, 31.0, 62.0, 93.0] and records[3]["total"] == 2 * 8 * 31
    )
    # a run resumed from step 50 rewrites what came after its checkpoint
    history2 = ESSHistory()
    _record_run(history2, [50, 60])
    append_record(path, measurement_record(history2, 60), first=True)
    assert [r["step"] for r in read_records(path)] == [0, 10, 20, 30, 40, 50, 60]
    full = history_from_records(read_records(path))
    assert full.layers["l0"].profile_steps == [0, 10, 20, 30, 40, 50, 60] and full.totals.steps[-1] == 60
    assert full.layers["l1"].steps == [0, 10, 20, 30, 40, 50]  # l1 was not in the resumed record
