"""The MAD suite (athms/mad-lab, ``mad/data/instances.py``), vectorized and seeded.

Label convention (all tasks, train and test alike): ``labels[t]`` is what the model must output at
position ``t`` after reading ``inputs[:t + 1]``; -100 elsewhere. MAD trained its recall tasks on
next-token targets of the whole row and tested on answer positions only; here both splits score
the answer positions only (the "confusing label format" fix).

Deliberate differences from MAD, each fixing a problem its users met:
- every draw comes from a seeded ``torch.Generator`` (MAD's selective copying used the unseeded
  global ``np.random``);
- noisy recall/memorization: one real pair is always kept; the final recall query always asks a key
  that occurred earlier (MAD's fuzzy recall could emit an unanswerable final query);
- compression: MAD returned the un-noised row as target; noise positions are now -100. MAD's
  compression used an encoder-decoder; here it is causal (see ``generate_compression``);
- selective copying: tokens sit at uniformly random prefix positions (MAD's insertion never put a
  blank after the last token);
- memorization: MAD silently set k/v motif sizes to 1; they are simply not parameters here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ess_train.checks import check_bool, check_float, check_int

from .base import (
    IGNORE_INDEX,
    SyntheticTaskDataModule,
    TaskConfig,
    first_occurrence,
    make_generator,
    randint,
    sample_distinct,
)

# --------------------------------------------------------------------------- generators


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


def _motif_codes(tok: Tensor, size: Tensor, base: int) -> Tensor:
    """Unique integer per motif (token tuple of length ``size``, tokens < base - 1)."""
    w = tok.shape[-1]
    powers = base ** torch.arange(w, dtype=torch.long)
    valid = torch.arange(w) < size[..., None]
    return ((tok + 1) * powers * valid).sum(-1)


def generate_fuzzy_in_context_recall(
    n: int,
    seq_len: int,
    vocab_size: int,
    k_motif_size: int = 3,
    v_motif_size: int = 3,
    multi_query: bool = True,
    noise_vocab_size: int = 0,
    frac_noise: float = 0.0,
    is_training: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """MAD fuzzy in-context recall: keys and values are motifs of 1..k_motif_size / 1..v_motif_size
    distinct tokens (test rows: keys always ``k_motif_size`` long, as in MAD).

    Pairs are appended while the row is shorter than ``T = seq_len - |probe| - (k_motif + v_motif)``;
    the probe pair is inserted at a random point, and the row ends with ``(copy_prefix) probe_key
    probe_value``. Rows are left-padded with ``pad`` (V-1 multi-query, V-2 single-query, copy prefix
    V-1). Labels cover the value tokens of every pair whose key occurred before (multi-query) and of
    the final probe, shifted by one like MAD: the label at the last key token is the first value token.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    km, vm, L = k_motif_size, v_motif_size, seq_len
    W = km + vm
    specials = 1 if multi_query else 2
    pad = vocab_size - 1 if multi_query else vocab_size - 2
    nk, nv, ns = recall_vocab(vocab_size, noise_vocab_size, specials)

    # probe pair
    kps = randint(km, (n,), g) + 1 if is_training else torch.full((n,), km)
    vps = randint(vm, (n,), g) + 1
    kp_tok = sample_distinct(nk, km, n, g)
    vp_tok = sample_distinct(nv, vm, n, g) + nk
    kvp = kps + vps
    T = L - kvp - W
    probe_at = randint(T - W + 1, (n,), g)  # token offset; <= T - W keeps the probe inside the row

    # candidate random pairs (enough slots for the longest row)
    S = (L - 2 - W) // 2 + 1
    ks = randint(km, (n, S), g) + 1 if is_training else torch.full((n, S), km)
    vs = randint(vm, (n, S), g) + 1
    ktok = sample_distinct(nk, km, n * S, g).view(n, S, km)
    vtok = (sample_distinct(nv, vm, n * S, g) + nk).view(n, S, vm)
    if frac_noise > 0:
        noise = torch.rand(n, S, generator=g) < frac_noise
        ntok = randint(noise_vocab_size, (n, S, W), g) + ns
    else:
        noise = torch.zeros(n, S, dtype=torch.bool)
        ntok = torch.zeros(n, S, W, dtype=torch.long)

    # a key keeps the value of its first occurrence; the probe key always maps to the probe value
    kid = _motif_codes(ktok, ks, nk + 1)
    pid = _motif_codes(kp_tok, kps, nk + 1)
    is_pk = (kid == pid[:, None]) & ~noise
    codes = torch.where(noise | is_pk, -1 - torch.arange(S), kid)
    first = first_occurrence(codes)
    seen = (first != torch.arange(S)) & ~noise & ~is_pk
    vs_eff = torch.where(is_pk, vps[:, None], vs.gather(1, first))
    vtok_first = vtok.gather(1, first[..., None].expand(-1, -1, vm))
    vtok_eff = torch.where(is_pk[..., None], vp_tok[:, None, :], vtok_first)
    length = torch.where(noise, ks + vs, ks + vs_eff)

    # insert the probe before the first pair starting at or after probe_at
    start = length.cumsum(1) - length
    j_star = (start < probe_at[:, None]).sum(1)
    slot = torch.arange(S + 1)
    is_probe = slot == j_star[:, None]
    src = (slot - (slot > j_star[:, None]).long()).clamp_(max=S - 1)

    def take(x: Tensor) -> Tensor:
        idx = src if x.dim() == 2 else src[..., None].expand(-1, -1, x.shape[2])
        return x.gather(1, idx)

    ks2, vs2, noise2 = take(ks), take(vs_eff), take(noise) & ~is_probe
    ks2 = torch.where(is_probe, kps[:, None], ks2)
    vs2 = torch.where(is_probe, vps[:, None], vs2)
    ktok2 = torch.where(is_probe[..., None], kp_tok[:, None, :], take(ktok))
    vtok2 = torch.where(is_probe[..., None], vp_tok[:, None, :], take(vtok_eff))
    ntok2 = take(ntok)
    len2 = torch.where(is_probe, kvp[:, None], take(length))
    # labels: keys seen before; probe-key pairs are seen if an earlier pair carried the probe key
    pk2 = (take(is_pk) & ~is_probe) | is_probe
    pk_before = (pk2.long().cumsum(1) - pk2.long()) > 0
    seen2 = torch.where(pk2, pk_before, take(seen) & ~is_probe)
    start2 = len2.cumsum(1) - len2
    incl = start2 < T[:, None]

    # token content of every slot, width W
    w = torch.arange(W)
    in_key = w < ks2[..., None]
    in_val = (w >= ks2[..., None]) & (w < (ks2 + vs2)[..., None])
    kpad = torch.nn.functional.pad(ktok2, (0, W - km))
    vidx = (w - ks2[..., None]).clamp(0, vm - 1)
    tok = torch.where(in_key, kpad, vtok2.gather(2, vidx))
    tok = torch.where(noise2[..., None], ntok2, tok)
    tgt = torch.where(in_val & (seen2 & ~noise2 & multi_query)[..., None], tok, IGNORE_INDEX)
    valid = (w < len2[..., None]) & incl[..., None]

    # final segment: (copy prefix) probe key, probe value
    F = W + (0 if multi_query else 1)
    fw = torch.arange(F)
    off0 = 0 if multi_query else 1
    fk = (fw >= off0) & (fw < off0 + kps[:, None])
    fv = (fw >= off0 + kps[:, None]) & (fw < off0 + kvp[:, None])
    ftok = torch.where(
        fk,
        torch.nn.functional.pad(kp_tok, (off0, F - off0 - km)),
        vp_tok.gather(1, (fw - off0 - kps[:, None]).clamp(0, vm - 1)),
    )
    if not multi_query:
        ftok[:, 0] = vocab_size - 1
    ftgt = torch.where(fv, ftok, IGNORE_INDEX)
    fvalid = fw < (off0 + kvp)[:, None]

    content = (len2 * incl).sum(1)
    total = content + off0 + kvp
    offset = (L + 1) - total
    buf = torch.full((n, L + 2), pad, dtype=torch.long)
    tbuf = torch.full((n, L + 2), IGNORE_INDEX, dtype=torch.long)
    pos = offset[:, None, None] + start2[..., None] + w
    pos = torch.where(valid, pos, L + 1).flatten(1)
    buf.scatter_(1, pos, tok.flatten(1))
    tbuf.scatter_(1, pos, tgt.flatten(1))
    fpos = torch.where(fvalid, (offset + content)[:, None] + fw, L + 1)
    buf.scatter_(1, fpos, ftok)
    tbuf.scatter_(1, fpos, ftgt)
    return buf[:, :L], tbuf[:, 1 : L + 1]


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


