"""ESSMonitor on a user-written LightningModule (tests/toy_modules.py)."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch

from ess_train.callbacks import ESSMonitor, ESSWarning
from tests import tolerances
from tests.toy_modules import ToyDataModule, ToyLM, make_trainer, read_metrics_csv

KEYS = ("avg_entropy", "max_entropy", "avg_tolerance", "utilization", "total", "per_kv")

# float32 sums and means of at most 8 rows x 8 channels x 12 positions of ESS values (all >= 0: no
# cancellation), taken in different orders by the callbacks and by the test (tests/tolerances.py)
AGG = tolerances.tol(torch.float32, n=8 * 8 * 12)


def ess_warnings(record: list[warnings.WarningMessage], text: str = "") -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, ESSWarning) and text in str(w.message)]


def test_metrics_logged_to_csv_and_callback_metrics(tmp_path, device):
    pl.seed_everything(0)
    monitor = ESSMonitor(every_n_steps=3)
    trainer = make_trainer(tmp_path, [monitor], max_steps=6, val_check_interval=4, accelerator=device.type)
    trainer.fit(ToyLM(), ToyDataModule(num_kv_pairs=3))

    rows = read_metrics_csv(trainer)
    ess_rows = [r for r in rows if r.get("ess/total")]
    # optimizer steps: 0 (train start), 3, 4 (validation end), 6; logged at Lightning's step of the batch that
    # just ran (one less), where train/loss and val/acc of the same moment are logged too
    assert monitor.totals["steps"] == [0, 3, 4, 6]
    assert [int(r["step"]) for r in ess_rows] == [0, 2, 3, 5]
    by_step = {}
    for r in rows:
        by_step.setdefault(int(r["step"]), {}).update({k: v for k, v in r.items() if v not in ("", None)})
    assert all("train/loss" in by_step[s] for s in (0, 2, 3, 5))
    assert "val/acc" in by_step[3] and "ess/total" in by_step[3]  # validation after 4 steps: one row
    for layer in ("layers.0", "layers.1"):
        for key in KEYS:
            assert all(r[f"ess/{layer}/{key}"] for r in ess_rows), key
        assert float(next(r for r in rows if r.get(f"tss/{layer}"))[f"tss/{layer}"]) == 8 * 4
    last = ess_rows[-1]
    per_op = 4
    for layer in ("layers.0", "layers.1"):
        avg = float(last[f"ess/{layer}/avg_entropy"])
        assert 0 < avg <= per_op
        assert float(last[f"ess/{layer}/max_entropy"]) >= avg
        assert float(last[f"ess/{layer}/avg_tolerance"]) <= per_op
        # sum_i ESS_i / sum_i min(per_op, i, L - i) over all 12 positions (bounds sum to 32)
        bounds = [min(per_op, i, 12 - i) for i in range(12)]
        assert sum(bounds) == 32
        util = float(last[f"ess/{layer}/utilization"])
        assert util == pytest.approx(12 * avg / sum(bounds), rel=AGG)
        assert util == pytest.approx(sum(monitor.history[layer]["profiles"][-1]) / sum(bounds), rel=AGG)
        assert 0 < util <= 1
        # 8 channels, multiplicity 1; per_kv = total / 3 kv pairs
        assert float(last[f"ess/{layer}/total"]) == pytest.approx(8 * avg, rel=AGG)
        assert float(last[f"ess/{layer}/per_kv"]) == pytest.approx(
            float(last[f"ess/{layer}/total"]) / 3, rel=AGG
        )
    assert float(last["ess/total"]) == pytest.approx(
        float(last["ess/layers.0/total"]) + float(last["ess/layers.1/total"]), rel=AGG
    )
    cm = trainer.callback_metrics
    assert "ess/layers.1/utilization" in cm and "ess/total" in cm
    # history and summary
    hist = monitor.history["layers.0"]
    assert hist["steps"] == [0, 3, 4, 6]
    assert len(hist["profiles"]) == 4 and len(hist["profiles"][0]) == len(hist["positions"]) == 12
    assert hist["profiles"][0][0] == 0.0  # ESS_0 = 0
    tol = hist["tolerance_profiles"]
    assert len(tol) == 4 and len(tol[-1]) == 12 and tol[-1][0] == 0.0
    assert sum(tol[-1]) / 12 == pytest.approx(float(last["ess/layers.0/avg_tolerance"]), rel=AGG)
    paths = monitor.save_plots(tmp_path / "plots")
    assert {p.name for p in paths} == {
        "layers.0_heatmap.png",
        "layers.0_profile.png",
        "layers.1_heatmap.png",
        "layers.1_profile.png",
        "utilization.png",
        "utilization_layers.png",
        "entropy_layers.png",
        "entropy.png",
    }
    assert all(p.stat().st_size > 1000 for p in paths)
    summary = monitor.summary()
    assert summary["step"] == 6 and summary["layers"]["layers.1"]["tss"] == 32
    assert summary["total"] == pytest.approx(float(last["ess/total"]), rel=AGG)


def test_positions_probe_batch_and_train_fallback(tmp_path):
    """A given probe batch (tuple) and a position count; no val data needed."""
    probe = (torch.randint(0, 16, (5, 12)), torch.zeros(5))
    monitor = ESSMonitor(every_n_steps=2, probe_batch=probe, probe_size=3, positions=4)
    trainer = make_trainer(None, [monitor], max_steps=2, limit_val_batches=0)
    model = ToyLM()
    trainer.fit(model, train_dataloaders=ToyDataModule().train_dataloader())
    assert monitor.history["layers.0"]["positions"] == [1, 4, 8, 11]
    assert monitor._probe[0].shape == (3, 12) and torch.equal(monitor._probe[0], probe[0][:3])
    # no probe given, no datamodule, no val loader: falls back to the training loader
    monitor2 = ESSMonitor(every_n_steps=2)
    make_trainer(None, [monitor2], max_steps=2, limit_val_batches=0).fit(
        ToyLM(), train_dataloaders=ToyDataModule().train_dataloader()
    )
    assert monitor2.totals["steps"] == [0, 2] and monitor2._probe[0].shape == (8, 12)


def test_operator_subset_scales_total(device):
    monitor = ESSMonitor(every_n_steps=2, max_operators=3)
    make_trainer(None, [monitor], max_steps=2, accelerator=device.type).fit(ToyLM(), ToyDataModule())
    hist = monitor.history["layers.0"]
    assert hist["total"][-1] == pytest.approx(8 * hist["avg_entropy"][-1], rel=AGG)  # 8 channels


def test_no_supported_layer_stands_aside(tmp_path):
    monitor = ESSMonitor(every_n_steps=1)
    trainer = make_trainer(tmp_path, [monitor], max_steps=3, val_check_interval=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(ToyLM(layer="mlp"), ToyDataModule())
    assert trainer.global_step == 3
    assert len(ess_warnings(record, "no layer implementing the ESS protocol")) == 1
    assert monitor.history == {} and monitor.summary()["layers"] == {}
    assert not any(r.get("ess/total") for r in read_metrics_csv(trainer))


def boom(module, inputs):
    raise RuntimeError("probe exploded")


class TrainModeProbe(pl.Callback):
    """Records, after the monitor ran, whether every sub-module is back in training mode."""

    def __init__(self) -> None:
        self.modes: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.modes.append(all(m.training for m in pl_module.modules()))


def test_exception_does_not_kill_training():
    monitor = ESSMonitor(every_n_steps=1, forward_fn=boom)
    probe = TrainModeProbe()
    trainer = make_trainer(None, [monitor, probe], max_steps=3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(ToyLM(), ToyDataModule())
    assert trainer.global_step == 3
    msgs = ess_warnings(record, "ESSMonitor failed")
    assert len(msgs) == 1 and "RuntimeError: probe exploded" in msgs[0] and "boom" in msgs[0]
    assert monitor.totals["steps"] == []
    assert probe.modes == [True] * 3  # eval mode restored after the failed probe


def test_exception_strict_raises():
    trainer = make_trainer(None, [ESSMonitor(every_n_steps=1, forward_fn=boom, strict=True)], max_steps=3)
    with pytest.raises(RuntimeError, match="probe exploded"):
        trainer.fit(ToyLM(), ToyDataModule())


def nan_in_last_layer(module, inputs):
    """The probe forward with NaN in layer 1's operator (b), training itself untouched."""
    handle = module.layers[1].b_proj.register_forward_hook(lambda m, a, out: out * math.nan)
    try:
        module(inputs)
    finally:
        handle.remove()


