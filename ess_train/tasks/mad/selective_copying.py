"""MAD selective copying (generator, config, data module)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ess_train.checks import check_int

from ..sampling import randint
from ..task_config import IGNORE_INDEX, TaskConfig
from .base import _SingleSliceDataModule


def generate_selective_copying(
    n: int, seq_len: int, vocab_size: int, num_tokens_to_copy: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """MAD selective copying. Row: a prefix of ``seq_len - m - 1`` tokens holding ``m`` tokens from
    ``[0, V-2)`` at random positions (the rest ``blank = V-2``), ``copy = V-1``, then ``m`` blanks
    whose labels are the ``m`` tokens in order."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    m = num_tokens_to_copy
    blank, copy = vocab_size - 2, vocab_size - 1
    prefix = seq_len - m - 1
    tok = randint(vocab_size - 2, (n, m), g)
    pos = torch.rand(n, prefix, generator=g).topk(m, dim=1).indices.sort(dim=1).values
    inputs = torch.full((n, seq_len), blank, dtype=torch.long)
    inputs.scatter_(1, pos, tok)
    inputs[:, prefix] = copy
    labels = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    labels[:, prefix + 1 :] = tok
    return inputs, labels


@dataclass
class SelectiveCopyingConfig(TaskConfig):
    """MAD selective copying (baseline: vocab 16, seq_len 256, 16 tokens to copy)."""

    num_train: int = 12_800
    num_test: int = 1_280
    vocab_size: int = 16
    seq_len: int = 256
    num_tokens_to_copy: int = 16

    def validate(self) -> None:
        super().validate()
        check_int("vocab_size", self.vocab_size, 3, why=" (blank, copy and at least one token)")
        check_int("num_tokens_to_copy", self.num_tokens_to_copy, 1)
        check_int("seq_len", self.seq_len, 1)
        if self.seq_len <= 2 * self.num_tokens_to_copy + 1:
            raise ValueError(
                f"num_tokens_to_copy={self.num_tokens_to_copy} is too many for seq_len="
                f"{self.seq_len}: need seq_len > 2 * num_tokens_to_copy + 1 (MAD's bound)"
            )


class SelectiveCopyingDataModule(_SingleSliceDataModule):
    """MAD selective copying (blank V-2, copy V-1)."""

    task_name = "selective_copying"
    config_cls = SelectiveCopyingConfig

    def _generate(self, slice_id: int, n: int, g: torch.Generator, split: str) -> tuple[Tensor, Tensor]:
        c = self.config
        return generate_selective_copying(n, c.seq_len, c.vocab_size, c.num_tokens_to_copy, g)
