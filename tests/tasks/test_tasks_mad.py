"""MAD suite and delimited-recall semantics, checked from the generated rows."""

from __future__ import annotations

import pytest
import torch

from ess_train.tasks import (
    DelimitedRecallDataModule,
    MemorizationDataModule,
    build_task,
    generate_compression,
    generate_delimited_recall,
    generate_fuzzy_in_context_recall,
    generate_in_context_recall,
    generate_selective_copying,
    make_generator,
)


def gen(seed: int = 0) -> torch.Generator:
    return make_generator(seed, "mad-test")


def check_recall_rows(x: torch.Tensor, y: torch.Tensor, nk: int, ns: int, multi_query: bool) -> int:
    """Walk the pairs of in-context-recall rows; return the number of answers checked."""
    checked = 0
    for row, lab in zip(x.tolist(), y.tolist()):
        body = row if multi_query else row[:-2]
        seen: dict[int, int] = {}
        for t in range(0, len(body), 2):
            k, v = body[t], body[t + 1]
            if k >= ns:  # noise pair: both tokens noise, nothing scored
                assert v >= ns and lab[t] == lab[t + 1] == -100
                continue
            assert 0 <= k < nk and nk <= v < ns
            if k in seen:
                assert v == seen[k]  # a key keeps its value within the row
            if multi_query and k in seen:
                assert lab[t] == v
                checked += 1
            else:
                assert lab[t] == -100
            assert lab[t + 1] == -100
            seen.setdefault(k, v)
        if not multi_query:
            assert row[-2] == ns and row[-1] in seen and lab[-1] == seen[row[-1]]
            assert all(v == -100 for v in lab[:-1])
            checked += 1
        else:
            assert lab[-2] != -100  # the final probe always asks a key seen before
    return checked


def test_in_context_recall_multi_query() -> None:
    x, y = generate_in_context_recall(100, 64, 16, multi_query=True, generator=gen())
    assert x.shape == y.shape == (100, 64)
    assert check_recall_rows(x, y, nk=8, ns=16, multi_query=True) > 1000


def test_in_context_recall_single_query() -> None:
    x, y = generate_in_context_recall(100, 32, 16, multi_query=False, generator=gen())
    assert x.shape == (100, 32)
    check_recall_rows(x, y, nk=7, ns=15, multi_query=False)


def test_noisy_recall_ignores_noise() -> None:
    x, y = generate_in_context_recall(200, 64, 32, True, noise_vocab_size=16, frac_noise=0.4, generator=gen())
    noise = x >= 16
    assert noise.float().mean().item() == pytest.approx(0.4 * 31 / 32, abs=0.05)
    assert (y[noise] == -100).all()
    assert check_recall_rows(x, y, nk=8, ns=16, multi_query=True) > 1000


def parse_fuzzy(row: list[int], lab: list[int], nk: int, ns: int, pad: int, copy: int | None):
    """Split a fuzzy-recall row into (key motif, value motif, value labels) by vocabulary runs."""
    t = 0
    while row[t] == pad:
        assert lab[t] == -100
        t += 1
    pairs = []
    while t < len(row):
        if copy is not None and row[t] == copy:
            t += 1
            continue
        ks = t
        while t < len(row) and row[t] < nk:
            t += 1
        vs = t
        while t < len(row) and nk <= row[t] < ns:
            t += 1
        assert vs > ks, f"no key at {ks}"
        # labels are shifted by one: value token i is the label at position (its index - 1)
        pairs.append((tuple(row[ks:vs]), tuple(row[vs:t]), tuple(lab[vs - 1 : t - 1]), lab[t - 1]))
    return pairs


