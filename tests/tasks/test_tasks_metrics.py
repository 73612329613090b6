"""Answer accuracy, overall and per slice."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ess_train.tasks import MQARDataModule, SliceAccuracy, answer_accuracy


def one_hot_logits(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return F.one_hot(tokens.clamp(min=0), vocab).float()


def test_perfect_and_partial_accuracy_per_slice() -> None:
    labels = torch.tensor([[-100, 5, -100, 6], [7, -100, -100, -100], [-100, -100, 3, 3]])
    slice_id = torch.tensor([0, 1, 0])
    names, kv = ["a", "b", "c"], [2, 4, 8]
    out = answer_accuracy(one_hot_logits(labels, 10), labels, slice_id, names, kv)
    assert out["accuracy"].item() == 1.0 and out["num_answers"].item() == 5
    assert out["accuracy/a"].item() == 1.0 and out["num_answers/a"].item() == 4
    assert math.isnan(out["accuracy/c"].item()) and out["num_answers/c"].item() == 0
    assert out["kv_pairs/b"].item() == 4
    pred = labels.clone()
    pred[0, 1] = 0  # one wrong answer in slice a
    out = answer_accuracy(one_hot_logits(pred, 10), labels, slice_id, names)
    assert out["accuracy"].item() == pytest.approx(0.8)
    assert out["accuracy/a"].item() == 0.75 and out["accuracy/b"].item() == 1.0
    assert "kv_pairs/a" not in out
    assert answer_accuracy(one_hot_logits(pred, 10), labels).keys() == {"accuracy", "num_answers"}


def test_padding_and_unscored_positions_do_not_count() -> None:
    labels = torch.full((2, 5), -100)
    labels[0, 2] = 1
    logits = torch.randn(2, 5, 4)
    logits[0, 2, 1] = 100.0
    out = answer_accuracy(logits, labels)
    assert out["accuracy"].item() == 1.0 and out["num_answers"].item() == 1


def test_slice_accuracy_accumulates_counts() -> None:
    dm = MQARDataModule(
        vocab_size=64, train_slices=[[16, 2], [32, 4]], num_train=20, num_test=30, batch_size=16
    )
    dm.setup()
    acc = SliceAccuracy.for_datamodule(dm)
    g = torch.Generator().manual_seed(0)
    all_logits, all_labels, all_ids = [], [], []
    for batch in dm.val_dataloader():
        logits = torch.randn(*batch["labels"].shape, dm.vocab_size, generator=g)
        flip = torch.rand(batch["labels"].shape, generator=g) < 0.5
        logits = torch.where(flip[..., None], one_hot_logits(batch["labels"], dm.vocab_size) * 50, logits)
        acc.update(logits, batch["labels"], batch["slice_id"])
        all_logits.append(logits)
        all_labels.append(batch["labels"])
        all_ids.append(batch["slice_id"])
    got = acc.compute()
    ref = answer_accuracy(
        torch.cat(all_logits), torch.cat(all_labels), torch.cat(all_ids), dm.slice_names, dm.slice_kv_pairs
    )
    assert got.keys() == ref.keys()
    for key in got:
        assert torch.allclose(got[key].double(), ref[key].double())
    assert got["num_answers/L16_kv2"].item() == 60 and got["kv_pairs/L32_kv4"].item() == 4
    assert 0.3 < got["accuracy"].item() < 0.8
    acc.reset()
    assert math.isnan(acc.compute()["accuracy/L16_kv2"].item())


def test_half_precision_logits() -> None:
    labels = torch.tensor([[1, -100, 2]])
    out = answer_accuracy(one_hot_logits(labels, 4).half(), labels, torch.tensor([0]), ["x"])
    assert out["accuracy/x"].item() == 1.0
