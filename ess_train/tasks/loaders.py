"""Datasets, samplers and loaders of the synthetic tasks: the in-memory dataset that returns ready batch
dicts, the DDP evaluation sampler that pads instead of repeating, and the resumable training shuffle."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torch.utils.data._utils.collate import default_collate

from .sampling import make_generator
from .task_config import IGNORE_INDEX

__all__ = [
    "TensorDictDataset",
    "PaddedEvalSampler",
    "ResumableShuffleSampler",
    "ResumableDataLoader",
    "collate_batch",
]


class TensorDictDataset(Dataset):
    """In-memory dataset of equally long rows; indexing with a list returns a ready batch dict."""

    def __init__(self, inputs: Tensor, labels: Tensor, slice_id: Tensor) -> None:
        if not (inputs.shape == labels.shape and inputs.shape[0] == slice_id.shape[0]):
            raise ValueError("inputs, labels and slice_id disagree in shape")
        self.inputs, self.labels, self.slice_id = inputs, labels, slice_id

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}

    def __getitems__(self, idx: list[int]) -> dict[str, Tensor]:
        """Rows ``idx``; the index ``len(self)`` is a padding row (a copy of row 0 whose labels are all
        ``IGNORE_INDEX``), which :class:`PaddedEvalSampler` uses so that no example is scored twice."""
        t = torch.as_tensor(idx, dtype=torch.long)
        pad = t == len(self)
        if bool(pad.any()):
            t = t.masked_fill(pad, 0)
            labels = self.labels[t].masked_fill_(pad[:, None], IGNORE_INDEX)
            return {"inputs": self.inputs[t], "labels": labels, "slice_id": self.slice_id[t]}
        return {"inputs": self.inputs[t], "labels": self.labels[t], "slice_id": self.slice_id[t]}

    def tensors(self) -> dict[str, Tensor]:
        return {"inputs": self.inputs, "labels": self.labels, "slice_id": self.slice_id}


class PaddedEvalSampler(DistributedSampler):
    """Evaluation under DDP: like ``DistributedSampler(shuffle=False)`` every rank gets the same number of
    rows (equal batch counts, so collectives never hang), but the rows that make the count divisible are
    padding rows (index ``len(dataset)``, labels ignored) instead of repeats of the first examples, so
    metrics summed over ranks count every test example exactly once."""

    def __init__(
        self, dataset: TensorDictDataset, num_replicas: int | None = None, rank: int | None = None
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        order = list(range(n)) + [n] * (self.total_size - n)
        return iter(order[self.rank : self.total_size : self.num_replicas])


class ResumableShuffleSampler(Sampler[int]):
    """A shuffle whose order depends only on ``(seed, epoch)`` (Lightning calls :meth:`set_epoch` at each
    epoch start). :meth:`resume` drops the first rows of one epoch's order, the rows a checkpointed run had
    already trained on, so a resumed run sees exactly the rows an uninterrupted one would."""

    def __init__(self, num_rows: int, seed: int) -> None:
        self.num_rows, self.seed, self.epoch = num_rows, seed, 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume(self, epoch: int, rows_done: int) -> None:
        self._resume = (int(epoch), int(rows_done))

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(
            self.num_rows, generator=make_generator(self.seed, "loader", self.epoch)
        ).tolist()
        if self._resume is not None and self._resume[0] == self.epoch:
            order = order[self._resume[1] :]
        self._resume = None
        return iter(order)

    def __len__(self) -> int:
        return self.num_rows


class ResumableDataLoader(DataLoader):
    """The training loader: its state (epoch, batches already trained on in that epoch, read from the
    trainer through ``batches_done``) is saved in Lightning checkpoints (a loader with ``state_dict`` and
    ``load_state_dict``) and restored on resume, where :class:`ResumableShuffleSampler` skips those rows."""

    def __init__(self, *args: Any, batches_done: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        epoch = getattr(self.sampler, "epoch", 0)
        return {"epoch": epoch, "batches_done": int(self.batches_done()) if self.batches_done else 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if isinstance(self.sampler, ResumableShuffleSampler):
            self.sampler.resume(state["epoch"], state["batches_done"] * int(self.batch_size or 1))


def collate_batch(batch: Any) -> dict[str, Tensor]:
    """Batches from ``TensorDictDataset.__getitems__`` are already dicts; anything else is stacked."""
    return batch if isinstance(batch, dict) else default_collate(batch)