# --------------------------------------------------------------------------- configs


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


@dataclass
class FuzzyInContextRecallConfig(TaskConfig):
    """MAD fuzzy in-context recall (baseline: vocab 16, seq_len 128, motifs up to 3 tokens)."""

    num_train: int = 12_800
    num_test: int = 1_280
    vocab_size: int = 16
    seq_len: int = 128
    k_motif_size: int = 3
    v_motif_size: int = 3
    multi_query: bool = True
    noise_vocab_size: int = 0
    frac_noise: float = 0.0

    def validate(self) -> None:
        super().validate()
        check_bool("multi_query", self.multi_query)
        check_int("vocab_size", self.vocab_size, 3)
        check_int("k_motif_size", self.k_motif_size, 1)
        check_int("v_motif_size", self.v_motif_size, 1)
        specials = 1 if self.multi_query else 2
        _check_noise(self, specials)
        nk, nv, _ = recall_vocab(self.vocab_size, self.noise_vocab_size, specials)
        if self.k_motif_size > nk:
            raise ValueError(
                f"k_motif_size={self.k_motif_size} exceeds the {nk} key tokens (motif tokens "
                f"are distinct); raise vocab_size"
            )
        if self.v_motif_size > nv:
            raise ValueError(
                f"v_motif_size={self.v_motif_size} exceeds the {nv} value tokens; raise vocab_size"
            )
        if self.k_motif_size * (nk + 1).bit_length() > 62:
            raise ValueError(f"k_motif_size={self.k_motif_size} too large for vocab_size={self.vocab_size}")
        w = self.k_motif_size + self.v_motif_size
        need = 3 * w + (0 if self.multi_query else 1)
        check_int(
            "seq_len",
            self.seq_len,
            need,
            why=" (3 * (k_motif_size + v_motif_size): room for pairs, the probe and the final query)",
        )


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


