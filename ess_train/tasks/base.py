"""The LightningDataModule base class of the synthetic tasks: seeding, chunked generation, padding to
``seq_len``, the train/test leakage check, the on-disk cache and the data loaders.

Its parts live next to it (and are re-exported here): :mod:`.config` (``TaskConfig``, ``IGNORE_INDEX``,
``UnknownConfigKeyError``), :mod:`.sampling` (seeds and vectorized samplers), :mod:`.leakage` (row
hashes) and :mod:`.loaders` (dataset, samplers, loaders).

Batch format (docs/DESIGN.md): ``{"inputs": Long[B, L], "labels": Long[B, L], "slice_id": Long[B]}``.
Labels are already aligned with the inputs: ``labels[b, t]`` is the token the model must output at
position ``t`` after reading ``inputs[b, :t + 1]`` (no further shift), ``-100`` where nothing is scored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .leakage import row_hashes, rows_in
from .loaders import (
    PaddedEvalSampler,
    ResumableDataLoader,
    ResumableShuffleSampler,
    TensorDictDataset,
    collate_batch,
)
from .sampling import (
    derive_seed,
    first_occurrence,
    make_generator,
    randint,
    sample_distinct,
    weighted_sample_distinct,
)
from .task_config import IGNORE_INDEX, TaskConfig, UnknownConfigKeyError

__all__ = [
    "GENERATOR_VERSION",
    "MAX_DEDUP_ROUNDS",
    "SyntheticTaskDataModule",
    # re-exported parts
    "IGNORE_INDEX",
    "TaskConfig",
    "UnknownConfigKeyError",
    "row_hashes",
    "rows_in",
    "PaddedEvalSampler",
    "ResumableDataLoader",
    "ResumableShuffleSampler",
    "TensorDictDataset",
    "collate_batch",
    "derive_seed",
    "first_occurrence",
    "make_generator",
    "randint",
    "sample_distinct",
    "weighted_sample_distinct",
]

log = logging.getLogger(__name__)

#: bump when a generator changes its output for a given config (invalidates cached datasets)
GENERATOR_VERSION = 1
#: rounds of regeneration for test rows that also occur in the training set before they are dropped
MAX_DEDUP_ROUNDS = 8


class SyntheticTaskDataModule(pl.LightningDataModule):
    """Base class: a task generates ``(inputs, labels)`` per slice; this class does seeding, chunking,
    padding to ``seq_len``, the train/test leakage check, caching and the data loaders.

    Subclasses set ``task_name``, ``config_cls`` and, in ``_layout()``: ``vocab_size``, ``seq_len``,
    ``slice_names``, ``slice_seq_lens``, ``pad_token`` and (recall tasks) ``num_kv_pairs`` and
    ``slice_kv_pairs``; they implement ``_plan(split)`` and ``_generate(slice_id, n, g, split)``.

    One validation dataloader (the test set) carries every slice; ``slice_id`` tells them apart.
    Rows shorter than ``seq_len`` are right-padded with ``pad_token`` and label -100.
    """

    task_name: ClassVar[str] = ""
    config_cls: ClassVar[type[TaskConfig]] = TaskConfig
    #: rows generated per call (bounds peak memory; part of the data's definition)
    CHUNK_TOKENS: ClassVar[int] = 1 << 21

    vocab_size: int
    seq_len: int
    slice_names: list[str]
    slice_seq_lens: list[int]
    pad_token: int | None
    num_kv_pairs: int | None = None
    slice_kv_pairs: list[int] | None = None

    def __init__(self, config: TaskConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = self.config_cls.from_kwargs(**kwargs)
        else:
            if not isinstance(config, self.config_cls):
                raise TypeError(f"config must be a {self.config_cls.__name__}, got {type(config).__name__}")
            config = config.replace(**kwargs)
        self.config = config
        self.save_hyperparameters(dataclasses.asdict(config))
        self.train_data: TensorDictDataset | None = None
        self.test_data: TensorDictDataset | None = None
        self.leakage_report: dict[str, int] = {}
        self._layout()

    # ---- to implement
    def _layout(self) -> None:
        raise NotImplementedError

    def _plan(self, split: str) -> list[tuple[int, int]]:
        """``[(slice_id, num_examples), ...]`` for ``split`` in {"train", "test"}."""
        raise NotImplementedError

    def _generate(self, slice_id: int, n: int, g: torch.Generator, split: str) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    # ---- generation
    def generate_slice(self, slice_id: int, n: int, split: str, *parts: Any) -> tuple[Tensor, Tensor]:
        """``n`` rows of one slice, padded to ``seq_len``, from the seed path (split, slice, *parts)."""
        g = make_generator(self.config.seed, self.task_name, split, slice_id, *parts)
        length = self.slice_seq_lens[slice_id]
        chunk = max(1, self.CHUNK_TOKENS // max(length, 1))
        xs, ys = [], []
        for start in range(0, n, chunk):
            x, y = self._generate(slice_id, min(chunk, n - start), g, split)
            xs.append(x)
            ys.append(y)
        x = torch.cat(xs) if xs else torch.zeros(0, length, dtype=torch.long)
        y = torch.cat(ys) if ys else torch.zeros(0, length, dtype=torch.long)
        if x.shape[1] < self.seq_len:
            pad = self.seq_len - x.shape[1]
            x = torch.nn.functional.pad(x, (0, pad), value=int(self.pad_token or 0))
            y = torch.nn.functional.pad(y, (0, pad), value=IGNORE_INDEX)
        return x, y

    def _generate_split(self, split: str) -> TensorDictDataset:
        xs, ys, ss = [], [], []
        for sid, n in self._plan(split):
            x, y = self.generate_slice(sid, n, split)
            xs.append(x)
            ys.append(y)
            ss.append(torch.full((n,), sid, dtype=torch.long))
        return TensorDictDataset(torch.cat(xs), torch.cat(ys), torch.cat(ss))

    def _remove_leakage(self, train: TensorDictDataset, test: TensorDictDataset) -> TensorDictDataset:
        """Regenerate (fresh seeds) test rows that also occur in training; drop what still collides."""
        train_h = row_hashes(train.inputs)
        x, y, s = test.inputs.clone(), test.labels.clone(), test.slice_id
        dup = rows_in(train.inputs, x, train_h)
        found = int(dup.sum())
        for rnd in range(1, MAX_DEDUP_ROUNDS + 1):
            if not dup.any():
                break
            for sid in s[dup].unique().tolist():
                rows = (dup & (s == sid)).nonzero().squeeze(1)
                nx, ny = self.generate_slice(sid, rows.numel(), "test", "regen", rnd)
                x[rows], y[rows] = nx, ny
            dup = rows_in(train.inputs, x, train_h)
        dropped = int(dup.sum())
        keep = ~dup
        self.leakage_report = {"test_in_train": found, "regenerated": found - dropped, "dropped": dropped}
        if found:
            log.warning(
                "%s: %d test rows also occurred in training: %d regenerated, %d dropped",
                self.task_name,
                found,
                found - dropped,
                dropped,
            )
        return TensorDictDataset(x[keep], y[keep], s[keep])

    def cache_path(self) -> str | None:
        """Cache file for this configuration (None when caching is off)."""
        if self.config.cache_dir is None:
            return None
        key = json.dumps(
            {"task": self.task_name, "version": GENERATOR_VERSION, **self.config.data_fields()},
            sort_keys=True,
            default=str,
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return os.path.join(os.fspath(self.config.cache_dir), f"{self.task_name}-{digest}.pt")

    def setup(self, stage: str | None = None) -> None:
        """Generate (or load from ``cache_dir``) the train and test sets; idempotent."""
        if self.train_data is not None:
            return
        path = self.cache_path()
        if path is not None and os.path.exists(path):
            blob = torch.load(path, weights_only=True)
            self.train_data = TensorDictDataset(**blob["train"])
            self.test_data = TensorDictDataset(**blob["test"])
            self.leakage_report = dict(blob["leakage_report"])
            return
        train = self._generate_split("train")
        test = self._remove_leakage(train, self._generate_split("test"))
        self.train_data, self.test_data = train, test
        if path is not None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            torch.save(
                {"train": train.tensors(), "test": test.tensors(), "leakage_report": self.leakage_report}, tmp
            )
            os.replace(tmp, path)

    # ---- loaders
    def _loader(self, data: TensorDictDataset, shuffle: bool) -> DataLoader:
        c = self.config
        common = dict(
            batch_size=c.batch_size,
            num_workers=c.num_workers,
            collate_fn=collate_batch,
            persistent_workers=c.num_workers > 0,
        )
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not shuffle:
            # evaluation under DDP: padding rows instead of DistributedSampler's repeats (Lightning keeps a
            # sampler that is already a DistributedSampler)
            return DataLoader(data, sampler=PaddedEvalSampler(data) if distributed else None, **common)
        if distributed:  # Lightning's DistributedSampler: seeded, set_epoch per epoch
            return DataLoader(data, shuffle=True, generator=make_generator(c.seed, "loader"), **common)
        sampler = ResumableShuffleSampler(len(data), c.seed)
        return ResumableDataLoader(data, sampler=sampler, batches_done=self._batches_done, **common)

    def _batches_done(self) -> int:
        """Batches trained on so far in the current epoch (what a resumed run must skip)."""
        trainer = self.trainer
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.train_data, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """The test set, every slice in one loader (use ``batch["slice_id"]`` for per-slice metrics)."""
        self.setup("validate")
        return self._loader(self.test_data, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return self._loader(self.test_data, shuffle=False)

    def describe(self) -> dict[str, Any]:
        """Attributes used downstream, as a dict (for logging)."""
        return {
            "task": self.task_name,
            "vocab_size": self.vocab_size,
            "seq_len": self.seq_len,
            "slice_names": list(self.slice_names),
            "pad_token": self.pad_token,
            "num_kv_pairs": self.num_kv_pairs,
            "slice_kv_pairs": self.slice_kv_pairs,
        }
