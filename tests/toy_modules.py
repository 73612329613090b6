"""Shared test helpers: a user-written LightningModule around a toy layer implementing the ESS protocol.

``ToyRecurrence`` is a plain ``nn.Module`` (not an ``ESSMixer``): a diagonal linear recurrence per channel,
``h_t = a * h_{t-1} + b_t u_t``, ``y_t = c_t . h_t``, with learnable decays ``a = sigmoid(decay_logit)``
(``[d_model, state_dim]``) and input-dependent ``b_t, c_t`` (shared by the channels). Its operator is a
``RecurrentOperator`` with batch shape ``[batch, d_model]`` and state size ``state_dim`` per channel.
It also implements ``init_search_space``/``apply_init`` (decay range).

``ToyDense`` is a protocol layer whose operator is a fixed dense ``T`` per channel (``DenseOperator``):
``"delay"`` (a delay of ``L // 2`` steps plus small lower-triangular noise: generic, every ``H_i`` full rank
with a nearly flat spectrum) or ``"gaussian"`` (random lower-triangular), with attention-like state size
``per_operator = L // 2`` (overridable, e.g. 0 like ``window=1`` sliding-window attention).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ess_train.ess import DenseOperator, RecurrentOperator
from ess_train.models.protocol import OperatorView, StateSize

__all__ = [
    "ToyRecurrence",
    "ToyDense",
    "ToyDenseNet",
    "ToyMLP",
    "ToyLM",
    "ToyDataModule",
    "TokenDataset",
    "collate_dict",
]


class ToyRecurrence(nn.Module):
    """Diagonal linear recurrence with learnable decays (user layer implementing the protocol)."""

    def __init__(
        self, d_model: int = 8, state_dim: int = 4, decay_range: tuple[float, float] = (0.0, 0.3)
    ) -> None:
        super().__init__()
        self.d_model, self.state_dim = d_model, state_dim
        self.decay_logit = nn.Parameter(torch.zeros(d_model, state_dim))
        self.in_proj = nn.Linear(d_model, d_model)
        self.b_proj = nn.Linear(d_model, state_dim)
        self.c_proj = nn.Linear(d_model, state_dim)
        self.out_proj = nn.Linear(d_model, d_model)
        self.apply_init(*decay_range)

    def init_search_space(self) -> dict[str, list[float]]:
        return {"decay_low": [0.0, 0.5, 0.9], "decay_high": [0.3, 0.9, 0.999]}

    def apply_init(self, decay_low: float = 0.0, decay_high: float = 0.3) -> None:
        with torch.no_grad():
            d = decay_low + (decay_high - decay_low) * torch.rand(self.d_model, self.state_dim)
            self.decay_logit.copy_(torch.logit(d.clamp(1e-3, 1 - 1e-3)))

    def operator(self, x: Tensor) -> OperatorView:
        B, L, D = x.shape
        N = self.state_dim
        u = self.in_proj(x).transpose(1, 2)  # [B, D, L]
        a = torch.sigmoid(self.decay_logit)[None, :, None, :].expand(B, D, L, N)
        b = self.b_proj(x)[:, None].expand(B, D, L, N)
        c = self.c_proj(x)[:, None].expand(B, D, L, N)
        op = RecurrentOperator(a, b, c, validate=False)  # like a fast layer: no checks in the forward
        return OperatorView(op=op, u=u, y=op.apply(u))

    def state_size(self, seq_len: int) -> StateSize:
        return StateSize(total=self.d_model * self.state_dim, per_operator=self.state_dim, multiplicity=1)

    def forward(self, x: Tensor) -> Tensor:
        view = self.operator(x)
        return self.out_proj(view.y.transpose(1, 2))


class ToyDense(nn.Module):
    """Fixed dense causal operator per channel (seeded), times a learnable gain; see the module doc."""

    def __init__(
        self,
        d_model: int = 8,
        kind: str = "delay",
        noise: float = 0.05,
        per_operator: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.d_model, self.kind, self.noise, self.per_operator, self.seed = (
            d_model,
            kind,
            noise,
            per_operator,
            seed,
        )
        self.gain = nn.Parameter(torch.ones(()))
        self.in_proj = nn.Linear(d_model, d_model)

    def base(self, L: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed)
        rand = torch.randn(self.d_model, L, L, generator=g).tril()
        if self.kind == "gaussian":
            return rand
        delay = torch.diag(torch.ones(L - L // 2), -(L // 2))
        return (delay + self.noise * rand).tril()

    def operator(self, x: Tensor) -> OperatorView:
        B, L, D = x.shape
        T = self.gain * self.base(L).to(x)[None].expand(B, D, L, L)
        op = DenseOperator(T, validate=False)
        u = self.in_proj(x).transpose(1, 2)
        return OperatorView(op=op, u=u, y=op.apply(u))

    def state_size(self, seq_len: int) -> StateSize:
        per_op = seq_len // 2 if self.per_operator is None else self.per_operator
        return StateSize(total=self.d_model * per_op, per_operator=per_op, multiplicity=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.operator(x).y.transpose(1, 2)


class ToyDenseNet(nn.Module):
    """Embedding, residual ``ToyDense``/``ToyRecurrence`` layers (``layers``), head: ``ToyLM(model=...)``."""

    def __init__(self, layers: list[nn.Module], vocab_size: int = 16, d_model: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, inputs: Tensor) -> Tensor:
        x = self.embed(inputs)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


class ToyMLP(nn.Module):
    """A token-wise layer without the protocol (for models with no supported layer)."""

    def __init__(self, d_model: int = 8, **_: Any) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, d_model))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ToyLM(pl.LightningModule):
    """A user-written LightningModule: embedding, residual layers, head; CE on labels != -100."""

    def __init__(
        self,
        vocab_size: int = 16,
        d_model: int = 8,
        n_layers: int = 2,
        state_dim: int = 4,
        lr: float = 1e-2,
        layer: str = "recurrence",
        optimizer: str = "sgd",
        model: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.lr, self.optimizer_name = lr, optimizer
        self.model = model
        if model is None:
            self.embed = nn.Embedding(vocab_size, d_model)
            cls = ToyRecurrence if layer == "recurrence" else ToyMLP
            self.layers = nn.ModuleList(cls(d_model=d_model, state_dim=state_dim) for _ in range(n_layers))
            self.head = nn.Linear(d_model, vocab_size)

    def forward(self, inputs: Tensor) -> Tensor:
        if self.model is not None:
            return self.model(inputs)
        x = self.embed(inputs)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        logits = self(batch["inputs"])
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(batch["inputs"])
        labels = batch["labels"]
        scored = labels != -100
        acc = ((logits.argmax(-1) == labels) & scored).sum() / scored.sum().clamp_min(1)
        self.log("val/acc", acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class TokenDataset(Dataset):
    """Random tokens; label at ``t`` is the token at ``t - delay`` (a memory task), ``-100`` before."""

    def __init__(
        self, n: int = 64, seq_len: int = 12, vocab_size: int = 16, delay: int = 3, seed: int = 0
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.inputs = torch.randint(0, vocab_size, (n, seq_len), generator=g)
        self.labels = torch.full_like(self.inputs, -100)
        self.labels[:, delay:] = self.inputs[:, :-delay]

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"inputs": self.inputs[i], "labels": self.labels[i], "slice_id": torch.tensor(0)}


def collate_dict(rows: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


class ToyDataModule(pl.LightningDataModule):
    """Dict batches like the project's tasks; ``num_kv_pairs`` set when given."""

    def __init__(
        self,
        n: int = 64,
        seq_len: int = 12,
        vocab_size: int = 16,
        batch_size: int = 8,
        num_kv_pairs: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.n, self.seq_len, self.vocab_size, self.batch_size, self.seed = (
            n,
            seq_len,
            vocab_size,
            batch_size,
            seed,
        )
        self.slice_names = ["all"]
        if num_kv_pairs is not None:
            self.num_kv_pairs = num_kv_pairs

    def train_dataloader(self) -> DataLoader:
        ds = TokenDataset(self.n, self.seq_len, self.vocab_size, seed=self.seed)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, collate_fn=collate_dict)

    def val_dataloader(self) -> DataLoader:
        ds = TokenDataset(
            max(self.n // 4, self.batch_size), self.seq_len, self.vocab_size, seed=self.seed + 1
        )
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, collate_fn=collate_dict)


def make_trainer(tmp_path: Any = None, callbacks: list | None = None, **kwargs: Any) -> pl.Trainer:
    """A quiet CPU trainer (CSVLogger in ``tmp_path`` when given, else no logger)."""
    from lightning.pytorch.loggers import CSVLogger

    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=4,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=CSVLogger(str(tmp_path), name="logs") if tmp_path is not None else False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        limit_val_batches=1,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks or [], **defaults)


def read_metrics_csv(trainer: pl.Trainer) -> list[dict[str, str]]:
    """Rows of the CSVLogger file of ``trainer`` (after ``fit``)."""
    import csv
    import os

    path = os.path.join(trainer.logger.log_dir, "metrics.csv")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
