"""ESSMonitor's cost budget (ess_train.measure.cost) and its bounded state, checked in counts and bytes."""

from __future__ import annotations

import io
import logging
import math

import lightning.pytorch as pl
import pytest
import torch

from ess_train.callbacks import ESSMonitor
from ess_train.measure import cost as B
from ess_train.measure import resolve_positions
from ess_train.measure.planning import forward_flops
from ess_train.measure.records import read_records
from ess_train.models import SequenceModel
from tests.measure.test_measure_history import stats
from tests.toy_modules import ToyDataModule, make_trainer


def _step_flops(mixer: str, n_layers: int, seq_len: int, rows: int = 8, d_model: int = 128) -> float:
    """Counted FLOPs of one training step (forward + backward = 3 forwards) of a SequenceModel, on the meta
    device (shapes only: instant)."""
    with torch.device("meta"):
        model = SequenceModel(
            vocab_size=64, d_model=d_model, n_layers=n_layers, mixer=mixer, max_seq_len=seq_len
        )
        inputs = torch.zeros(rows, seq_len, dtype=torch.long)
    return 3 * forward_flops(model, inputs)


# ------------------------------------------------------------------------------------------------ cost model
def test_cost_model_counts_svd_work_from_shapes():
    dense = B.LayerShape("dense", 64, rows=8, operators=2)
    units = sum((64 - i) * i * (min(i, 64 - i) + B.SVD_OVERHEAD) for i in range(64))
    assert B.layer_cost(dense, None) == 16 * units * B.UNIT_FLOPS["cpu"]["dense"]
    assert B.layer_cost(dense, None, rows=2, operators=1) == 2 * units * B.UNIT_FLOPS["cpu"]["dense"]
    middle = 32 * 32 * (32 + B.SVD_OVERHEAD)  # the dearest position
    assert B.layer_cost(dense, [32]) == 16 * middle * B.UNIT_FLOPS["cpu"]["dense"]
    rec = B.LayerShape("recurrent", 64, rows=8, operators=2, state_dim=4)
    per_position = 3 * 16 * (4 + B.EIGEN_OVERHEAD)
    assert (
        B.layer_cost(rec, [1, 2]) == 16 * (4 * 64 * 16 + 2 * per_position) * B.UNIT_FLOPS["cpu"]["recurrent"]
    )
    # all positions of a dense layer are quartic in L; of a recurrent layer linear
    big = B.LayerShape("dense", 1024, rows=8, operators=2)
    mid = B.LayerShape("dense", 512, rows=8, operators=2)
    assert 13 < B.layer_cost(big, None) / B.layer_cost(mid, None) < 16  # (16 without the fixed work)
    rec_big = B.LayerShape("recurrent", 128, rows=8, operators=2, state_dim=4)
    assert 1.9 < B.layer_cost(rec_big, None) / B.layer_cost(rec, None) < 2.1


def test_12_layer_attention_at_1024_meets_the_budget_in_the_cost_model():
    """The target configuration: 12 softmax-attention layers at L = 1024, measured every 50 steps, cost at
    most 5% of the training FLOPs between two measurements, and still measure 16+ positions per layer."""
    step = _step_flops("attention", 12, 1024)
    budget = B.training_budget(step, every_n_steps=50, fraction=0.05)
    assert budget == pytest.approx(0.05 * 50 * step)
    shapes = {f"blocks.{i}.mixer": B.LayerShape("dense", 1024, rows=8, operators=1) for i in range(12)}
    forward = B.FORWARD_FACTOR * step / 3
    plan = B.plan_measurement(shapes, budget, forward=forward, step_flops=step, probe_rows=8)
    assert plan.mode == "budget" and plan.fits and plan.cost <= 0.05 * 50 * step
    # it measures 2 rows, so the probe forward runs on 2 of 8: refitted with that forward, more positions
    assert plan.rows == 2 and plan.forward == forward * 2 / 8
    unrefitted = B.plan_measurement(shapes, budget, forward=forward, step_flops=step)
    assert plan.layers["blocks.0.mixer"].positions > unrefitted.layers["blocks.0.mixer"].positions
    for name, choice in plan.layers.items():
        assert choice.positions is not None and 16 <= choice.positions < 1023, (name, choice)
        pos = resolve_positions(choice.positions, 1024)
        assert choice.cost == B.layer_cost(shapes[name], pos, choice.rows, choice.operators)
    every = sum(B.layer_cost(s, None) for s in shapes.values())
    assert every > 50 * budget  # all positions would be far over it: the budget is what keeps it at 5%


