"""Multi-query associative recall (MQAR) with the semantics of Zoology (HazyResearch/zoology,
``zoology/data/associative_recall.py::multiquery_ar``), vectorized and seeded.

Layout of one row of length L with k key-value pairs (vocabulary V):
``k1 v1 k2 v2 ... kk vk | query block of L - 2k tokens``. Keys are distinct, drawn from ``[1, V/2)``,
values distinct, from ``[V/2, V)``. Every key is queried once in the query block, at offset
``2 * gap`` with gaps drawn without replacement from ``{0, ..., (L - 2k)/2 - 1}`` with probability
``~ (gap + 1) ** (power_a - 1)`` (power law: most queries come soon after the context; the i-th key
takes the i-th drawn gap, as in Zoology). The label at a query position is that key's value; every
other label is -100. The other query-block tokens are 0, or, with ``random_non_queries``, uniform
tokens from ``[0, V)`` (Zoology's semantics; here drawn from the task's seeded generator).

Mixtures: ``train_slices`` / ``test_slices`` list settings ``[seq_len, num_kv_pairs]`` or
``[seq_len, num_kv_pairs, num_examples]`` (or dicts with those keys), like Zoology's Based recipe.
Rows of every slice are right-padded to the longest slice with token 0 (``pad_token``), label -100.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ess_train.checks import check_bool, check_float, check_int

from .base import (
    IGNORE_INDEX,
    SyntheticTaskDataModule,
    TaskConfig,
    randint,
    sample_distinct,
    weighted_sample_distinct,
)

DEFAULT_SEQ_LEN = 64
DEFAULT_NUM_KV_PAIRS = 4


class MQARSlice(NamedTuple):
    """One (seq_len, num_kv_pairs) setting and how many examples to draw for it."""

    seq_len: int
    num_kv_pairs: int
    num_examples: int

    @property
    def name(self) -> str:
        return f"L{self.seq_len}_kv{self.num_kv_pairs}"


def check_mqar(vocab_size: int, seq_len: int, num_kv_pairs: int, where: str = "") -> None:
    """Zoology's bounds, as ValueErrors naming the parameter."""
    check_int(f"{where}seq_len", seq_len, 4)
    if seq_len % 2:
        raise ValueError(f"{where}seq_len={seq_len} must be even (key-value pairs and query slots are pairs)")
    check_int(f"{where}num_kv_pairs", num_kv_pairs, 1)
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(
            f"{where}num_kv_pairs={num_kv_pairs} is too many for seq_len={seq_len}: "
            f"need 4 * num_kv_pairs <= seq_len (Zoology's bound), i.e. <= {seq_len // 4}"
        )
    if vocab_size <= seq_len:
        raise ValueError(f"vocab_size={vocab_size} must be > {where}seq_len={seq_len} (Zoology's bound)")
    if num_kv_pairs > vocab_size // 2 - 1 or num_kv_pairs > vocab_size - vocab_size // 2:
        raise ValueError(
            f"{where}num_kv_pairs={num_kv_pairs} exceeds the {vocab_size // 2 - 1} "
            f"distinct keys of vocab_size={vocab_size}"
        )