def test_nan_operator_is_missing_with_warning(tmp_path):
    monitor = ESSMonitor(every_n_steps=2, forward_fn=nan_in_last_layer)
    trainer = make_trainer(tmp_path, [monitor], max_steps=4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(ToyLM(), ToyDataModule())
    assert trainer.global_step == 4
    msgs = ess_warnings(record, "is missing")
    assert len(msgs) == 1 and "'layers.1'" in msgs[0] and "NaN" in msgs[0]
    rows = [r for r in read_metrics_csv(trainer) if r.get("ess/total")]
    assert [int(r["step"]) for r in rows] == [0, 1, 3]  # optimizer steps 0, 2, 4 (Lightning's logging step)
    assert all(float(r["ess/missing_layers"]) == 1 for r in rows)
    assert all(r["ess/layers.0/avg_entropy"] and not r.get("ess/layers.1/avg_entropy") for r in rows)
    assert float(rows[-1]["ess/total"]) == pytest.approx(float(rows[-1]["ess/layers.0/total"]))
    assert all(math.isnan(v) for v in monitor.history["layers.1"]["avg_entropy"])
    assert not any(math.isnan(v) for v in monitor.history["layers.0"]["avg_entropy"])


def test_collapse_and_saturation_warn_once_per_layer():
    monitor = ESSMonitor(every_n_steps=1, collapse_threshold=0.9, saturation_threshold=0.95)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(None, [monitor], max_steps=3).fit(ToyLM(), ToyDataModule())
    msgs = ess_warnings(record, "state collapse")
    assert len(msgs) == 2 and {"'layers.0'" in m for m in msgs} == {True, False}
    assert monitor.summary()["layers"]["layers.0"]["flags"] == ["collapse"]
    monitor = ESSMonitor(every_n_steps=1, collapse_threshold=0.0, saturation_threshold=0.01)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(None, [monitor], max_steps=3).fit(ToyLM(), ToyDataModule())
    assert len(ess_warnings(record, "state saturation")) == 2
    assert not ess_warnings(record, "state collapse")


def test_resume_restores_history_and_probe(tmp_path):
    pl.seed_everything(0)
    monitor = ESSMonitor(every_n_steps=2)
    trainer = make_trainer(None, [monitor], max_steps=4)
    model = ToyLM()
    trainer.fit(model, ToyDataModule())
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)
    assert monitor.totals["steps"] == [0, 2, 4]

    resumed = ESSMonitor(every_n_steps=2, probe_batch=torch.zeros(8, 12, dtype=torch.long))
    trainer2 = make_trainer(None, [resumed], max_steps=6)
    trainer2.fit(ToyLM(), ToyDataModule(seed=5), ckpt_path=ckpt)
    assert resumed.totals["steps"] == [0, 2, 4, 6]
    assert resumed.history["layers.0"]["steps"] == [0, 2, 4, 6]
    assert resumed.history["layers.0"]["avg_entropy"][:3] == monitor.history["layers.0"]["avg_entropy"]
    assert torch.equal(resumed._probe[0], monitor._probe[0])  # the checkpointed probe wins


