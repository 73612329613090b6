"""Shared machinery for the synthetic tasks: validated configs, seeding, vectorized samplers,
train/test leakage check, on-disk cache and the LightningDataModule base class.

Batch format (docs/DESIGN.md): ``{"inputs": Long[B, L], "labels": Long[B, L], "slice_id": Long[B]}``.
Labels are already aligned with the inputs: ``labels[b, t]`` is the token the model must output at
position ``t`` after reading ``inputs[b, :t + 1]`` (no further shift), ``-100`` where nothing is scored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torch.utils.data._utils.collate import default_collate

from ess_train.checks import check_int

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
#: bump when a generator changes its output for a given config (invalidates cached datasets)
GENERATOR_VERSION = 1
#: rounds of regeneration for test rows that also occur in the training set before they are dropped
MAX_DEDUP_ROUNDS = 8


# --------------------------------------------------------------------------- errors and configs


class UnknownConfigKeyError(TypeError, ValueError):
    """A configuration key that the task does not know (a TypeError and a ValueError)."""


def _plain(value: Any) -> Any:
    """Turn OmegaConf containers (and tuples) into plain dicts/lists so configs hash and pickle."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


@dataclass
class TaskConfig:
    """Fields shared by every task.

    seed: master seed; train, test and every slice draw from disjoint seeds derived from it.
    num_train / num_test: examples per slice (MQAR slices may set their own count).
    batch_size, num_workers: DataLoader settings. cache_dir: save/load generated tensors there (None: off).
    """

    seed: int = 0
    num_train: int = 20_000
    num_test: int = 1_000
    batch_size: int = 64
    num_workers: int = 0
    cache_dir: str | None = None

    #: fields that do not change the generated data (left out of the cache key)
    LOADER_FIELDS: ClassVar[tuple[str, ...]] = ("batch_size", "num_workers", "cache_dir")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> TaskConfig:
        """Build and validate; unknown keys raise UnknownConfigKeyError listing the valid ones."""
        valid = cls.field_names()
        unknown = sorted(k for k in kwargs if k not in valid)
        if unknown:
            raise UnknownConfigKeyError(
                f"{cls.__name__}: unknown configuration key(s) {unknown}; valid keys: {sorted(valid)}"
            )
        return cls(**kwargs)

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, _plain(getattr(self, f.name)))
        self.validate()

    def replace(self, **kwargs: Any) -> TaskConfig:
        """A validated copy with some fields changed."""
        return type(self).from_kwargs(**{**dataclasses.asdict(self), **kwargs})

    def validate(self) -> None:
        """Raise ValueError naming the parameter and the bound it breaks."""
        check_int("seed", self.seed)
        check_int("num_train", self.num_train, 1)
        check_int("num_test", self.num_test, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("num_workers", self.num_workers, 0)
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, os.PathLike)):
            raise ValueError(f"cache_dir must be a path or None, got {self.cache_dir!r}")

    def data_fields(self) -> dict[str, Any]:
        """The fields that determine the generated data."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.LOADER_FIELDS}


# --------------------------------------------------------------------------- seeding and samplers


def derive_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed from the master seed and a path of names (stable across runs and platforms)."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int, *parts: Any) -> torch.Generator:
    """A CPU torch.Generator seeded with ``derive_seed(seed, *parts)`` (never the global RNG)."""
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, *parts))
    return g


def randint(high: int | Tensor, size: tuple[int, ...], g: torch.Generator) -> Tensor:
    """Uniform integers in [0, high); ``high`` may be a tensor broadcastable to ``size``."""
    if math.prod(size) == 0:
        return torch.zeros(size, dtype=torch.long)
    if isinstance(high, Tensor):
        return (torch.rand(size, generator=g, dtype=torch.float64) * high).long().clamp_(max=high - 1)
    return torch.randint(int(high), size, generator=g)


def sample_distinct(pool: int, k: int, n: int, g: torch.Generator, exclude: Tensor | None = None) -> Tensor:
    """``[n, k]`` integers from ``[0, pool)``, distinct within a row, in uniformly random order.

    ``exclude``: ``[n, m]`` values (distinct within a row, inside the pool) that rows must avoid.
    Sequential insertion (draw a rank among the remaining values, then step over the taken ones in
    ascending order): ``O(k (k + m))`` vector operations, no loop over rows.
    """
    m = 0 if exclude is None else exclude.shape[1]
    if k + m > pool:
        raise ValueError(f"cannot draw {k} distinct values from {pool - m}")
    if k == 0:
        return torch.zeros(n, 0, dtype=torch.long)
    if exclude is None and k * k > 8 * pool:
        return torch.rand(n, pool, generator=g).argsort(dim=1)[:, :k]
    if k + m <= 8:
        # few values: v = u + #{taken <= v} by fixed-point iteration (no sorting)
        taken = torch.zeros(n, 0, dtype=torch.long) if exclude is None else exclude.long()
        out = []
        for j in range(k):
            u = randint(pool - m - j, (n,), g)
            v = u
            for _ in range(taken.shape[1]):
                v = u + (taken <= v[:, None]).sum(dim=1)
            out.append(v)
            taken = torch.cat([taken, v[:, None]], dim=1)
        return torch.stack(out, dim=1)
    taken = torch.zeros(n, 0, dtype=torch.long) if exclude is None else exclude.long().sort(dim=1).values
    out = []
    for j in range(k):
        u = randint(pool - m - j, (n,), g)
        for c in range(taken.shape[1]):
            u += (u >= taken[:, c]).long()
        out.append(u)
        taken = torch.cat([taken, u[:, None]], dim=1).sort(dim=1).values
    return torch.stack(out, dim=1)


def weighted_sample_distinct(log_weights: Tensor, k: int, n: int, g: torch.Generator) -> Tensor:
    """``[n, k]`` indices drawn without replacement with probabilities proportional to
    ``exp(log_weights)``, in draw order (Gumbel-top-k; the same law as sequential draws)."""
    u = torch.rand(n, log_weights.numel(), generator=g, dtype=torch.float64).clamp_(min=1e-300)
    scores = log_weights.to(torch.float64) - torch.log(-torch.log(u))
    return scores.topk(k, dim=1, sorted=True).indices


def first_occurrence(codes: Tensor) -> Tensor:
    """For ``codes [n, S]``, the column index of the first occurrence of each entry's value in its row."""
    n, s = codes.shape
    sorted_codes, order = torch.sort(codes, dim=1, stable=True)
    is_start = torch.ones_like(sorted_codes, dtype=torch.bool)
    is_start[:, 1:] = sorted_codes[:, 1:] != sorted_codes[:, :-1]
    ar = torch.arange(s).expand(n, s)
    start_pos = torch.where(is_start, ar, torch.zeros_like(ar)).cummax(dim=1).values
    first_sorted = order.gather(1, start_pos)
    return torch.empty_like(order).scatter_(1, order, first_sorted)


