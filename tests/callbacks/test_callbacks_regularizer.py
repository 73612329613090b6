"""ESSRegularizer: the penalty is added to the user's loss with exact gradients, schedule, resume."""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch

from ess_train.callbacks import ESSRegularizer, ESSWarning
from ess_train.ess import entropy_ess
from ess_train.models.protocol import operators_of
from tests.toy_modules import ToyDataModule, ToyLM, make_trainer


class GradRecorder(pl.Callback):
    """Copies of the parameter gradients just before each optimizer step."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: p.grad.detach().cpu().clone() for n, p in pl_module.named_parameters()})


def manual_floor_penalty(model: ToyLM, inputs: torch.Tensor, target: float) -> torch.Tensor:
    """relu(target - utilization)^2 averaged over layers, entropy-ESS at all positions, all rows;
    utilization = sum_i ESS_i / sum_i min(4, i, L - i) (state_dim 4), ESS_i the row/channel mean."""
    views = operators_of(model, inputs)
    terms = []
    for view in views.values():
        ess = entropy_ess(view.op)  # [B, D, L]
        L = ess.shape[-1]
        bound = sum(min(4, i, L - i) for i in range(L))
        util = ess.mean(dim=(0, 1)).sum() / bound
        terms.append(torch.relu(target - util) ** 2)
    return torch.stack(terms).mean()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_gradients_equal_manual_penalty(accumulate, device):
    """The callback's gradients (trained on ``device``) against a manual penalty on the CPU."""
    pl.seed_everything(0)
    model = ToyLM()
    reference = copy.deepcopy(model)
    dm = ToyDataModule()
    weight, target = 0.7, 0.9
    reg = ESSRegularizer(
        weight=weight,
        mode="floor",
        min_utilization=target,
        positions=None,
        batch_rows=None,
        max_operators=None,
    )
    rec = GradRecorder()
    trainer = make_trainer(
        None,
        [reg, rec],
        max_steps=1,
        accumulate_grad_batches=accumulate,
        limit_val_batches=0,
        accelerator=device.type,
    )
    trainer.fit(model, dm)
    assert len(rec.grads) == 1
    assert "training_step" not in vars(model)  # restored at teardown

    batches = list(dm.train_dataloader())[:accumulate]
    total = 0.0
    penalties = []
    for batch in batches:
        penalty = manual_floor_penalty(reference, batch["inputs"], target)
        penalties.append(float(penalty))
        total = total + (reference.loss(batch) + weight * penalty) / accumulate
    total.backward()
    assert min(penalties) > 1e-3  # the penalty is active
    plain = copy.deepcopy(reference)
    plain.zero_grad()
    sum(plain.loss(b) / accumulate for b in batches).backward()
    differs = False
    for name, p in reference.named_parameters():
        torch.testing.assert_close(rec.grads[0][name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
        differs |= not torch.allclose(p.grad, dict(plain.named_parameters())[name].grad, atol=1e-6)
    assert differs  # the penalty changed the gradient
    assert reg.last_penalty == pytest.approx(penalties[-1], rel=1e-5)


def test_logs_schedule_and_resume(tmp_path):
    pl.seed_everything(0)
    reg = ESSRegularizer(weight=0.2, warmup_steps=10, every_n_steps=1)
    assert reg.weight_at(0) == pytest.approx(0.02) and reg.weight_at(9) == pytest.approx(0.2)
    assert reg.weight_at(50) == pytest.approx(0.2)
    trainer = make_trainer(None, [reg], max_steps=3, limit_val_batches=0)
    model = ToyLM()
    trainer.fit(model, ToyDataModule())
    cm = trainer.callback_metrics
    assert float(cm["ess/reg_weight"]) == pytest.approx(0.2 * 3 / 10)  # last step: global step 2
    assert float(cm["ess/reg_loss"]) == pytest.approx(reg.last_penalty) and reg.last_penalty > 0
    assert (reg.step, reg.num_calls) == (2, 3)
    ckpt = tmp_path / "reg.ckpt"
    trainer.save_checkpoint(ckpt)

    class StateAtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            self.state = (resumed.step, resumed.num_calls, resumed.last_penalty)

    resumed = ESSRegularizer(weight=0.2, warmup_steps=10)
    seen = StateAtStart()
    trainer2 = make_trainer(None, [resumed, seen], max_steps=5, limit_val_batches=0)
    trainer2.fit(ToyLM(), ToyDataModule(), ckpt_path=ckpt)
    assert seen.state == (2, 3, pytest.approx(reg.last_penalty))
    assert (resumed.step, resumed.num_calls) == (4, 5)
    assert float(trainer2.callback_metrics["ess/reg_weight"]) == pytest.approx(0.2 * 5 / 10)


def test_every_n_steps_and_dict_loss():
    class DictLM(ToyLM):
        def training_step(self, batch, batch_idx):
            return {"loss": self.loss(batch), "extra": 1}

    reg = ESSRegularizer(weight=0.1, every_n_steps=2, mode="decay_identity")
    trainer = make_trainer(None, [reg], max_steps=4, limit_val_batches=0)
    trainer.fit(DictLM(), ToyDataModule())
    assert reg.num_calls == 2 and reg.step == 2  # steps 0 and 2


def test_bf16_autocast(device):
    reg = ESSRegularizer(weight=0.1, min_utilization=0.9)
    trainer = make_trainer(
        None, [reg], max_steps=2, limit_val_batches=0, precision="bf16-mixed", accelerator=device.type
    )
    trainer.fit(ToyLM(), ToyDataModule())
    assert reg.last_penalty is not None and 0 < reg.last_penalty < 1
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_stands_aside_without_layers_or_with_manual_optimization():
    reg = ESSRegularizer()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(None, [reg], max_steps=2, limit_val_batches=0).fit(ToyLM(layer="mlp"), ToyDataModule())
    assert [w for w in record if issubclass(w.category, ESSWarning) and "no layer" in str(w.message)]
    assert reg.num_calls == 0

    class Manual(ToyLM):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(self.loss(batch))
            opt.step()

    reg = ESSRegularizer()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(None, [reg], max_steps=2, limit_val_batches=0).fit(Manual(), ToyDataModule())
    assert [w for w in record if issubclass(w.category, ESSWarning) and "manual" in str(w.message)]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="ceiling"):
        ESSRegularizer(mode="ceiling")
    with pytest.raises(ValueError, match="mode"):
        ESSRegularizer(mode="nope")
    with pytest.raises(ValueError, match="min_utilization"):
        ESSRegularizer(mode="floor", min_utilization=3.0)
    with pytest.raises(ValueError, match="max_ess"):
        ESSRegularizer(mode="ceiling", max_ess=None)


def test_targets_and_positions_are_named_by_what_they_mean():
    reg = ESSRegularizer(mode="ceiling", max_ess=2.0, positions=[1, 5])
    assert (reg.max_ess, reg.positions, reg.min_utilization) == (2.0, [1, 5], 0.5)
    assert ESSRegularizer().positions == 16  # 16 evenly spaced positions, as ESSMonitor(positions=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new names warn about nothing
        ESSRegularizer(mode="floor", min_utilization=0.8, positions=None)
    with pytest.raises(TypeError, match="target"):  # the old names are gone (nothing was released)
        ESSRegularizer(mode="decay_identity", target=0.3)


def test_penalty_is_logged_on_the_steps_lightning_writes(tmp_path):
    """``ess/reg_loss`` reaches the logger at every written step (log_every_n_steps=3: steps 2 and 5)."""
    from tests.toy_modules import read_metrics_csv

    reg = ESSRegularizer(weight=0.1, min_utilization=0.9)
    trainer = make_trainer(tmp_path, [reg], max_steps=7, log_every_n_steps=3, limit_val_batches=0)
    trainer.fit(ToyLM(), ToyDataModule(n=64, batch_size=4))
    logged = [int(r["step"]) for r in read_metrics_csv(trainer) if r.get("ess/reg_loss")]
    assert logged == [2, 5] and reg.num_calls == 7