def generate_mqar(
    n: int,
    seq_len: int,
    num_kv_pairs: int,
    vocab_size: int,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """``n`` MQAR rows: ``(inputs, labels)``, both ``Long[n, seq_len]`` (see module docstring)."""
    check_mqar(vocab_size, seq_len, num_kv_pairs)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    k, half = num_kv_pairs, vocab_size // 2
    keys = sample_distinct(half - 1, k, n, g) + 1
    values = sample_distinct(vocab_size - half, k, n, g) + half
    ctx = 2 * k
    space = (seq_len - ctx) // 2
    log_w = (power_a - 1.0) * torch.log(torch.arange(1, space + 1, dtype=torch.float64))
    gaps = weighted_sample_distinct(log_w, k, n, g)
    qpos = ctx + 2 * gaps
    inputs = torch.zeros(n, seq_len, dtype=torch.long)
    inputs[:, 0:ctx:2] = keys
    inputs[:, 1:ctx:2] = values
    inputs.scatter_(1, qpos, keys)
    labels = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    labels.scatter_(1, qpos, values)
    if random_non_queries:
        filler = randint(vocab_size, (n, seq_len), g)
        inputs = torch.where(inputs == 0, filler, inputs)
    return inputs, labels


@dataclass
class MQARConfig(TaskConfig):
    """MQAR parameters.

    vocab_size: V; keys from [1, V/2), values from [V/2, V); must exceed every seq_len.
    seq_len, num_kv_pairs: the single setting (default 64 and 4) when ``train_slices`` is None;
        giving them together with ``train_slices`` is an error (never silently ignored).
    power_a / test_power_a: power-law exponent of the query gaps for train / test (None: power_a).
    random_non_queries: fill non-query slots with random tokens (else 0).
    train_slices / test_slices: mixture settings (see module docstring); test_slices defaults to the
        train settings with ``num_test`` examples each.
    """

    num_train: int = 20_000
    num_test: int = 1_000
    vocab_size: int = 128
    seq_len: int | None = None
    num_kv_pairs: int | None = None
    power_a: float = 0.01
    test_power_a: float | None = None
    random_non_queries: bool = True
    train_slices: list[Any] | None = None
    test_slices: list[Any] | None = None

    def _parse_slices(self, name: str, raw: Any, default_n: int) -> list[MQARSlice]:
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"{name} must be a non-empty list of [seq_len, num_kv_pairs(, num_examples)]")
        out = []
        for i, item in enumerate(raw):
            if isinstance(item, dict):
                allowed = {"seq_len", "num_kv_pairs", "num_examples"}
                unknown = sorted(set(item) - allowed)
                if unknown or not {"seq_len", "num_kv_pairs"} <= set(item):
                    raise ValueError(
                        f"{name}[{i}]={item}: keys must be seq_len, num_kv_pairs and optionally "
                        f"num_examples (unknown: {unknown})"
                    )
                vals = [item["seq_len"], item["num_kv_pairs"], item.get("num_examples", default_n)]
            elif isinstance(item, list) and len(item) in (2, 3):
                vals = list(item) + ([default_n] if len(item) == 2 else [])
            else:
                raise ValueError(
                    f"{name}[{i}]={item!r} must be [seq_len, num_kv_pairs] or "
                    f"[seq_len, num_kv_pairs, num_examples]"
                )
            s = MQARSlice(*vals)
            check_mqar(self.vocab_size, s.seq_len, s.num_kv_pairs, where=f"{name}[{i}].")
            check_int(f"{name}[{i}].num_examples", s.num_examples, 1)
            out.append(s)
        return out

    def resolved_slices(self) -> tuple[list[MQARSlice], list[MQARSlice]]:
        """``(train, test)`` slice lists after defaults."""
        if self.train_slices is None:
            single = [
                DEFAULT_SEQ_LEN if self.seq_len is None else self.seq_len,
                DEFAULT_NUM_KV_PAIRS if self.num_kv_pairs is None else self.num_kv_pairs,
            ]
            train = self._parse_slices("train_slices", [single], self.num_train)
        else:
            train = self._parse_slices("train_slices", self.train_slices, self.num_train)
        if self.test_slices is None:
            test = [MQARSlice(s.seq_len, s.num_kv_pairs, self.num_test) for s in train]
        else:
            test = self._parse_slices("test_slices", self.test_slices, self.num_test)
        return train, test

    def validate(self) -> None:
        super().validate()
        check_int("vocab_size", self.vocab_size, 4)
        check_float("power_a", self.power_a, 0.0, math.inf, low_open=True, high_open=True)
        if self.test_power_a is not None:
            check_float("test_power_a", self.test_power_a, 0.0, math.inf, low_open=True, high_open=True)
        check_bool("random_non_queries", self.random_non_queries)
        if self.train_slices is not None and (self.seq_len is not None or self.num_kv_pairs is not None):
            raise ValueError(
                "seq_len/num_kv_pairs and train_slices both given: give the single setting "
                "(seq_len, num_kv_pairs) or the mixture (train_slices), not both"
            )
        self.resolved_slices()


class MQARDataModule(SyntheticTaskDataModule):
    """MQAR (Zoology) as a LightningDataModule; one slice per (seq_len, num_kv_pairs) setting.

    ``slice_names``: test settings first, then train-only settings (``"L{seq_len}_kv{num_kv_pairs}"``);
    ``slice_kv_pairs``/``slice_seq_lens`` align with it. ``num_kv_pairs``: the setting's value when
    there is one setting, else the largest over slices. ``pad_token`` = 0.
    """

    task_name = "mqar"
    config_cls = MQARConfig
    config: MQARConfig

    def _layout(self) -> None:
        train, test = self.config.resolved_slices()
        keys: list[tuple[int, int]] = []
        for s in test + train:
            if (s.seq_len, s.num_kv_pairs) not in keys:
                keys.append((s.seq_len, s.num_kv_pairs))
        self._slice_keys = keys
        self._plans = {
            split: [(keys.index((s.seq_len, s.num_kv_pairs)), s.num_examples) for s in sl]
            for split, sl in (("train", train), ("test", test))
        }
        self.slice_names = [f"L{L}_kv{k}" for L, k in keys]
        self.slice_seq_lens = [L for L, _ in keys]
        self.slice_kv_pairs = [k for _, k in keys]
        self.seq_len = max(self.slice_seq_lens)
        self.vocab_size = self.config.vocab_size
        self.pad_token = 0
        self.num_kv_pairs = max(self.slice_kv_pairs)

    def _plan(self, split: str) -> list[tuple[int, int]]:
        return self._plans[split]

    def _generate(self, slice_id: int, n: int, g: torch.Generator, split: str) -> tuple[Tensor, Tensor]:
        c = self.config
        seq_len, k = self._slice_keys[slice_id]
        a = c.power_a if split == "train" or c.test_power_a is None else c.test_power_a
        return generate_mqar(n, seq_len, k, c.vocab_size, a, c.random_non_queries, g)
