"""MAD compression, causal form (generator, config, data module)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..sampling import randint
from ..task_config import IGNORE_INDEX
from .base import _PairedTokensConfig, _SingleSliceDataModule, recall_vocab


def generate_compression(
    n: int,
    seq_len: int,
    vocab_size: int,
    noise_vocab_size: int = 0,
    frac_noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """MAD compression, causal form. Row: ``m = seq_len/2`` tokens from ``[0, ns)`` (each replaced by a
    noise token with probability ``frac_noise``), then ``m`` compression tokens ``V-1``; the label at
    the j-th compression token is the j-th token (-100 for noise). A recurrent model has to carry the
    whole prefix through its state at the first compression token."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    m = seq_len // 2
    _, _, ns = recall_vocab(vocab_size, noise_vocab_size, 1)
    x = randint(ns, (n, m), g)
    target = x
    if frac_noise > 0:
        noise = torch.rand(n, m, generator=g) < frac_noise
        x = torch.where(noise, randint(noise_vocab_size, (n, m), g) + ns, x)
        target = torch.where(noise, IGNORE_INDEX, x)
    inputs = torch.cat([x, torch.full((n, m), vocab_size - 1, dtype=torch.long)], dim=1)
    labels = torch.cat([torch.full((n, m), IGNORE_INDEX, dtype=torch.long), target], dim=1)
    return inputs, labels


@dataclass
class CompressionConfig(_PairedTokensConfig):
    """MAD compression (baseline: vocab 16, seq_len 32), causal form (see ``generate_compression``)."""


class CompressionDataModule(_SingleSliceDataModule):
    """MAD compression, causal form (compression token V-1)."""

    task_name = "compression"
    config_cls = CompressionConfig

    def _generate(self, slice_id: int, n: int, g: torch.Generator, split: str) -> tuple[Tensor, Tensor]:
        c = self.config
        return generate_compression(n, c.seq_len, c.vocab_size, c.noise_vocab_size, c.frac_noise, g)
