"""ESS with the Hugging Face Trainer: the monitoring TrainerCallback and the penalty in compute_loss."""

from __future__ import annotations

import math

import pytest
import torch

from tests.hf_models import model, tokens

pytest.importorskip("accelerate")

from transformers import Trainer, TrainingArguments  # noqa: E402

from ess_train.hf_trainer import ESSTrainerCallback, loss_with_ess_penalty  # noqa: E402


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, length: int = 12) -> None:
        self.ids = tokens(batch=n, length=length)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(tmp_path, steps: int = 2) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-3,
        disable_tqdm=True,
    )


def test_trainer_callback_monitors_an_hf_model(tmp_path):
    m = model("llama").train()
    cb = ESSTrainerCallback(every_n_steps=1, positions=4)
    Trainer(model=m, args=_args(tmp_path), train_dataset=_Data(), callbacks=[cb]).train()
    assert [h["step"] for h in cb.history] == [1, 2]
    key = "ess/model.layers.0.self_attn/utilization"
    assert 0 < cb.history[-1][key] <= 1 + 1e-4 and cb.history[-1]["ess/total"] > 0
    assert cb.probe.shape == (2, 12)  # the first training batch (2 rows < probe_size 4)


def test_penalty_in_compute_loss(tmp_path):
    class ESSTrainer(Trainer):
        penalties: list[float] = []

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            loss, outputs = loss_with_ess_penalty(
                model, inputs, weight=10.0, min_utilization=0.99, positions=4
            )
            self.penalties.append(float(loss - outputs.loss))
            return (loss, outputs) if return_outputs else loss

    m = model("mamba").train()
    trainer = ESSTrainer(model=m, args=_args(tmp_path), train_dataset=_Data())
    trainer.train()
    assert len(trainer.penalties) == 2 and all(p > 0 and math.isfinite(p) for p in trainer.penalties)
