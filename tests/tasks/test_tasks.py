"""MQAR semantics, seeding, leakage check, config validation, registry, loaders and cache."""

from __future__ import annotations

import pytest
import torch

from ess_train.tasks import (
    TASKS,
    MQARConfig,
    MQARDataModule,
    UnknownConfigKeyError,
    build_task,
    generate_mqar,
    make_generator,
    task_names,
)
from ess_train.tasks.base import rows_in, sample_distinct

SMALL = dict(num_train=300, num_test=60)
# small, valid configs for every task (used by the cross-task tests)
TINY = {
    "mqar": dict(vocab_size=64, seq_len=32, num_kv_pairs=4),
    "in_context_recall": dict(seq_len=32),
    "noisy_in_context_recall": dict(seq_len=32),
    "fuzzy_in_context_recall": dict(seq_len=48),
    "selective_copying": dict(seq_len=32, num_tokens_to_copy=6),
    "compression": dict(seq_len=16),
    "memorization": dict(seq_len=16, vocab_size=64),
    "delimited_recall": dict(num_segments=3),
}


def mqar_rows(n: int = 200, seq_len: int = 64, k: int = 8, vocab: int = 128, seed: int = 0, **kw):
    return generate_mqar(n, seq_len, k, vocab, generator=make_generator(seed, "t"), **kw)


# ----------------------------------------------------------------------------- MQAR semantics


def test_mqar_answers_are_the_paired_values() -> None:
    k = 8
    x, y = mqar_rows(k=k)
    for row, lab in zip(x.tolist(), y.tolist()):
        kv = dict(zip(row[0 : 2 * k : 2], row[1 : 2 * k : 2]))
        assert len(kv) == k  # distinct keys
        answered = [(t, row[t], lab[t]) for t in range(len(row)) if lab[t] != -100]
        assert sorted(key for _, key, _ in answered) == sorted(kv)  # each key queried exactly once
        for t, key, val in answered:
            assert t >= 2 * k and (t - 2 * k) % 2 == 0  # queries after the kv block, at even offsets
            assert kv[key] == val


def test_mqar_vocabulary_halves() -> None:
    k, vocab = 8, 128
    x, y = mqar_rows(k=k, vocab=vocab)
    keys, vals = x[:, 0 : 2 * k : 2], x[:, 1 : 2 * k : 2]
    assert keys.min() >= 1 and keys.max() < vocab // 2
    assert vals.min() >= vocab // 2 and vals.max() < vocab
    assert len(set(vals[0].tolist())) == k
    ans = y[y != -100]
    assert ans.min() >= vocab // 2 and ans.max() < vocab
    assert x.min() >= 0 and x.max() < vocab


def test_mqar_filler_zero_without_random_non_queries() -> None:
    k = 4
    x, y = mqar_rows(k=k, random_non_queries=False)
    tail, lab = x[:, 2 * k :], y[:, 2 * k :]
    assert ((tail == 0) == (lab == -100)).all()


def test_mqar_power_law_gaps() -> None:
    def mean_offset(a: float) -> float:
        _, y = mqar_rows(n=2000, seq_len=256, k=4, vocab=512, power_a=a)
        pos = (y != -100).nonzero()[:, 1].double()
        return float(pos.mean())

    assert mean_offset(0.01) < mean_offset(1.0) - 20  # power law: queries come early


def test_mqar_deterministic_and_seed_dependent() -> None:
    a, b, c = mqar_rows(seed=1), mqar_rows(seed=1), mqar_rows(seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_mqar_global_rng_untouched() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    dm = MQARDataModule(**SMALL)
    dm.setup()
    assert torch.equal(torch.rand(3), expected)


# ----------------------------------------------------------------------------- data module


def test_mqar_datamodule_batch() -> None:
    dm = MQARDataModule(**SMALL, batch_size=16)
    assert (dm.vocab_size, dm.seq_len, dm.num_kv_pairs, dm.slice_kv_pairs) == (128, 64, 4, [4])
    assert dm.slice_names == ["L64_kv4"] and dm.pad_token == 0
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"inputs", "labels", "slice_id"}
    assert batch["inputs"].shape == batch["labels"].shape == (16, 64)
    assert batch["slice_id"].shape == (16,)
    assert all(v.dtype == torch.long for v in batch.values())
    val = next(iter(dm.val_dataloader()))
    assert val["inputs"].shape[1] == 64
    assert len(dm.train_data) == 300 and len(dm.test_data) == 60


def test_mqar_mixture_slices_and_padding() -> None:
    dm = MQARDataModule(
        vocab_size=80,
        train_slices=[[16, 2], [32, 4, 50]],
        test_slices=[[16, 2], [32, 8]],
        num_train=40,
        num_test=20,
    )
    assert dm.slice_names == ["L16_kv2", "L32_kv8", "L32_kv4"]
    assert dm.slice_kv_pairs == [2, 8, 4] and dm.seq_len == 32 and dm.num_kv_pairs == 8
    dm.setup()
    tr, te = dm.train_data, dm.test_data
    assert torch.bincount(tr.slice_id, minlength=3).tolist() == [40, 0, 50]
    assert torch.bincount(te.slice_id, minlength=3).tolist() == [20, 20, 0]
    short = tr.slice_id == 0
    assert (tr.inputs[short, 16:] == 0).all() and (tr.labels[short, 16:] == -100).all()
    counts = (te.labels != -100).sum(1)
    assert (counts[te.slice_id == 0] == 2).all() and (counts[te.slice_id == 1] == 8).all()


