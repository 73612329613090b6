"""MAD in-context recall and noisy in-context recall (generator, configs, data modules)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ess_train.checks import check_bool, check_int

from ..sampling import first_occurrence, randint
from ..task_config import IGNORE_INDEX, TaskConfig
from .base import _check_even_len, _check_noise, _noise_mask, _SingleSliceDataModule, recall_vocab


def generate_in_context_recall(
    n: int,
    seq_len: int,
    vocab_size: int,
    multi_query: bool = True,
    noise_vocab_size: int = 0,
    frac_noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """MAD in-context recall (and noisy recall with ``frac_noise > 0``): ``Long[n, seq_len]`` pairs.

    Row: ``seq_len/2 - 1`` pairs ``key value`` (keys uniform with replacement, each key's value fixed
    within the row at its first occurrence), each pair replaced by two noise tokens with probability
    ``frac_noise``; then the probe: multi-query ``k v`` (a key seen earlier), single-query
    ``copy_prefix k`` (``copy_prefix = V - 1``). Multi-query scores every key that occurred before
    (label at the key position = its value); single-query scores only the probe.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    nk, nv, ns = recall_vocab(vocab_size, noise_vocab_size, 0 if multi_query else 1)
    c = seq_len // 2 - 1
    keys = randint(nk, (n, c), g)
    table = randint(nv, (n, nk), g) + nk
    vals = table.gather(1, keys)
    if frac_noise > 0:
        noise = _noise_mask(n, c, frac_noise, g)
        noise_tok = randint(noise_vocab_size, (n, c, 2), g) + ns
    else:
        noise = torch.zeros(n, c, dtype=torch.bool)
    score = torch.rand(n, c, generator=g).masked_fill_(noise, -1.0)
    k_probe = keys.gather(1, score.argmax(1, keepdim=True))
    v_probe = table.gather(1, k_probe)
    codes = torch.where(noise, nk + torch.arange(c), keys)
    seen = (first_occurrence(codes) != torch.arange(c)) & ~noise
    pairs = torch.stack([keys, vals], dim=2)
    lab = torch.full_like(pairs, IGNORE_INDEX)
    if frac_noise > 0:
        pairs = torch.where(noise[..., None], noise_tok, pairs)
    if multi_query:
        lab[..., 0] = torch.where(seen, vals, IGNORE_INDEX)
        inputs = torch.cat([pairs.flatten(1), k_probe, v_probe], dim=1)
        labels = torch.cat([lab.flatten(1), v_probe, torch.full_like(v_probe, IGNORE_INDEX)], dim=1)
    else:
        inputs = torch.cat([pairs.flatten(1), torch.full_like(k_probe, vocab_size - 1), k_probe], dim=1)
        labels = torch.cat([lab.flatten(1), torch.full_like(k_probe, IGNORE_INDEX), v_probe], dim=1)
    return inputs, labels


@dataclass
class InContextRecallConfig(TaskConfig):
    """MAD in-context recall (baseline: vocab 16, seq_len 128, 12,800 train examples, multi-query)."""

    num_train: int = 12_800
    num_test: int = 1_280
    vocab_size: int = 16
    seq_len: int = 128
    multi_query: bool = True

    def validate(self) -> None:
        super().validate()
        check_int("vocab_size", self.vocab_size, 2)
        _check_even_len(self.seq_len, 4)
        check_bool("multi_query", self.multi_query)
        self._check_vocab(0 if self.multi_query else 1)

    def _check_vocab(self, specials: int) -> None:
        if self.vocab_size - specials < 2:
            raise ValueError(
                f"vocab_size={self.vocab_size} must be >= {2 + specials} (one key, one value"
                f"{', the copy prefix' if specials else ''})"
            )


@dataclass
class NoisyInContextRecallConfig(InContextRecallConfig):
    """MAD noisy in-context recall (baseline: vocab 32 with 16 noise tokens, frac_noise 0.2)."""

    vocab_size: int = 32
    noise_vocab_size: int = 16
    frac_noise: float = 0.2

    def _check_vocab(self, specials: int) -> None:
        _check_noise(self, specials)


class InContextRecallDataModule(_SingleSliceDataModule):
    """MAD in-context recall. ``num_kv_pairs`` = most distinct keys a row can hold
    (``min(num_keys, seq_len/2 - 1)``)."""

    task_name = "in_context_recall"
    config_cls = InContextRecallConfig

    def _layout(self) -> None:
        super()._layout()
        c = self.config
        nk, _, _ = recall_vocab(c.vocab_size, getattr(c, "noise_vocab_size", 0), 0 if c.multi_query else 1)
        self.num_kv_pairs = min(nk, c.seq_len // 2 - 1)
        self.slice_kv_pairs = [self.num_kv_pairs]

    def _generate(self, slice_id: int, n: int, g: torch.Generator, split: str) -> tuple[Tensor, Tensor]:
        c = self.config
        return generate_in_context_recall(
            n,
            c.seq_len,
            c.vocab_size,
            c.multi_query,
            getattr(c, "noise_vocab_size", 0),
            getattr(c, "frac_noise", 0.0),
            g,
        )


class NoisyInContextRecallDataModule(InContextRecallDataModule):
    """MAD noisy in-context recall: pairs replaced by unscored noise tokens
    ``[ns, ns + noise_vocab_size)``."""

    task_name = "noisy_in_context_recall"
    config_cls = NoisyInContextRecallConfig