def test_recurrent_layers_get_far_more_positions_than_dense_ones():
    step = _step_flops("attention", 4, 1024)
    shapes = {
        "attn.0": B.LayerShape("dense", 1024, 8, 1),
        "attn.1": B.LayerShape("dense", 1024, 8, 1),
        "gla.0": B.LayerShape("recurrent", 1024, 8, 4, state_dim=16),
        "gla.1": B.LayerShape("recurrent", 1024, 8, 4, state_dim=16),
    }
    plan = B.plan_measurement(shapes, B.training_budget(step, 50, 0.05), step_flops=step)
    assert plan.fits
    assert plan.layers["gla.0"].positions == 256 and plan.layers["gla.0"].rows is None  # the cap, all rows
    assert plan.layers["attn.0"].positions < 256 / 4
    assert list(plan.layers) == list(shapes)  # in the model's order


def test_explicit_positions_and_no_budget_win():
    shapes = {"a": B.LayerShape("dense", 512, 8, 4)}
    given = B.plan_measurement(shapes, 1.0, positions=None)
    assert given.mode == "given" and given.layers["a"].positions is None and not given.fits
    assert B.plan_measurement(shapes, 1.0, positions=7).layers["a"].positions == 7
    assert B.plan_measurement(shapes, 1.0, positions=[3, 9]).layers["a"].positions == [3, 9]
    unbounded = B.plan_measurement(shapes, None)
    assert unbounded.mode == "all" and unbounded.layers["a"].positions is None
    tiny = B.plan_measurement(shapes, 1.0)  # nothing fits: the smallest choice, said to be over
    assert not tiny.fits and tiny.layers["a"].positions == 2 and tiny.layers["a"].rows == 1
    small = B.plan_measurement({"b": B.LayerShape("dense", 8, 2, 1)}, B.training_budget(1.0, 1, 0.05))
    assert small.mode == "all" and small.layers["b"].positions is None  # under the floor: never cut
    plan = B.MeasurementPlan.from_dict(tiny.as_dict())
    assert plan.as_dict() == tiny.as_dict() and "OVER BUDGET" in plan.describe(shapes)


# ------------------------------------------------------------------------------------------- in the monitor
def _lm(seq_len: int = 64) -> pl.LightningModule:
    from ess_train.lit import SequenceLM

    model = SequenceModel(vocab_size=16, d_model=16, n_layers=2, mixer="attention", max_seq_len=seq_len)
    return SequenceLM(model, lr=1e-3, warmup_steps=1)