def test_mqar_slices_from_omegaconf_and_dicts() -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {"train_slices": [[16, 2], {"seq_len": 32, "num_kv_pairs": 4, "num_examples": 10}], "vocab_size": 64}
    )
    dm = build_task("mqar", **cfg, num_train=10, num_test=5)
    assert dm.slice_names == ["L16_kv2", "L32_kv4"]
    assert dm.config.train_slices == [[16, 2], {"seq_len": 32, "num_kv_pairs": 4, "num_examples": 10}]


def test_mqar_test_power_a_used_for_test_split() -> None:
    dm = MQARDataModule(
        vocab_size=512,
        seq_len=256,
        num_kv_pairs=4,
        power_a=0.01,
        test_power_a=1.0,
        num_train=500,
        num_test=500,
    )
    dm.setup()

    def mean_pos(ds) -> float:
        return float((ds.labels != -100).nonzero()[:, 1].double().mean())

    assert mean_pos(dm.train_data) < mean_pos(dm.test_data) - 20


# ----------------------------------------------------------------------------- seeds and leakage


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_task_seeded_disjoint_and_loadable(name: str) -> None:
    kw = {**TINY[name], **SMALL}
    a, b, c = build_task(name, seed=3, **kw), build_task(name, seed=3, **kw), build_task(name, seed=4, **kw)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.train_data.inputs, b.train_data.inputs)
    assert torch.equal(a.test_data.labels, b.test_data.labels)
    assert not torch.equal(a.train_data.inputs, c.train_data.inputs)
    assert not rows_in(a.train_data.inputs, a.test_data.inputs).any()
    assert a.leakage_report["dropped"] == 0
    batch = next(iter(a.train_dataloader()))
    assert batch["inputs"].shape == (a.config.batch_size, a.seq_len)
    assert batch["inputs"].dtype == batch["labels"].dtype == batch["slice_id"].dtype == torch.long
    assert batch["inputs"].min() >= 0 and batch["inputs"].max() < a.vocab_size
    lab = batch["labels"][batch["labels"] != -100]
    assert lab.numel() > 0 and lab.min() >= 0 and lab.max() < a.vocab_size
    assert (batch["slice_id"] < len(a.slice_names)).all()


def test_train_and_test_streams_differ() -> None:
    dm = MQARDataModule(num_train=100, num_test=100)
    dm.setup()
    assert not torch.equal(dm.train_data.inputs, dm.test_data.inputs)


def test_leaked_test_rows_are_regenerated() -> None:
    # 31 keys x 32 values x 64 fillers: ~1/3 of test rows collide with 20k training rows at first
    dm = MQARDataModule(vocab_size=64, seq_len=4, num_kv_pairs=1, num_train=20_000, num_test=300)
    dm.setup()
    rep = dm.leakage_report
    assert rep["test_in_train"] > 20 and rep["regenerated"] == rep["test_in_train"] - rep["dropped"]
    assert len(dm.test_data) == 300 - rep["dropped"]
    assert not rows_in(dm.train_data.inputs, dm.test_data.inputs).any()


def test_leaked_rows_dropped_when_space_exhausted() -> None:
    # only 15 distinct rows exist: every test row is in training and cannot be replaced
    dm = MQARDataModule(vocab_size=5, seq_len=4, num_kv_pairs=1, num_train=500, num_test=20)
    dm.setup()
    assert dm.leakage_report == {"test_in_train": 20, "regenerated": 0, "dropped": 20}
    assert len(dm.test_data) == 0