def test_state_dict_keeps_the_version_1_keys_and_loads_a_version_1_state():
    """The monitor's state is the history's (``version``, ``history``, ``totals``, ``tss``, ``flags``,
    ``layer_kinds``, the keys of version 1, plus ``scalars`` and ``profiles`` since version 3) plus ``probe``,
    ``warned`` and ``plan``; a version-1 state loads and keeps measuring its positions (the history's own
    loader tests: tests/measure/test_measure_history.py)."""
    from tests.measure.test_measure_history import version1_state

    monitor = ESSMonitor()
    monitor.layer_kinds = {"layers.0": "ToyRecurrence"}  # found by setup
    monitor.load_state_dict(version1_state())
    assert monitor.history["layers.0"]["steps"] == [0, 2] and monitor.totals["steps"] == [0, 2]
    assert monitor.tss["layers.0"]["total"] == 32 and monitor.layer_kinds == {"layers.0": "ToyRecurrence"}
    assert monitor.summary()["layers"]["layers.0"]["tss"] == 32 and "media" in monitor._warned
    state = monitor.state_dict()
    v1 = {"version", "history", "totals", "tss", "flags", "layer_kinds", "probe", "warned"}
    assert set(state) == v1 | {"scalars", "profiles", "plan"}
    assert state["version"] == 3 and state["history"]["layers.0"]["steps"] == [0, 2]
    assert state["plan"]["mode"] == "given" and state["plan"]["layers"]["layers.0"]["positions"] == [0, 1, 2]