@pytest.mark.parametrize("is_training", [True, False])
@pytest.mark.parametrize("multi_query", [True, False])
def test_fuzzy_recall_multi_token_keys_and_values(is_training: bool, multi_query: bool) -> None:
    V, L, km, vm = 16, 64, 3, 3
    x, y = generate_fuzzy_in_context_recall(
        150, L, V, km, vm, multi_query=multi_query, is_training=is_training, generator=gen()
    )
    pad, copy = (V - 1, None) if multi_query else (V - 2, V - 1)
    ns = V - (1 if multi_query else 2)
    nk = ns // 2
    sizes, scored = set(), 0
    for row, lab in zip(x.tolist(), y.tolist()):
        nonpad = [t for t in range(L) if lab[t] != -100]
        for t in nonpad[:-1]:
            assert lab[t] == row[t + 1]  # shifted targets: the next (value) token
        pairs = parse_fuzzy(row, lab, nk, ns, pad, copy)
        mapping: dict[tuple, tuple] = {}
        for i, (k, v, vlab, _) in enumerate(pairs):
            assert 1 <= len(k) <= km and len(set(k)) == len(k)
            assert len(set(v)) == len(v)
            if not is_training:
                assert len(k) == km
            sizes.add(len(k))
            last = i == len(pairs) - 1
            if not last:
                assert 1 <= len(v) <= vm
                if k in mapping:
                    assert mapping[k] == v
                    if multi_query:
                        assert vlab == v
                        scored += 1
                else:
                    assert all(z == -100 for z in vlab)
                mapping.setdefault(k, v)
            else:  # final query: key seen before, value (truncated by the shift) scored
                assert k in mapping and mapping[k][: len(v)] == v
                assert vlab == v and lab[-1] == mapping[k][len(v)]
    assert sizes == ({1, 2, 3} if is_training else {3})
    if multi_query:
        assert scored > (20 if is_training else 0)


def test_fuzzy_recall_noise_is_unscored() -> None:
    V, noise_v = 32, 8
    x, y = generate_fuzzy_in_context_recall(
        200, 64, V, 2, 2, noise_vocab_size=noise_v, frac_noise=0.3, generator=gen()
    )
    ns = V - 1 - noise_v
    noise = (x >= ns) & (x < V - 1)
    assert 0.15 < noise.float().mean() < 0.4
    assert (y[:, :-1][noise[:, 1:]] == -100).all()  # a noise token is never a target
    lab = y[y != -100]
    assert lab.min() >= ns // 2 and lab.max() < ns
    assert ((y != -100).sum(1) >= 1).all()


def test_selective_copying_targets_are_tokens_in_order() -> None:
    V, L, m = 16, 40, 8
    x, y = generate_selective_copying(200, L, V, m, gen())
    blank, copy = V - 2, V - 1
    prefix = L - m - 1
    assert (x[:, prefix] == copy).all() and (x[:, prefix + 1 :] == blank).all()
    assert (y[:, : prefix + 1] == -100).all()
    for row, lab in zip(x.tolist(), y.tolist()):
        assert [t for t in row[:prefix] if t != blank] == lab[prefix + 1 :]
    last_tok_pos = (x[:, :prefix] != blank).long().cumsum(1).argmax(1)
    assert (last_tok_pos < prefix - 1).any()  # blanks may follow the last token (MAD never did)


def test_compression_labels() -> None:
    V, L = 16, 20
    x, y = generate_compression(100, L, V, generator=gen())
    m = L // 2
    assert (x[:, m:] == V - 1).all() and (y[:, :m] == -100).all()
    assert torch.equal(y[:, m:], x[:, :m])
    xn, yn = generate_compression(300, L, 24, noise_vocab_size=8, frac_noise=0.3, generator=gen())
    noise = xn[:, :m] >= 15
    assert 0.2 < noise.float().mean() < 0.4
    assert (yn[:, m:][noise] == -100).all()
    assert torch.equal(yn[:, m:][~noise], xn[:, :m][~noise])


def test_memorization_fixed_map() -> None:
    dm = MemorizationDataModule(vocab_size=64, seq_len=16, num_train=200, num_test=50)
    dm.setup()
    nk = (64 - 1) // 2
    kv = dm.kv_map
    assert kv.shape == (nk,) and len(set(kv.tolist())) == nk and kv.min() >= nk and kv.max() < 63
    for data in (dm.train_data, dm.test_data):
        x, y = data.inputs, data.labels
        assert (x[:, 1::2] == 63).all() and (y[:, 0::2] == -100).all()
        assert torch.equal(y[:, 1::2], kv[x[:, 0::2]])
    other = MemorizationDataModule(vocab_size=64, seq_len=16, seed=1)
    assert not torch.equal(other.kv_map, kv)
    noisy = MemorizationDataModule(
        vocab_size=64, seq_len=16, noise_vocab_size=8, frac_noise=0.5, num_train=50, num_test=20
    )
    noisy.setup()
    x, y = noisy.train_data.inputs, noisy.train_data.labels
    nk2 = (64 - 1 - 8) // 2
    real = x[:, 1::2] == 63
    assert ((x[:, 0::2] >= 55) == ~real).all() and (y[:, 1::2][~real] == -100).all()
    assert torch.equal(y[:, 1::2][real], noisy.kv_map[x[:, 0::2][real]])
    assert noisy.kv_map.max() < 55 and noisy.kv_map.min() >= nk2 and real.any(1).all()


