"""Delimited recall: several independent recall segments in one row, each closed by an
end-of-segment token. A query is answered from its own segment only.

Segment (k = num_kv_pairs, q = num_queries, a = num_absent_queries):
``k1 v1 ... kk vk  <q + a queries, shuffled>  EOS``; length ``2k + q + a + 1``.
- keys distinct within a segment, from ``[1, V/2)``; values from ``[V/2, V-2)``;
  ``null = V-2``, ``EOS = V-1``, ``pad = 0`` (only when ``seq_len`` exceeds the segments' length);
- from the second segment on, ``round(key_reuse * k)`` keys are taken from the previous segment
  and get a value different from the one they had there;
- present queries ask keys of the segment (label: the value in this segment); absent queries ask a
  key that is not in the segment (from the previous segment when possible; label: ``null``).
A model that does not clear its memory at EOS answers reused keys or absent queries with stale values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ess_train.checks import check_float, check_int

from .base import (
    IGNORE_INDEX,
    SyntheticTaskDataModule,
    TaskConfig,
    randint,
    sample_distinct,
)


def delimited_vocab(vocab_size: int) -> dict[str, int]:
    """Token layout: keys ``[1, half)``, values ``[half, null)``, ``null``, ``eos``; pad 0."""
    half = vocab_size // 2
    return {"pad": 0, "key_lo": 1, "half": half, "null": vocab_size - 2, "eos": vocab_size - 1}


def segment_length(num_kv_pairs: int, num_queries: int, num_absent_queries: int) -> int:
    return 2 * num_kv_pairs + num_queries + num_absent_queries + 1


def generate_delimited_recall(
    n: int,
    vocab_size: int,
    num_segments: int,
    num_kv_pairs: int,
    num_queries: int,
    num_absent_queries: int = 0,
    key_reuse: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """``(inputs, labels)``, ``Long[n, num_segments * segment_length]`` (see module docstring)."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    k, q, a = num_kv_pairs, num_queries, num_absent_queries
    voc = delimited_vocab(vocab_size)
    half, nk, nv = voc["half"], voc["half"] - 1, voc["null"] - voc["half"]
    r = round(key_reuse * k)
    xs, ys = [], []
    prev_keys = prev_vals = None
    for s in range(num_segments):
        if s == 0:
            keys = sample_distinct(nk, k + a, n, g) + 1
            keys, absent = keys[:, :k], keys[:, k:]
            vals = randint(nv, (n, k), g) + half
        else:
            pick = sample_distinct(k, min(k, r + a), n, g)
            rk = prev_keys.gather(1, pick[:, :r])
            old = prev_vals.gather(1, pick[:, :r])
            rv = (old - half + 1 + randint(nv - 1, (n, r), g)) % nv + half
            fresh = sample_distinct(nk, k - r, n, g, exclude=prev_keys - 1) + 1
            order = torch.rand(n, k, generator=g).argsort(dim=1)
            keys = torch.cat([rk, fresh], dim=1).gather(1, order)
            vals = torch.cat([rv, randint(nv, (n, k - r), g) + half], dim=1).gather(1, order)
            absent = prev_keys.gather(1, pick[:, r:])
            if absent.shape[1] < a:  # previous segment ran out of keys that are not reused
                excl = torch.cat([prev_keys, fresh], dim=1) - 1
                extra = sample_distinct(nk, a - absent.shape[1], n, g, exclude=excl) + 1
                absent = torch.cat([absent, extra], dim=1)
        qi = sample_distinct(k, q, n, g)
        qk = torch.cat([keys.gather(1, qi), absent], dim=1)
        qv = torch.cat([vals.gather(1, qi), torch.full((n, a), voc["null"], dtype=torch.long)], dim=1)
        order = torch.rand(n, q + a, generator=g).argsort(dim=1)
        qk, qv = qk.gather(1, order), qv.gather(1, order)
        kv = torch.stack([keys, vals], dim=2).flatten(1)
        eos = torch.full((n, 1), voc["eos"], dtype=torch.long)
        xs.append(torch.cat([kv, qk, eos], dim=1))
        ys.append(
            torch.cat(
                [
                    torch.full((n, 2 * k), IGNORE_INDEX, dtype=torch.long),
                    qv,
                    torch.full((n, 1), IGNORE_INDEX, dtype=torch.long),
                ],
                dim=1,
            )
        )
        prev_keys, prev_vals = keys, vals
    return torch.cat(xs, dim=1), torch.cat(ys, dim=1)


