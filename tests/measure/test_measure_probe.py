"""Probe batches from user batches and duck-typed loaders; the one probe forward (no_grad, eval mode)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from ess_train.measure import extract_inputs, fetch_probe, kv_pairs_for, probe_from_batch, probe_views
from ess_train.models.protocol import find_ess_layers, operators_of
from tests.toy_modules import ToyDataModule, ToyLM


def test_extract_inputs():
    x = torch.zeros(2, 3)
    assert extract_inputs({"tokens": x}, "tokens") is x and extract_inputs((x, 1)) is x
    with pytest.raises(KeyError, match="input_key"):
        extract_inputs({"x": x})


def test_probe_views_no_grad_eval_mode_context_and_forward_fn():
    torch.manual_seed(0)
    model = ToyLM()
    model.layers[1].eval()  # a sub-module's own flag survives the probe
    layers = find_ess_layers(model)
    inputs = ToyDataModule().train_dataloader().dataset.inputs[:3]
    seen = []

    @contextlib.contextmanager
    def context():  # innermost: inside no_grad and eval mode
        seen.append(("context", torch.is_grad_enabled(), model.training))
        yield

    def forward_fn(module, x):
        seen.append(("forward", torch.is_grad_enabled(), module.training))
        return module(x)

    views = probe_views(model, inputs, layers, forward_fn, context())
    assert seen == [("context", False, False), ("forward", False, False)]
    assert set(views) == set(layers) == {"layers.0", "layers.1"}
    reference = operators_of(model, inputs)
    for name, view in views.items():
        assert not view.y.requires_grad
        torch.testing.assert_close(view.y, reference[name].y)
    assert model.training and model.layers[0].training and not model.layers[1].training
    # one layer asked for: one view; a forward that calls nothing: none
    assert list(probe_views(model, inputs, {"layers.1": layers["layers.1"]})) == ["layers.1"]
    assert probe_views(model, inputs, layers, forward_fn=lambda m, x: None) == {}
    # modes are restored when the forward raises
    with pytest.raises(RuntimeError, match="boom"):
        probe_views(
            model, inputs, layers, forward_fn=lambda m, x: (_ for _ in ()).throw(RuntimeError("boom"))
        )
    assert model.training and not model.layers[1].training


def test_fetch_probe_reads_trainer_and_datamodule_attributes():
    dm = ToyDataModule()  # batches of 8, slice_id 0
    val, train = dm.val_dataloader().dataset.inputs, dm.train_dataloader().dataset.inputs
    x, sid = fetch_probe(dm, 5)  # a datamodule: its validation data first
    assert torch.equal(x, val[:5]) and torch.equal(sid, torch.zeros(5, dtype=sid.dtype))
    # a trainer-like object: datamodule first, then its own loaders (lists: the first loader)
    assert torch.equal(fetch_probe(SimpleNamespace(datamodule=dm), 12)[0], val[:12])  # two batches
    trainer = SimpleNamespace(datamodule=None, val_dataloaders=[], train_dataloader=dm.train_dataloader())
    assert torch.equal(fetch_probe(trainer, 3)[0], train[:3])
    trainer = SimpleNamespace(datamodule=None, val_dataloaders=[dm.val_dataloader()], train_dataloader=None)
    assert torch.equal(fetch_probe(trainer, 3)[0], val[:3])
    # batches without slice_id; nothing reachable
    plain = SimpleNamespace(datamodule=None, val_dataloaders=None, train_dataloader=[[(train[:2], 0)]])
    x, sid = fetch_probe(plain, 4)
    assert torch.equal(x, train[:2]) and sid is None
    assert fetch_probe(SimpleNamespace(), 4) is None and fetch_probe(None, 4) is None


def test_probe_from_batch_and_kv_pairs():
    x = torch.arange(12).reshape(4, 3)
    inputs, sid = probe_from_batch({"inputs": x, "slice_id": torch.tensor([0, 1, 1, 0])}, 3)
    assert torch.equal(inputs, x[:3]) and sid.tolist() == [0, 1, 1] and inputs.data_ptr() != x.data_ptr()
    assert probe_from_batch((x, None), 2)[1] is None
    per_slice = SimpleNamespace(slice_kv_pairs={"b": 4, "a": 2}, slice_names=["a", "b"])
    assert kv_pairs_for(per_slice, sid).tolist() == [2.0, 4.0, 4.0]
    assert float(kv_pairs_for(SimpleNamespace(num_kv_pairs=3), None)) == 3.0
    assert kv_pairs_for(SimpleNamespace(num_kv_pairs=True), None) is None and kv_pairs_for(None, sid) is None