@dataclass
class CompressionConfig(_PairedTokensConfig):
    """MAD compression (baseline: vocab 16, seq_len 32), causal form (see ``generate_compression``)."""


@dataclass
class MemorizationConfig(_PairedTokensConfig):
    """MAD memorization (baseline: vocab 256, seq_len 32, 256 train examples)."""

    num_train: int = 256
    vocab_size: int = 256


# --------------------------------------------------------------------------- data modules


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


class FuzzyInContextRecallDataModule(_SingleSliceDataModule):
    """MAD fuzzy in-context recall (multi-token keys and values; test keys are full-length motifs).
    ``pad_token`` = V-1 (multi-query) or V-2. ``num_kv_pairs``: expected number of pairs in a test
    row (probe included), ``round((L - W - E|probe|) / (k_motif + E|value|)) + 1``."""

    task_name = "fuzzy_in_context_recall"
    config_cls = FuzzyInContextRecallConfig

    def _layout(self) -> None:
        super()._layout()
        c = self.config
        self.pad_token = c.vocab_size - 1 if c.multi_query else c.vocab_size - 2
        mean_v = (c.v_motif_size + 1) / 2
        budget = c.seq_len - (c.k_motif_size + c.v_motif_size) - (c.k_motif_size + mean_v)
        self.num_kv_pairs = round(budget / (c.k_motif_size + mean_v)) + 1
        self.slice_kv_pairs = [self.num_kv_pairs]

    def _generate(self, slice_id: int, n: int, g: torch.Generator, split: str) -> tuple[Tensor, Tensor]:
        c = self.config
        return generate_fuzzy_in_context_recall(
            n,
            c.seq_len,
            c.vocab_size,
            c.k_motif_size,
            c.v_motif_size,
            c.multi_query,
            c.noise_vocab_size,
            c.frac_noise,
            is_training=split == "train",
            generator=g,
        )


class SelectiveCopyingDataModule(_SingleSliceDataModule):
    """MAD selective copying (blank V-2, copy V-1)."""

    task_name = "selective_copying"
    config_cls = SelectiveCopyingConfig

    def _generate(self, slice_id: int, n: int, g: torch.Generator, split: str) -> tuple[Tensor, Tensor]:
        c = self.config
        return generate_selective_copying(n, c.seq_len, c.vocab_size, c.num_tokens_to_copy, g)


class CompressionDataModule(_SingleSliceDataModule):
    """MAD compression, causal form (compression token V-1)."""

    task_name = "compression"
    config_cls = CompressionConfig

    def _generate(self, slice_id: int, n: int, g: torch.Generator, split: str) -> tuple[Tensor, Tensor]:
        c = self.config
        return generate_compression(n, c.seq_len, c.vocab_size, c.noise_vocab_size, c.frac_noise, g)


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
