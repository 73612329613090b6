"""``SequenceLM``: the LightningModule that trains a sequence model on a synthetic memory task.

Batches are dicts (``inputs``, ``labels`` with ``-100`` where nothing is scored, ``slice_id``).
Validation accuracy is accumulated over the whole validation set, overall and per slice
(``val/acc/<slice name>``, slice names from the datamodule), so per-setting numbers are exact.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ess_train.checks import check_float, check_int, check_non_negative_float, check_positive_float
from ess_train.tasks.metrics import SliceAccuracy, answer_accuracy

__all__ = ["SequenceLM"]


class SequenceLM(pl.LightningModule):
    """Next-token training of ``model`` (``inputs [B, L] -> logits [B, L, V]``) on labelled positions.

    Args:
        model: any module mapping token ids to logits (``ess_train.models.SequenceModel`` in the app).
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay (1-d parameters, i.e. norms and biases, are exempt).
        warmup_steps: linear warm-up steps, then cosine decay to 10% at ``trainer.max_steps``.
        betas: AdamW betas.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 50,
        betas: tuple[float, float] = (0.9, 0.98),
    ) -> None:
        super().__init__()
        check_positive_float("lr", lr)
        check_non_negative_float("weight_decay", weight_decay)
        check_int("warmup_steps", warmup_steps, low=0)
        if len(tuple(betas)) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        for i, beta in enumerate(betas):
            check_float(f"betas[{i}]", beta, 0.0, 1.0, high_open=True)
        self.model = model
        self.save_hyperparameters(ignore=["model"])
        self._val_accuracy: SliceAccuracy | None = None

    def forward(self, inputs: Tensor) -> Tensor:
        return self.model(inputs)

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy over scored positions (labels are aligned with logits: no shift)."""
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["inputs"])
        loss = self._loss(logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", answer_accuracy(logits.detach(), batch["labels"])["accuracy"], prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        names = list(getattr(dm, "slice_names", None) or ["all"])
        self._val_accuracy = SliceAccuracy(names, getattr(dm, "slice_kv_pairs", None))

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["inputs"])
        loss = self._loss(logits, batch["labels"])
        slice_id = batch.get("slice_id")
        if slice_id is None or len(self._val_accuracy.slice_names) == 1:
            slice_id = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._val_accuracy.update(logits, batch["labels"], slice_id)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def on_validation_epoch_end(self) -> None:
        acc = self._val_accuracy
        if acc.correct is None:
            return
        if self.trainer.world_size > 1:  # counts over all ranks (task data modules pad, never repeat, rows)
            acc.correct = self.all_gather(acc.correct).reshape(-1, len(acc.slice_names)).sum(0)
            acc.total = self.all_gather(acc.total).reshape(-1, len(acc.slice_names)).sum(0)
        report = acc.compute()
        self.log("val/acc", report["accuracy"], prog_bar=True, rank_zero_only=True)
        if len(acc.slice_names) > 1:
            for name in acc.slice_names:
                self.log(f"val/acc/{name}", report[f"accuracy/{name}"], rank_zero_only=True)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A resumed run's ``lr`` and ``weight_decay`` win over the optimizer state the checkpoint holds
        (``ess-train resume=<dir> optim.lr=...``: restored as saved, the new values would be silently
        ignored): each parameter group's and the schedule's base rate become ``lr``, the current rate is
        rescaled with them, and the decayed group gets ``weight_decay``."""
        hp = self.hparams
        for state in checkpoint.get("optimizer_states", []):
            for i, group in enumerate(state.get("param_groups", [])):
                base = group.get("initial_lr", group.get("lr"))
                if base and "lr" in group:
                    group["lr"] = group["lr"] * hp.lr / base
                if "initial_lr" in group:
                    group["initial_lr"] = hp.lr
                if i == 0:  # (configure_optimizers: group 0 decays, group 1 holds the 1-d parameters)
                    group["weight_decay"] = hp.weight_decay
        for scheduler in checkpoint.get("lr_schedulers", []):
            if "base_lrs" in scheduler:
                scheduler["base_lrs"] = [hp.lr for _ in scheduler["base_lrs"]]

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        max_steps = self.trainer.max_steps if self._trainer is not None else -1

        def schedule(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / (hp.warmup_steps + 1)
            if max_steps is None or max_steps <= 0:
                return 1.0
            progress = min(1.0, (step - hp.warmup_steps) / max(1, max_steps - hp.warmup_steps))
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