def test_cache_roundtrip(tmp_path) -> None:
    dm = MQARDataModule(**SMALL, cache_dir=str(tmp_path))
    dm.setup()
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("mqar-")
    dm2 = MQARDataModule(**SMALL, cache_dir=str(tmp_path), batch_size=7)  # loader fields share the cache
    assert dm2.cache_path() == dm.cache_path()
    dm2.setup()
    assert torch.equal(dm.train_data.inputs, dm2.train_data.inputs)
    assert torch.equal(dm.test_data.labels, dm2.test_data.labels)
    assert MQARDataModule(**SMALL, cache_dir=str(tmp_path), seed=1).cache_path() != dm.cache_path()


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(seq_len=63), ["seq_len=63", "even"]),
        (dict(vocab_size=64, seq_len=64), ["vocab_size=64", "seq_len=64"]),
        (dict(seq_len=64, num_kv_pairs=17), ["num_kv_pairs=17", "4 * num_kv_pairs <= seq_len"]),
        (dict(num_kv_pairs=0), ["num_kv_pairs=0"]),
        (dict(power_a=0.0), ["power_a"]),
        (dict(seq_len=64, train_slices=[[32, 4]]), ["train_slices", "seq_len"]),
        (dict(train_slices=[[32, 9]]), ["train_slices[0].num_kv_pairs=9"]),
        (dict(test_slices=[[32]]), ["test_slices[0]"]),
        (dict(train_slices=[{"seq_len": 32, "kv": 4}]), ["train_slices[0]", "kv"]),
        (dict(num_train=0), ["num_train=0"]),
        (dict(random_non_queries="yes"), ["random_non_queries"]),
    ],
)
def test_mqar_bad_config_names_parameter(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as e:
        MQARDataModule(**kwargs)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_unknown_key_rejected(name: str) -> None:
    with pytest.raises(TypeError) as e:
        build_task(name, num_kv_pair=4)
    msg = str(e.value)
    assert "num_kv_pair" in msg and "valid keys" in msg and "seed" in msg
    with pytest.raises(ValueError):
        build_task(name, bogus=1)


def test_registry() -> None:
    assert set(task_names()) == {
        "mqar",
        "in_context_recall",
        "noisy_in_context_recall",
        "fuzzy_in_context_recall",
        "selective_copying",
        "compression",
        "memorization",
        "delimited_recall",
    }
    assert isinstance(build_task("in-context-recall", seq_len=32), TASKS["in_context_recall"])
    with pytest.raises(ValueError, match="available"):
        build_task("nope")


def test_config_object_and_overrides() -> None:
    cfg = MQARConfig.from_kwargs(seq_len=32)
    dm = MQARDataModule(cfg, num_kv_pairs=2)
    assert dm.config.seq_len == 32 and dm.config.num_kv_pairs == 2
    with pytest.raises(UnknownConfigKeyError):
        MQARConfig.from_kwargs(seqlen=32)
    with pytest.raises(ValueError, match="seq_len=33"):
        MQARConfig(seq_len=33)  # direct construction validates too
    assert MQARConfig(train_slices=[(16, 2)]).train_slices == [[16, 2]]


def test_sample_distinct_excludes() -> None:
    g = make_generator(0, "x")
    excl = torch.stack([torch.randperm(30, generator=g)[:10] for _ in range(500)])
    for k in (3, 12):
        s = sample_distinct(30, k, 500, g, exclude=excl)
        assert not (s[:, :, None] == excl[:, None, :]).any()
        assert (s.sort(1).values.diff(dim=1) != 0).all()


def test_padded_eval_sampler_splits_without_repeats():
    """Every index once over the ranks, equal counts per rank, the rest padding rows (labels ignored)."""
    from ess_train.tasks.base import IGNORE_INDEX, PaddedEvalSampler, TensorDictDataset

    data = TensorDictDataset(
        torch.arange(13 * 4).reshape(13, 4),
        torch.ones(13, 4, dtype=torch.long),
        torch.zeros(13, dtype=torch.long),
    )
    shards = [list(PaddedEvalSampler(data, num_replicas=3, rank=rank)) for rank in range(3)]
    assert {len(s) for s in shards} == {5}
    flat = [i for s in shards for i in s]
    assert sorted(i for i in flat if i < 13) == list(range(13)) and flat.count(13) == 2
    batch = data.__getitems__(shards[1])
    assert bool((batch["labels"][-1] == IGNORE_INDEX).all()) and bool((batch["labels"][:-1] == 1).all())


def test_resumed_training_sees_the_batches_of_an_uninterrupted_run(tmp_path):
    """Checkpoint mid-epoch (step 3 of 5 per epoch) and across an epoch boundary (step 6), resume: the
    batches after the checkpoint, and the final weights, are those of the uninterrupted run."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ess_train.lit import SequenceLM
    from ess_train.models import SequenceModel
    from ess_train.tasks import MQARDataModule

    class Record(pl.Callback):
        def __init__(self) -> None:
            self.seen: dict[int, int] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.seen[trainer.global_step] = hash(tuple(batch["inputs"].flatten().tolist()))

    def run(max_steps: int, ckpt: str | None = None, save: bool = False) -> tuple[Record, SequenceLM]:
        pl.seed_everything(0)
        dm = MQARDataModule(vocab_size=32, seq_len=16, num_kv_pairs=2, num_train=20, num_test=8, batch_size=4)
        lm = SequenceLM(SequenceModel(vocab_size=32, d_model=16, n_layers=1, mixer="linear_attention"))
        rec = Record()
        callbacks: list[pl.Callback] = [rec]
        if save:
            callbacks.append(
                ModelCheckpoint(tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
            )
        trainer = pl.Trainer(
            max_steps=max_steps,
            accelerator="cpu",
            logger=False,
            limit_val_batches=0,
            callbacks=callbacks,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=save,
        )
        trainer.fit(lm, dm, ckpt_path=ckpt)
        return rec, lm

    full, lm_full = run(9, save=True)
    assert [full.seen[s] for s in range(4)] != [full.seen[s] for s in range(5, 9)]  # reshuffled per epoch
    for step in (3, 6):
        resumed, lm_resumed = run(9, ckpt=str(tmp_path / f"step={step}.ckpt"))
        assert resumed.seen == {s: h for s, h in full.seen.items() if s >= step}
        for p, q in zip(lm_full.parameters(), lm_resumed.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