def test_monitor_fits_once_says_so_and_resumes_with_the_same_choice(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(B, "BUDGET_FLOOR_FLOPS", 0.0)  # a small model: take the fraction at its word
    pl.seed_everything(0)
    monitor = ESSMonitor(every_n_steps=2, budget=1.0)  # (the probe forward alone costs about a step)
    trainer = make_trainer(
        None, [monitor], max_steps=4, enable_checkpointing=True, default_root_dir=str(tmp_path)
    )
    with caplog.at_level(logging.INFO, logger="ess_train"):
        trainer.fit(_lm(), ToyDataModule(seq_len=64))
    said = [r.getMessage() for r in caplog.records if "ESSMonitor measures" in r.getMessage()]
    assert len(said) == 1 and "dense L=64" in said[0]
    plan = monitor.plan
    assert plan is not None and plan.mode == "budget" and plan.fits and plan.cost <= plan.budget_flops
    assert plan.budget_flops == pytest.approx(1.0 * 2 * plan.step_flops)
    (choice,) = {(c.positions, c.rows, c.operators) for c in plan.layers.values()}
    assert choice[0] is not None and choice[0] < 63  # cut
    for name, hist in monitor.history.items():
        assert hist["positions"] == resolve_positions(choice[0], 64), name
    summary = monitor.summary()["measurement"]
    assert summary["mode"] == "budget" and summary["budget_fraction"] == 1.0
    assert summary["seconds"]["measurements"] == 3 and summary["seconds"]["measured_fraction"] > 0
    # the full record, next to the checkpoints
    (path,) = tmp_path.rglob("ess_history.jsonl")
    assert path.parent == tmp_path.rglob("*.ckpt").__next__().parent
    assert [r["step"] for r in read_records(path)] == [0, 2, 4]

    # resumed with another budget: the checkpoint's choice is kept (deterministic)
    ckpt = tmp_path / "at4.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = ESSMonitor(every_n_steps=2, budget=0.05)
    make_trainer(None, [resumed], max_steps=6).fit(_lm(), ToyDataModule(seq_len=64), ckpt_path=ckpt)
    assert resumed.plan.as_dict() == plan.as_dict()
    assert resumed.history[name]["steps"] == [0, 2, 4, 6]
    assert all(math.isfinite(v) for v in resumed.history[name]["profiles"][-1])


def test_explicit_positions_win_in_the_monitor(monkeypatch):
    monkeypatch.setattr(B, "BUDGET_FLOOR_FLOPS", 0.0)
    monitor = ESSMonitor(every_n_steps=2, positions="all", history_file=None)
    make_trainer(None, [monitor], max_steps=2).fit(_lm(16), ToyDataModule(seq_len=16))
    assert monitor.plan.mode == "given" and all(len(h["positions"]) == 16 for h in monitor.history.values())
    with pytest.raises(ValueError, match="positions"):
        ESSMonitor(positions="some")
    with pytest.raises(ValueError, match="budget"):
        ESSMonitor(budget=0)


def test_monitor_state_bytes_after_100_and_400_measurements_within_2x():
    """The bound, through the monitor's own state (what goes into every checkpoint)."""

    def state_bytes(n: int) -> int:
        monitor = ESSMonitor()
        for k in range(n):
            monitor.ess_history.record(
                50 * k, {f"blocks.{i}.mixer": stats(list(range(25))) for i in range(12)}
            )
        buf = io.BytesIO()
        torch.save(monitor.state_dict(), buf)
        return len(buf.getvalue())

    small, large = state_bytes(100), state_bytes(400)
    assert large < 2 * small, (small, large)
    assert large < 600_000  # 12 layers: well under a megabyte (it was ~40 kB per measurement)


# --------------------------------------------------------------------------------------------- regularizer
@pytest.mark.parametrize(("layer", "warned"), [("dense", True), ("recurrence", False)])
def test_regularizer_says_once_when_its_penalty_outweighs_training(layer, warned):
    """Its defaults hold for recurrent layers (~0.1 training steps per step at 4-32 layers, L 256-4096:
    bench_scale.py) but not for dense ones at long L: it says so once, by the cost model."""
    import warnings

    from ess_train.callbacks import ESSRegularizer
    from tests.toy_modules import ToyDense, ToyDenseNet, ToyLM

    lm = ToyLM(model=ToyDenseNet([ToyDense(d_model=8)])) if layer == "dense" else ToyLM()
    reg = ESSRegularizer(weight=1e-3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(None, [reg], max_steps=3).fit(lm, ToyDataModule(seq_len=256))
    said = [w for w in record if "training steps per regularized step" in str(w.message)]
    assert len(said) == (1 if warned else 0), [str(w.message) for w in record]
    assert reg.num_calls == 3
