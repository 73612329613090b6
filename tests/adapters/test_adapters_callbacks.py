"""ESSMonitor and ESSRegularizer on an unmodified Hugging Face model inside a user's LightningModule."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from ess_train.callbacks import ESSMonitor, ESSRegularizer
from tests.hf_models import model
from tests.toy_modules import ToyDataModule, make_trainer, read_metrics_csv


class HFLM(pl.LightningModule):
    """A user module around a transformers causal LM: nothing ESS-specific in it."""

    def __init__(self, family: str) -> None:
        super().__init__()
        self.model = model(family).train()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=inputs, use_cache=False).logits

    def training_step(self, batch, batch_idx):
        logits = self(batch["inputs"])
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@pytest.mark.parametrize(
    "family, layer",
    [
        ("llama", "model.model.layers.1.self_attn"),
        ("mamba", "model.backbone.layers.1.mixer"),
        ("mamba2", "model.backbone.layers.1.mixer"),
    ],
)
def test_monitor_and_regularizer_on_an_hf_model(tmp_path, family, layer):
    pl.seed_everything(0)
    lm = HFLM(family)
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    monitor = ESSMonitor(every_n_steps=1, positions=4)
    reg = ESSRegularizer(weight=1.0, min_utilization=0.99, positions=4)
    trainer = make_trainer(tmp_path, [monitor, reg], max_steps=2, limit_val_batches=0)
    trainer.fit(lm, ToyDataModule(vocab_size=64, seq_len=12))
    assert len(monitor.layers) == 2 and layer in monitor.layers and layer in reg.layers
    rows = [r for r in read_metrics_csv(trainer) if r.get(f"ess/{layer}/utilization")]
    assert rows, "the monitor logged nothing for the HF layer"
    util = float(rows[-1][f"ess/{layer}/utilization"])
    assert 0 < util <= 1 + 1e-4
    assert reg.num_calls == 2 and math.isfinite(reg.last_penalty) and reg.last_penalty > 0
    assert any(not torch.equal(p, before[n]) for n, p in lm.named_parameters())
