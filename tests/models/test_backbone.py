"""SequenceModel and the mixer registry: shapes, hybrids, operators of all layers, init, errors, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ess_train.models import SequenceModel, build_mixer, build_model, mixer_names
from ess_train.models.backbone import RMSNorm
from ess_train.models.mixer_registry import get_mixer_class, register_mixer, resolve_mixer_name
from ess_train.models.mixers.mamba import Mamba
from ess_train.models.mixers.s4d import S4D
from ess_train.models.protocol import OperatorView, StateSize
from tests.tolerances import tol

V, D = 17, 16
ALL = [
    "attention",
    "sliding_window_attention",
    "linear_attention",
    "decayed_linear_attention",
    "gla",
    "deltanet",
    "mamba",
    "s4d",
    "short_conv",
    "hyena",
]


def ids(B: int, L: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max().clamp_min(1e-30))


def test_registry_lists_every_mixer_and_aliases() -> None:
    assert mixer_names() == ALL
    assert resolve_mixer_name("swa") == "sliding_window_attention"
    assert resolve_mixer_name("wla") == resolve_mixer_name("retnet") == "decayed_linear_attention"
    assert get_mixer_class("mamba") is Mamba
    from ess_train.models.mixers import S4D as S4DLazy

    assert S4DLazy is S4D


@pytest.mark.parametrize("name", ALL)
def test_shapes_operators_and_state_sizes_per_mixer(name: str) -> None:
    torch.manual_seed(0)
    model = SequenceModel(V, D, 2, mixer=name, max_seq_len=32)
    x = ids(2, 9)
    logits = model(x)
    assert logits.shape == (2, 9, V) and torch.isfinite(logits).all()
    views = model.ess_operators(x)
    assert list(views) == ["blocks.0.mixer", "blocks.1.mixer"]
    for view in views.values():
        assert isinstance(view, OperatorView) and view.op.seq_len == 9
        assert rel(view.op.apply(view.u), view.y) < tol(torch.float32, n=9 + D)  # sums over L and d
    sizes = model.state_sizes(9)
    assert list(sizes) == list(views) and all(isinstance(s, StateSize) for s in sizes.values())


def test_ess_operators_come_from_one_forward_pass() -> None:
    model = SequenceModel(V, D, 3, mixer=["short_conv", "mamba", "s4d"])
    calls = []
    model.embedding.register_forward_hook(lambda *a: calls.append(1))
    views = model.ess_operators(ids(1, 6))
    assert len(calls) == 1 and len(views) == 3


def test_hybrid_list_is_tiled_and_kwargs_split() -> None:
    model = SequenceModel(
        V,
        D,
        4,
        mixer=["short_conv", "gla"],
        mixer_kwargs={"chunk_size": 4, "gla": {"num_heads": 2}, "short_conv": {"kernel_size": 3}},
    )
    kinds = [type(b.mixer).__name__ for b in model.blocks]
    assert kinds == ["ShortConv", "GatedLinearAttention"] * 2
    assert model.blocks[0].mixer.kernel_size == 3
    assert model.blocks[1].mixer.num_heads == 2 and model.blocks[1].mixer.chunk_size == 4
    assert model(ids(2, 5)).shape == (2, 5, V)
    names = SequenceModel(V, D, 2, mixer=["swa", "retnet"]).mixer_names
    assert names == ["sliding_window_attention", "decayed_linear_attention"]


def test_mixer_kwargs_and_constructor_errors() -> None:
    with pytest.raises(ValueError, match="n_layers"):
        SequenceModel(V, D, 3, mixer=["short_conv", "gla"])
    with pytest.raises(ValueError, match="not_a_mixer"):
        SequenceModel(V, D, 2, mixer="not_a_mixer")
    with pytest.raises(ValueError, match="num_hedas"):
        SequenceModel(V, D, 2, mixer="gla", mixer_kwargs={"num_hedas": 2})
    with pytest.raises(ValueError, match="d_state"):
        SequenceModel(V, D, 2, mixer=["gla", "short_conv"], mixer_kwargs={"short_conv": {"d_state": 2}})
    with pytest.raises(ValueError, match="mamba"):  # settings for a mixer the model does not use
        SequenceModel(V, D, 2, mixer="gla", mixer_kwargs={"mamba": {"d_state": 2}})
    with pytest.raises(ValueError, match="d_model"):
        SequenceModel(V, D, 2, mixer="gla", mixer_kwargs={"d_model": 8})
    with pytest.raises(ValueError, match="norm"):
        SequenceModel(V, D, 2, mixer="gla", norm="batchnorm")
    with pytest.raises(ValueError, match="n_layers"):
        SequenceModel(V, D, 0)
    with pytest.raises(ValueError, match="max_seq_len"):
        SequenceModel(V, D, 1, mixer="short_conv", max_seq_len=4)(ids(1, 5))
    with pytest.raises(ValueError, match="max_seq_len"):
        SequenceModel(V, D, 1, mixer="short_conv", pos_embedding=True)


def test_registry_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="mamba") as err:
        build_mixer("mambaa", d_model=8)
    assert "unknown mixer 'mambaa'" in str(err.value) and "short_conv" in str(err.value)
    with pytest.raises(ValueError, match="d_sate"):
        build_mixer("mamba", d_model=8, d_sate=4)
    with pytest.raises(ValueError, match="n_layer"):
        build_model(vocab_size=V, d_model=D, n_layer=2)
    with pytest.raises(ValueError, match="already registered"):
        register_mixer("mamba", Mamba)
    assert isinstance(build_mixer("s6", d_model=8, d_state=2), Mamba)
    model = build_model(vocab_size=V, d_model=D, n_layers=1, mixer="s4d", mixer_kwargs={"d_state": 4})
    assert model.blocks[0].mixer.d_state == 4


def test_register_user_mixer(monkeypatch: pytest.MonkeyPatch) -> None:
    from ess_train.models import mixer_registry as registry

    # on a copy of the registry: later tests see only the built-in mixers
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_ALIASES", dict(registry._ALIASES))
    register_mixer("test_short_conv_alias", "ess_train.models.mixers.short_conv:ShortConv", overwrite=True)
    model = SequenceModel(V, D, 1, mixer="test_short_conv_alias")
    assert type(model.blocks[0].mixer).__name__ == "ShortConv"
    assert "test_short_conv_alias" in mixer_names()


def test_backbone_init_leaves_mixer_init_alone() -> None:
    torch.manual_seed(0)
    dt_min, dt_max, N = 0.002, 0.08, 8
    model = SequenceModel(
        V,
        64,
        2,
        mixer=["mamba", "s4d"],
        mixer_kwargs={"mamba": {"dt_min": dt_min, "dt_max": dt_max, "d_state": N}},
    )
    m = model.blocks[0].mixer
    assert isinstance(m, Mamba)
    dt = F.softplus(m.dt_proj.bias.detach().double())
    # float32 exp, softplus^-1 and softplus of values ~ log dt: a relative eps32 |log dt| each
    rtol = tol(torch.float32, 1 + abs(math.log(dt_min)), n=3)
    assert (dt >= dt_min * (1 - rtol)).all() and (dt <= dt_max * (1 + rtol)).all()
    frac = (dt.log() - math.log(dt_min)) / (math.log(dt_max) - math.log(dt_min))  # log-uniform -> uniform
    assert abs(float(frac.mean()) - 0.5) < 0.1 and float(frac.std()) > 0.2
    assert frac.min() < 0.1 and frac.max() > 0.9
    torch.testing.assert_close(m.A_log.detach(), torch.log(torch.arange(1, N + 1.0)).expand(128, N))
    torch.testing.assert_close(m.D.detach(), torch.ones(128))
    assert m.dt_proj.weight.abs().max() <= m.dt_rank**-0.5  # not re-drawn as N(0, 0.02)
    s = model.blocks[1].mixer
    assert isinstance(s, S4D)
    log_dt = s.log_dt.detach()
    atol = tol(torch.float32, abs(math.log(0.001)), n=2)  # u * (hi - lo) + lo in float32
    assert (log_dt >= math.log(0.001) - atol).all() and (log_dt <= math.log(0.1) + atol).all()
    torch.testing.assert_close(s.B.detach(), torch.ones_like(s.B))
    # the backbone's own modules did get its init
    assert abs(float(model.embedding.weight.detach().std()) - 0.02) < 0.005
    assert model.lm_head.weight is model.embedding.weight
    fc1 = model.blocks[0].mlp.fc1
    assert abs(float(fc1.weight.detach().std()) - 0.02) < 0.005
    assert torch.equal(fc1.bias, torch.zeros_like(fc1.bias))


def test_rmsnorm_untied_head_pos_embedding_and_no_mlp() -> None:
    model = SequenceModel(
        V,
        D,
        2,
        mixer="hyena",
        norm="rmsnorm",
        tie_embeddings=False,
        max_seq_len=12,
        pos_embedding=True,
        mlp_ratio=0,
    )
    assert isinstance(model.norm_f, RMSNorm) and model.lm_head.weight is not model.embedding.weight
    assert model.blocks[0].mlp is None
    assert model.blocks[0].mixer.max_seq_len == 12  # passed on to mixers that take it
    assert model(ids(2, 12)).shape == (2, 12, V)


def test_a_few_training_steps_reduce_the_loss() -> None:
    torch.manual_seed(0)
    model = SequenceModel(V, D, 2, mixer=["short_conv", "mamba"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = ids(4, 12, seed=3)
    inputs, labels = x[:, :-1], x[:, 1:]

    def loss_fn() -> torch.Tensor:
        return F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten())

    first = loss_fn().item()
    for _ in range(5):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss_fn().item() < first - 0.05
