"""Shared parts of the MAD tasks: the vocabulary layout of the recall tasks, noise masks and checks, the
compression/memorization config fields and the one-slice data module base."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ess_train.checks import check_float, check_int

from ..base import SyntheticTaskDataModule
from ..sampling import randint
from ..task_config import TaskConfig


def _noise_mask(n: int, num: int, frac_noise: float, g: torch.Generator) -> Tensor:
    """Bool ``[n, num]``: which pairs are noise; one random pair per row is always kept real."""
    noise = torch.rand(n, num, generator=g) < frac_noise
    keep = randint(num, (n,), g)
    noise[torch.arange(n), keep] = False
    return noise


def recall_vocab(vocab_size: int, noise_vocab_size: int, specials: int) -> tuple[int, int, int]:
    """``(num_keys, num_values, num_regular)``: keys ``[0, nk)``, values ``[nk, ns)``,
    noise ``[ns, ns + noise_vocab_size)``; the top ``specials`` tokens are special."""
    ns = vocab_size - specials - noise_vocab_size
    return ns // 2, ns - ns // 2, ns


def _check_noise(cfg: TaskConfig, specials: int, min_regular: int = 2) -> None:
    check_int("noise_vocab_size", cfg.noise_vocab_size, 0)
    check_float("frac_noise", cfg.frac_noise, 0.0, 1.0, high_open=True)
    if cfg.frac_noise > 0 and cfg.noise_vocab_size < 1:
        raise ValueError(f"noise_vocab_size={cfg.noise_vocab_size} must be >= 1 when frac_noise > 0")
    ns = cfg.vocab_size - specials - cfg.noise_vocab_size
    if ns < min_regular:
        raise ValueError(
            f"vocab_size={cfg.vocab_size} leaves {ns} regular tokens after {specials} special "
            f"and noise_vocab_size={cfg.noise_vocab_size} noise tokens; need >= {min_regular}"
        )


def _check_even_len(seq_len: int, low: int) -> None:
    check_int("seq_len", seq_len, low)
    if seq_len % 2:
        raise ValueError(f"seq_len={seq_len} must be even")


@dataclass
class _PairedTokensConfig(TaskConfig):
    """Shared fields and checks of compression and memorization (even length, optional noise tokens)."""

    num_train: int = 12_800
    num_test: int = 1_280
    vocab_size: int = 16
    seq_len: int = 32
    noise_vocab_size: int = 0
    frac_noise: float = 0.0

    def validate(self) -> None:
        super().validate()
        check_int("vocab_size", self.vocab_size, 3)
        _check_even_len(self.seq_len, 2)
        _check_noise(self, 1)


class _SingleSliceDataModule(SyntheticTaskDataModule):
    """One slice named after the task; no padding."""

    def _layout(self) -> None:
        c = self.config
        self.vocab_size = c.vocab_size
        self.seq_len = c.seq_len
        self.slice_names = [self.task_name]
        self.slice_seq_lens = [c.seq_len]
        self.pad_token = None

    def _plan(self, split: str) -> list[tuple[int, int]]:
        return [(0, self.config.num_train if split == "train" else self.config.num_test)]