@dataclass
class DelimitedRecallConfig(TaskConfig):
    """Delimited recall parameters.

    vocab_size: V (keys [1, V/2), values [V/2, V-2), null V-2, EOS V-1).
    num_segments, num_kv_pairs (per segment), num_queries (present keys asked per segment, <= kv),
    num_absent_queries (keys not in the segment, answer null), key_reuse (fraction of a segment's
    keys taken from the previous segment, with a new value).
    seq_len: None = exactly the segments' length; larger values right-pad with 0 (label -100).
    """

    vocab_size: int = 128
    num_segments: int = 4
    num_kv_pairs: int = 4
    num_queries: int = 4
    num_absent_queries: int = 1
    key_reuse: float = 0.5
    seq_len: int | None = None

    def validate(self) -> None:
        super().validate()
        check_int("vocab_size", self.vocab_size, 8)
        check_int("num_segments", self.num_segments, 1)
        check_int("num_kv_pairs", self.num_kv_pairs, 1)
        check_int(
            "num_queries",
            self.num_queries,
            0,
            self.num_kv_pairs,
            why=f" (queries ask distinct keys of the segment; num_kv_pairs={self.num_kv_pairs})",
        )
        check_int("num_absent_queries", self.num_absent_queries, 0)
        if self.num_queries + self.num_absent_queries < 1:
            raise ValueError("num_queries + num_absent_queries must be >= 1 (a segment needs a query)")
        check_float("key_reuse", self.key_reuse, 0.0, 1.0)
        voc = delimited_vocab(self.vocab_size)
        nk, nv = voc["half"] - 1, voc["null"] - voc["half"]
        r = round(self.key_reuse * self.num_kv_pairs)
        need = self.num_kv_pairs + max(self.num_absent_queries, self.num_kv_pairs - r)
        if need > nk:
            raise ValueError(
                f"vocab_size={self.vocab_size} has {nk} keys; num_kv_pairs={self.num_kv_pairs} "
                f"with key_reuse={self.key_reuse} and "
                f"num_absent_queries={self.num_absent_queries} needs {need} "
                "(fresh keys avoid the previous segment's)"
            )
        if nv < (2 if r else 1):
            raise ValueError(
                f"vocab_size={self.vocab_size} leaves {nv} value tokens; need >= 2 with key_reuse"
            )
        length = self.content_length()
        if self.seq_len is not None:
            check_int(
                "seq_len",
                self.seq_len,
                length,
                why=" (num_segments * (2*num_kv_pairs + num_queries + num_absent_queries + 1))",
            )

    def content_length(self) -> int:
        per_segment = segment_length(self.num_kv_pairs, self.num_queries, self.num_absent_queries)
        return self.num_segments * per_segment


class DelimitedRecallDataModule(SyntheticTaskDataModule):
    """Delimited recall; one slice ``"seg{S}_kv{k}"``. ``num_kv_pairs`` is per segment (what must be
    held at once). ``eos_token`` = V-1, ``null_token`` = V-2, ``pad_token`` = 0."""

    task_name = "delimited_recall"
    config_cls = DelimitedRecallConfig
    config: DelimitedRecallConfig

    def _layout(self) -> None:
        c = self.config
        voc = delimited_vocab(c.vocab_size)
        self.vocab_size = c.vocab_size
        self.seq_len = c.seq_len or c.content_length()
        self.slice_names = [f"seg{c.num_segments}_kv{c.num_kv_pairs}"]
        self.slice_seq_lens = [c.content_length()]
        self.pad_token = 0
        self.eos_token, self.null_token = voc["eos"], voc["null"]
        self.num_kv_pairs = c.num_kv_pairs
        self.slice_kv_pairs = [c.num_kv_pairs]

    def _plan(self, split: str) -> list[tuple[int, int]]:
        return [(0, self.config.num_train if split == "train" else self.config.num_test)]

    def _generate(self, slice_id: int, n: int, g: torch.Generator, split: str) -> tuple[Tensor, Tensor]:
        c = self.config
        return generate_delimited_recall(
            n,
            c.vocab_size,
            c.num_segments,
            c.num_kv_pairs,
            c.num_queries,
            c.num_absent_queries,
            c.key_reuse,
            g,
        )