# --------------------------------------------------------------------------- leakage check


_P1, _P2 = 2_147_483_647, 2_147_483_629  # primes below 2**31
_B1, _B2 = 1_000_003, 998_244_353


def row_hashes(x: Tensor, chunk: int = 8192) -> Tensor:
    """A 62-bit polynomial hash of every row of ``x [N, L]`` (two moduli, vectorized)."""
    n, length = x.shape
    pw1 = _modpow_table(_B1, _P1, length)
    pw2 = _modpow_table(_B2, _P2, length)
    out = torch.empty(n, dtype=torch.long)
    for s in range(0, n, chunk):
        r = x[s : s + chunk].long()
        h1 = (((r % _P1) * pw1) % _P1).sum(1) % _P1
        h2 = (((r % _P2) * pw2) % _P2).sum(1) % _P2
        out[s : s + chunk] = h1 * _P2 + h2
    return out


def _modpow_table(base: int, mod: int, length: int) -> Tensor:
    vals, v = [], 1
    for _ in range(length):
        vals.append(v)
        v = v * base % mod
    return torch.tensor(vals, dtype=torch.long)


def rows_in(reference: Tensor, queries: Tensor, ref_hashes: Tensor | None = None) -> Tensor:
    """Bool mask over ``queries`` rows that occur exactly in ``reference`` (hash, then compare)."""
    if queries.shape[0] == 0 or reference.shape[0] == 0:
        return torch.zeros(queries.shape[0], dtype=torch.bool)
    if ref_hashes is None:
        ref_hashes = row_hashes(reference)
    sorted_h, order = ref_hashes.sort()
    qh = row_hashes(queries)
    pos = torch.searchsorted(sorted_h, qh).clamp_(max=sorted_h.numel() - 1)
    cand = sorted_h[pos] == qh
    hit = torch.zeros_like(cand)
    idx = cand.nonzero().squeeze(1)
    if idx.numel():
        hit[idx] = (reference[order[pos[idx]]] == queries[idx]).all(dim=1)
    return hit


# --------------------------------------------------------------------------- dataset


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


# --------------------------------------------------------------------------- data module base


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
