"""ESSInitializer: deterministic greedy search over init settings that changes ESS."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from ess_train.callbacks import ESSInitializer, ESSMonitor
from tests.toy_modules import ToyDataModule, ToyLM, make_trainer, read_metrics_csv

DEFAULT = {"decay_low": 0.0, "decay_high": 0.3}


def fit_with_initializer(tmp_path=None, seed: int = 0, model_cls=ToyLM, **kwargs):
    pl.seed_everything(123)  # the model's own init
    model = model_cls()
    init = ESSInitializer(seed=seed, **kwargs)
    trainer = make_trainer(tmp_path, [init], max_steps=1, limit_val_batches=0)
    trainer.fit(model, ToyDataModule())
    return init, model, trainer


def test_changes_ess_deterministically_and_logs(tmp_path):
    init, model, trainer = fit_with_initializer(tmp_path / "a")
    again, model2, _ = fit_with_initializer(tmp_path / "b")
    assert set(init.report) == {"layers.0", "layers.1"}
    for name, entry in init.report.items():
        assert entry["setting"] != DEFAULT  # the default (short memory) is beaten
        assert entry["utilization_after"] > entry["utilization_before"] + 0.05
        assert entry["ess_after"] > entry["ess_before"]
        assert len(entry["trials"]) == 9 and entry["trials"][0]["setting"] == DEFAULT
        assert entry["utilization_after"] == pytest.approx(
            max(t["utilization"] for t in entry["trials"]), rel=1e-5
        )
        assert again.report[name]["setting"] == entry["setting"]
    for (n1, p1), (_, p2) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p1, p2), n1
    row = next(r for r in read_metrics_csv(trainer) if r.get("init/layers.0/ess_after"))
    assert float(row["init/layers.0/ess_after"]) == pytest.approx(
        init.report["layers.0"]["ess_after"], rel=1e-5
    )
    assert "init/layers.1/utilization_before" in row


def test_target_user_space_and_max_trials():
    # a metric_target: the setting closest to it
    init, _, _ = fit_with_initializer(metric_target=0.3)
    for entry in init.report.values():
        errs = [abs(t["utilization"] - 0.3) for t in entry["trials"]]
        assert abs(entry["utilization_after"] - 0.3) == pytest.approx(min(errs), abs=1e-5)
    # user search space overrides the layer's (per layer pattern)
    space = {"layers.1": {"decay_low": [0.2], "decay_high": [0.25, 0.95]}}
    init, _, _ = fit_with_initializer(search_space=space)
    assert [t["setting"] for t in init.report["layers.1"]["trials"]] == [
        {"decay_low": 0.2, "decay_high": 0.25},
        {"decay_low": 0.2, "decay_high": 0.95},
    ]
    assert init.report["layers.1"]["setting"] == {"decay_low": 0.2, "decay_high": 0.95}
    assert len(init.report["layers.0"]["trials"]) == 9
    # a random subset of the grid: defaults first, same subset for the same seed
    a, _, _ = fit_with_initializer(max_trials=4, seed=3)
    b, _, _ = fit_with_initializer(max_trials=4, seed=3)
    trials = [t["setting"] for t in a.report["layers.0"]["trials"]]
    assert len(trials) == 4 and trials[0] == DEFAULT
    assert trials == [t["setting"] for t in b.report["layers.0"]["trials"]]


def test_skipped_on_resume_and_before_monitor(tmp_path):
    init, model, trainer = fit_with_initializer()
    ckpt = tmp_path / "i.ckpt"
    trainer.save_checkpoint(ckpt)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}

    init2 = ESSInitializer()
    model2 = ToyLM()
    captured = {}

    class Snapshot(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            captured.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    make_trainer(None, [init2, Snapshot()], max_steps=2, limit_val_batches=0).fit(
        model2, ToyDataModule(), ckpt_path=ckpt
    )
    assert init2.done and init2.report.keys() == init.report.keys()
    for n, p in trained.items():
        assert torch.equal(captured[n], p), n  # the checkpoint's weights, not re-initialized

    # the monitor's first measurement (train start) sees the initialized layers
    pl.seed_everything(123)
    monitor = ESSMonitor(every_n_steps=100)
    init3 = ESSInitializer()
    make_trainer(None, [init3, monitor], max_steps=1, limit_val_batches=0).fit(ToyLM(), ToyDataModule())
    first = monitor.history["layers.1"]["utilization"][0]
    assert first == pytest.approx(init3.report["layers.1"]["utilization_after"], rel=1e-3)


def test_without_trainer_and_no_space():
    model = ToyLM()
    probe = torch.randint(0, 16, (4, 12))
    report = ESSInitializer(probe_batch=probe, include=["layers.0"]).initialize(model)
    assert list(report) == ["layers.0"]
    with pytest.warns(UserWarning, match="no layer with apply_init"):
        ESSInitializer(probe_batch=probe).initialize(ToyLM(layer="mlp"))


def test_unknown_search_space_key_is_named_before_the_search():
    probe = torch.randint(0, 16, (4, 12))
    init = ESSInitializer(probe_batch=probe, search_space={"layers.*": {"decay_hgh": [0.5]}})
    with pytest.raises(ValueError, match=r"unknown key 'decay_hgh'.*did you mean 'decay_high'"):
        init.initialize(ToyLM())


class KeywordLM(ToyLM):
    """A module whose forward needs a keyword the probe's plain ``pl_module(inputs)`` does not pass."""

    def forward(self, inputs, *, scale: float):
        return super().forward(inputs) * scale

    def loss(self, batch):
        logits = self(batch["inputs"], scale=1.0)
        return torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100
        )


def test_forward_fn_replaces_the_probe_forward():
    """forward_fn(pl_module, inputs) runs every scoring forward (no_grad, eval mode), with and without a
    trainer, and gives the same search as the plain forward of an equal model."""
    calls = []

    def forward_fn(module, inputs):
        calls.append((torch.is_grad_enabled(), module.training))
        return module(inputs, scale=1.0)

    probe = torch.randint(0, 16, (4, 12), generator=torch.Generator().manual_seed(0))
    pl.seed_everything(123)
    plain = ESSInitializer(probe_batch=probe).initialize(ToyLM())
    pl.seed_everything(123)
    model = KeywordLM()
    report = ESSInitializer(probe_batch=probe, forward_fn=forward_fn).initialize(model)
    assert len(calls) == 2 * (1 + 9 + 1) and set(calls) == {(False, False)}  # before, 9 trials, after
    assert model.training
    assert [e["setting"] for e in report.values()] == [e["setting"] for e in plain.values()]
    for name, entry in report.items():
        assert entry["utilization_after"] == pytest.approx(plain[name]["utilization_after"], rel=1e-6)
    with pytest.raises(TypeError, match="scale"):  # the plain forward cannot call this module
        ESSInitializer(probe_batch=probe).initialize(KeywordLM())
    # in fit, under the trainer's precision context
    calls.clear()
    init, _, trainer = fit_with_initializer(forward_fn=forward_fn, model_cls=KeywordLM)
    assert len(calls) == 22 and trainer.global_step == 1
    reference, _, _ = fit_with_initializer()
    assert [e["setting"] for e in init.report.values()] == [e["setting"] for e in reference.report.values()]


def test_metric_target_is_the_one_name():
    assert ESSInitializer(metric_target=0.4).metric_target == 0.4
    with pytest.raises(TypeError, match="target"):  # the old name is gone (nothing was released)
        ESSInitializer(target=0.3)
