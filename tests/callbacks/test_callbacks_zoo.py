"""The callbacks on a user LightningModule around ``ess_train.models.SequenceModel`` (the mixer zoo)."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch

from ess_train.callbacks import ESSInitializer, ESSMonitor, ESSRegularizer
from ess_train.ess import entropy_ess
from ess_train.models import SequenceModel, find_ess_layers, mixer_names, operators_of
from tests.tolerances import tol
from tests.toy_modules import ToyDataModule, ToyLM, make_trainer, read_metrics_csv


def zoo_lm(mixer, n_layers: int = 2, d_model: int = 16) -> ToyLM:
    model = SequenceModel(
        vocab_size=16, d_model=d_model, n_layers=n_layers, mixer=mixer, mlp_ratio=1.0, max_seq_len=12
    )
    return ToyLM(model=model, optimizer="adam", lr=1e-3)


def test_every_mixer_monitored_and_regularized(tmp_path):
    """One layer of each zoo mixer: every operator type goes through monitor and regularizer."""
    pl.seed_everything(0)
    names = mixer_names()
    lm = zoo_lm(names, n_layers=len(names))
    monitor = ESSMonitor(every_n_steps=1, strict=True)
    reg = ESSRegularizer(weight=0.1, min_utilization=0.9, positions=4)
    trainer = make_trainer(tmp_path, [monitor, reg], max_steps=1, limit_val_batches=0)
    trainer.fit(lm, ToyDataModule())
    layers = [f"model.blocks.{i}.mixer" for i in range(len(names))]
    assert list(monitor.layers) == layers
    row = [r for r in read_metrics_csv(trainer) if r.get("ess/total")][-1]
    for layer in layers:
        for key in ("avg_entropy", "max_entropy", "avg_tolerance", "utilization", "total"):
            assert math.isfinite(float(row[f"ess/{layer}/{key}"])), (layer, key)
        # utilization <= 1, up to float32 means of 8 rows x (at most) 32 operators x 12 positions
        assert 0 <= float(row[f"ess/{layer}/utilization"]) <= 1 + tol(torch.float32, n=8 * 32 * 12), layer
    assert reg.num_calls == 1 and math.isfinite(reg.last_penalty)
    assert all(torch.isfinite(p).all() for p in lm.parameters())


def test_regularizer_no_extra_forward_and_exact_gradients():
    pl.seed_everything(0)
    lm = zoo_lm(["gla", "mamba"])
    reference = copy.deepcopy(lm)
    calls = {}
    for name, layer in find_ess_layers(lm).items():
        original = layer.operator

        def counted(x, _name=name, _original=original):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(x)

        layer.operator = counted
    weight, target = 0.5, 0.95
    reg = ESSRegularizer(
        weight=weight, min_utilization=target, positions=None, batch_rows=None, max_operators=None
    )
    grads = {}

    class Grab(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            grads.update({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()})

    dm = ToyDataModule()
    make_trainer(None, [reg, Grab()], max_steps=1, limit_val_batches=0).fit(lm, dm)
    assert calls == {"model.blocks.0.mixer": 1, "model.blocks.1.mixer": 1}  # the training forward only

    batch = next(iter(dm.train_dataloader()))
    layers = find_ess_layers(reference)
    views = operators_of(reference, batch["inputs"])
    terms = []
    for name, view in views.items():
        per_op = layers[name].state_size(view.op.seq_len).per_operator
        ess = entropy_ess(view.op)
        ess = ess.reshape(ess.shape[0], -1, ess.shape[-1])  # [B, G, L]
        L = ess.shape[-1]
        util = ess.mean(dim=(0, 1)).sum() / sum(min(per_op, i, L - i) for i in range(L))
        terms.append(torch.relu(target - util) ** 2)
    penalty = torch.stack(terms).mean()
    assert float(penalty) > 1e-3
    (reference.loss(batch) + weight * penalty).backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_initializer_on_gla_is_deterministic():
    def run():
        pl.seed_everything(0)
        lm = zoo_lm(["gla", "attention"])
        init = ESSInitializer(max_trials=4, seed=1)
        make_trainer(None, [init], max_steps=1, limit_val_batches=0).fit(lm, ToyDataModule())
        return init, lm

    a, lm_a = run()
    b, lm_b = run()
    assert list(a.report) == ["model.blocks.0.mixer"]  # attention has no init search space
    entry = a.report["model.blocks.0.mixer"]
    assert entry == b.report["model.blocks.0.mixer"]
    assert len(entry["trials"]) == 4 and entry["trials"][0]["setting"] == {"gate_logit_normalizer": 16.0}
    chosen = entry["setting"]["gate_logit_normalizer"]
    assert (
        lm_a.model.blocks[0].mixer.gate_logit_normalizer
        == chosen
        == lm_b.model.blocks[0].mixer.gate_logit_normalizer
    )
    assert entry["utilization_after"] == pytest.approx(
        max(t["utilization"] for t in entry["trials"]), rel=1e-5
    )
    assert entry["utilization_after"] >= entry["utilization_before"]


def test_bf16_autocast_zoo():
    reg = ESSRegularizer(weight=0.1, min_utilization=0.9)
    monitor = ESSMonitor(every_n_steps=1, strict=True)
    make_trainer(None, [monitor, reg], max_steps=2, limit_val_batches=0, precision="bf16-mixed").fit(
        zoo_lm(["gla", "mamba"]), ToyDataModule()
    )
    assert reg.last_penalty is not None and math.isfinite(reg.last_penalty)
    assert monitor.totals["steps"] == [0, 1, 2] and all(math.isfinite(t) for t in monitor.totals["total"])


def test_initializer_flat_search_space_on_hybrid():
    """A flat user space overrides only the keys a layer has: GLA gets it, Mamba keeps its own."""
    pl.seed_everything(0)
    lm = zoo_lm(["gla", "mamba"])
    init = ESSInitializer(max_trials=3, search_space={"gate_logit_normalizer": [16.0, 1.0]})
    make_trainer(None, [init], max_steps=1, limit_val_batches=0).fit(lm, ToyDataModule())
    gla, mamba = init.report["model.blocks.0.mixer"], init.report["model.blocks.1.mixer"]
    assert [t["setting"] for t in gla["trials"]] == [
        {"gate_logit_normalizer": 16.0},
        {"gate_logit_normalizer": 1.0},
    ]
    assert set(mamba["trials"][0]["setting"]) == {"dt_range", "a_init"} and len(mamba["trials"]) == 3
    assert all(math.isfinite(t["utilization"]) for t in mamba["trials"])