class RecordingLogger(pl.loggers.Logger):
    """A logger that records what it is sent (stands in for W&B-style media checks)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict]] = []

    @property
    def name(self) -> str:
        return "rec"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, dict(metrics)))


def test_media_on_other_loggers_is_no_warning_and_tensorboard_heatmap(tmp_path, caplog):
    """A CSV-like logger gets the scalars with one info line (the user chose it; nothing to act on), no
    ESSWarning; TensorBoard gets the heatmap image."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rec = RecordingLogger()
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    monitor = ESSMonitor(every_n_steps=2)
    with warnings.catch_warnings(record=True) as record, caplog.at_level("INFO", logger="ess_train"):
        warnings.simplefilter("always")
        make_trainer(None, [monitor], max_steps=4, val_check_interval=2, logger=[rec, tb]).fit(
            ToyLM(), ToyDataModule()
        )
    assert not ess_warnings(record, "media")
    assert sum("W&B/TensorBoard media" in r.getMessage() for r in caplog.records) == 1
    logged = {k for _, m in rec.calls for k in m}
    assert {"ess/total", "tss/total", "ess/layers.0/utilization"} <= logged
    assert not any("heatmap" in k or "profile" in k for k in logged)
    acc = EventAccumulator(tb.log_dir)
    acc.Reload()
    assert "ess/layers.0/heatmap" in acc.Tags()["images"]
    assert "ess/total" in acc.Tags()["scalars"]


def test_wandb_media(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=str(tmp_path), mode="disabled")
    sent: list[dict] = []
    monkeypatch.setattr(logger, "log_metrics", lambda metrics, step=None: sent.append(dict(metrics)))
    monitor = ESSMonitor(every_n_steps=2, strict=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(None, [monitor], max_steps=2, val_check_interval=2, logger=logger).fit(
            ToyLM(), ToyDataModule()
        )
    assert not ess_warnings(record, "W&B media")
    keys = {k for m in sent for k in m}
    assert {"ess/layers.0/profile", "ess/layers.1/heatmap", "ess/total"} <= keys
    chart = next(m["ess/layers.0/profile"] for m in sent if "ess/layers.0/profile" in m)
    assert {row[1] for row in chart.table.data} == {"entropy-ESS", "tolerance-ESS"}


def test_distributed_mode_under_parameter_sharding():
    """FSDP (GPU-only in Lightning, so checked on the strategy object; a 2-process FSDP2 run on CPU is in
    tests/callbacks/test_callbacks_sharded.py): ``distributed="auto"``
    splits the measurement across ranks there (the
    probe forward on every rank, since each all-gathers the others' shards) and keeps rank 0 alone under DDP;
    ``"rank0"`` under sharding would hang, so the monitor warns once and stands aside."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from ess_train.callbacks.lightning_glue import measure_mode, sharding_strategy

    fsdp, ddp = SimpleNamespace(strategy=FSDPStrategy()), SimpleNamespace(strategy=DDPStrategy())
    assert sharding_strategy(ddp) is None
    assert sharding_strategy(fsdp) == "FSDPStrategy"
    assert measure_mode("auto", fsdp) == "split" and measure_mode("auto", ddp) == "rank0"
    assert measure_mode("split", ddp) == "split" and measure_mode("rank0", fsdp) == "rank0"
    for strategy, distributed, split in [(fsdp, "auto", True), (ddp, "auto", False), (ddp, "split", True)]:
        monitor = ESSMonitor(distributed=distributed)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            monitor.setup(strategy, ToyLM(), "fit")
        assert not monitor._disabled and monitor._split is split and not ess_warnings(record)
    monitor = ESSMonitor(distributed="rank0")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        monitor.setup(fsdp, ToyLM(), "fit")
    assert monitor._disabled and len(ess_warnings(record, "shards the parameters")) == 1
    with pytest.raises(ValueError, match="distributed must be one of"):
        ESSMonitor(distributed="fsdp")


def test_split_mode_in_one_process_measures_as_rank0():
    """``distributed="split"`` without a process group: one rank measures every layer, the same numbers."""
    histories = []
    for distributed in ("rank0", "split"):
        pl.seed_everything(0)
        monitor = ESSMonitor(every_n_steps=2, distributed=distributed, strict=True)
        make_trainer(None, [monitor], max_steps=2, limit_val_batches=0).fit(ToyLM(), ToyDataModule())
        histories.append(monitor.state_dict())
        if distributed == "split":
            assert monitor.measured_here == {"layers.0": 2, "layers.1": 2}
            assert sorted(monitor.tss) == ["layers.0", "layers.1"]  # (with the first measurement)
    assert histories[0]["totals"] == histories[1]["totals"] and histories[0]["totals"]["steps"] == [0, 2]
    for name in ("layers.0", "layers.1"):
        a, b = histories[0]["scalars"][name], histories[1]["scalars"][name]  # (per_kv: NaN, no kv pairs)
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