# ----------------------------------------------------------------------------- delimited recall


def test_delimited_answers_come_from_own_segment() -> None:
    V, S, k, q, a = 64, 4, 4, 3, 1
    x, y = generate_delimited_recall(300, V, S, k, q, a, key_reuse=0.5, generator=gen())
    seg = 2 * k + q + a + 1
    null, eos = V - 2, V - 1
    assert x.shape == (300, S * seg)
    assert (x[:, seg - 1 :: seg] == eos).all()
    stale_wrong = reused = 0
    for row, lab in zip(x.tolist(), y.tolist()):
        memory: dict[int, int] = {}  # what a model that never clears would remember
        prev: dict[int, int] = {}
        for s in range(S):
            r, lb = row[s * seg : (s + 1) * seg], lab[s * seg : (s + 1) * seg]
            kv = dict(zip(r[0 : 2 * k : 2], r[1 : 2 * k : 2]))
            assert len(kv) == k and all(1 <= kk < V // 2 for kk in kv)
            assert all(V // 2 <= vv < null for vv in kv.values())
            reused += sum(1 for kk in kv if kk in prev)
            assert all(prev[kk] != vv for kk, vv in kv.items() if kk in prev)
            assert all(v == -100 for v in lb[: 2 * k]) and lb[-1] == -100
            queries = list(zip(r[2 * k : -1], lb[2 * k : -1]))
            assert sum(1 for kk, _ in queries if kk not in kv) == a
            for kk, ans in queries:
                assert ans == kv.get(kk, null)
                memory_ans = {**memory, **kv}.get(kk, null) if kk in kv else memory.get(kk, null)
                stale_wrong += memory_ans != ans
            memory.update(kv)
            prev = kv
    assert reused > 0 and stale_wrong > 0  # keys repeat with new values; absent keys have stale values


def test_delimited_datamodule_and_padding() -> None:
    dm = DelimitedRecallDataModule(
        num_segments=2,
        num_kv_pairs=3,
        num_queries=2,
        num_absent_queries=0,
        key_reuse=1.0,
        seq_len=40,
        num_train=50,
        num_test=20,
    )
    assert dm.seq_len == 40 and dm.slice_names == ["seg2_kv3"] and dm.slice_kv_pairs == [3]
    dm.setup()
    content = 2 * (2 * 3 + 2 + 1)
    assert (dm.train_data.inputs[:, content:] == 0).all()
    assert (dm.train_data.labels[:, content:] == -100).all()
    x = dm.train_data.inputs
    assert torch.equal(x[:, 0:6:2].sort(1).values, x[:, 9:15:2].sort(1).values)  # key_reuse=1: same keys


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "name, kwargs, words",
    [
        (
            "selective_copying",
            dict(seq_len=32, num_tokens_to_copy=16),
            ["num_tokens_to_copy=16", "seq_len=32"],
        ),
        ("selective_copying", dict(vocab_size=2), ["vocab_size=2"]),
        ("in_context_recall", dict(seq_len=33), ["seq_len=33", "even"]),
        ("noisy_in_context_recall", dict(frac_noise=1.0), ["frac_noise"]),
        ("noisy_in_context_recall", dict(noise_vocab_size=0), ["noise_vocab_size=0", "frac_noise"]),
        ("noisy_in_context_recall", dict(vocab_size=17), ["vocab_size=17", "noise_vocab_size=16"]),
        ("fuzzy_in_context_recall", dict(seq_len=16), ["seq_len=16", "k_motif_size + v_motif_size"]),
        ("fuzzy_in_context_recall", dict(k_motif_size=8), ["k_motif_size=8"]),
        ("compression", dict(seq_len=31), ["seq_len=31"]),
        ("memorization", dict(vocab_size=2), ["vocab_size=2"]),
        ("delimited_recall", dict(num_queries=5), ["num_queries=5", "num_kv_pairs=4"]),
        ("delimited_recall", dict(vocab_size=16, num_kv_pairs=6), ["vocab_size=16", "num_kv_pairs=6"]),
        ("delimited_recall", dict(seq_len=10), ["seq_len=10"]),
        ("delimited_recall", dict(key_reuse=1.5), ["key_reuse"]),
    ],
)
def test_bad_configs_name_the_parameter(name: str, kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as e:
        build_task(name, **kwargs)
    for w in words:
        assert w in str(e.value)
