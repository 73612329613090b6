"""MAD fuzzy in-context recall: keys and values are multi-token motifs (generator, config, data module)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ess_train.checks import check_bool, check_int

from ..sampling import first_occurrence, randint, sample_distinct
from ..task_config import IGNORE_INDEX, TaskConfig
from .base import _check_noise, _SingleSliceDataModule, recall_vocab


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
