"""MAD memorization: a key -> value map fixed for the whole dataset (generator, config, data module)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..sampling import make_generator, randint
from ..task_config import IGNORE_INDEX
from .base import _noise_mask, _PairedTokensConfig, _SingleSliceDataModule, recall_vocab


def make_memorization_map(vocab_size: int, noise_vocab_size: int, generator: torch.Generator) -> Tensor:
    """The fixed key -> value map of the memorization task: ``Long[num_keys]`` of distinct values."""
    nk, nv, _ = recall_vocab(vocab_size, noise_vocab_size, 1)
    return torch.randperm(nv, generator=generator)[:nk] + nk


def generate_memorization(
    n: int,
    seq_len: int,
    vocab_size: int,
    kv_map: Tensor,
    noise_vocab_size: int = 0,
    frac_noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """MAD memorization. Row: ``seq_len/2`` pairs ``key insert`` (``insert = V-1``, keys uniform); the
    label at the insert token is ``kv_map[key]``, a map fixed for the whole dataset (train and test),
    so it must be stored in the weights. Noise pairs: two noise tokens, unscored."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    nk, _, ns = recall_vocab(vocab_size, noise_vocab_size, 1)
    p = seq_len // 2
    keys = randint(nk, (n, p), g)
    inputs = torch.stack([keys, torch.full_like(keys, vocab_size - 1)], dim=2)
    labels = torch.stack([torch.full_like(keys, IGNORE_INDEX), kv_map[keys]], dim=2)
    if frac_noise > 0:
        noise = _noise_mask(n, p, frac_noise, g)
        inputs = torch.where(noise[..., None], randint(noise_vocab_size, (n, p, 2), g) + ns, inputs)
        labels = labels.masked_fill(noise[..., None], IGNORE_INDEX)
    return inputs.flatten(1), labels.flatten(1)


@dataclass
class MemorizationConfig(_PairedTokensConfig):
    """MAD memorization (baseline: vocab 256, seq_len 32, 256 train examples)."""

    num_train: int = 256
    vocab_size: int = 256


class MemorizationDataModule(_SingleSliceDataModule):
    """MAD memorization (insert token V-1); ``kv_map`` is drawn from its own seed, shared by both splits."""

    task_name = "memorization"
    config_cls = MemorizationConfig

    def _layout(self) -> None:
        super()._layout()
        c = self.config
        self.kv_map = make_memorization_map(
            c.vocab_size, c.noise_vocab_size, make_generator(c.seed, self.task_name, "kv_map")
        )

    def _generate(self, slice_id: int, n: int, g: torch.Generator, split: str) -> tuple[Tensor, Tensor]:
        c = self.config
        return generate_memorization(
            n, c.seq_len, c.vocab_size, self.kv_map, c.noise_vocab_size, c.frac_noise, g
        )
