"""ess_penalty without a trainer: floor (the monitored utilization), ceiling and decay_identity."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from ess_train.ess import RecurrentOperator, entropy_ess
from ess_train.measure import ess_penalty, layer_ess, resolve_positions
from ess_train.models.protocol import find_ess_layers, operators_of
from tests.tolerances import tol
from tests.toy_modules import ToyDataModule, ToyLM

# float32 sums and means of at most 8 rows x 8 channels x 12 positions of ESS values (all >= 0: no
# cancellation), taken in different orders by the code and by the test (tests/tolerances.py)
AGG = tol(torch.float32, n=8 * 8 * 12)


def test_floor_target_is_the_monitored_utilization():
    """ess_penalty(floor, min_utilization=1) == (1 - utilization)^2 with the utilization layer_ess/ESSMonitor
    report, for all positions and for an int count of positions (which leaves position 0 out)."""
    pl.seed_everything(0)
    lm = ToyLM()
    inputs = ToyDataModule().train_dataloader().dataset.inputs[:4]
    layers = find_ess_layers(lm)
    name = "layers.0"
    for spec in (None, 5):
        views = {name: operators_of(lm, inputs)[name]}
        pen = ess_penalty(
            views, layers, "floor", min_utilization=1.0, positions=spec, batch_rows=None, max_operators=None
        )
        positions = resolve_positions(spec, 12)
        stats = layer_ess(views[name], layers[name].state_size(12), positions)
        # (1 - u)^2 carries u's relative error times 2 u / (1 - u)
        u = stats.utilization
        assert float(pen) == pytest.approx((1 - u) ** 2, rel=AGG * (1 + 2 * u / (1 - u)))
    # direct formula at all positions
    ess = entropy_ess(views[name].op).mean(dim=(0, 1))
    util = float(ess.sum()) / sum(min(4, i, 12 - i) for i in range(12))
    stats = layer_ess(views[name], layers[name].state_size(12), None)
    assert stats.utilization == pytest.approx(util, rel=AGG)


def toy_views():
    """A seeded ToyLM, its protocol layers and the views of one forward on 4 training rows."""
    pl.seed_everything(0)
    model = ToyLM()
    inputs = ToyDataModule().train_dataloader().dataset.inputs[:4]
    layers = find_ess_layers(model)
    return model, inputs, layers, operators_of(model, inputs)


def test_decay_identity_and_ceiling_penalties():
    model, inputs, layers, views = toy_views()
    a = [torch.sigmoid(layer.decay_logit) for layer in layers.values()]
    expected = torch.stack([(1 - x).square().mean() for x in a]).mean()
    got = ess_penalty(views, layers, "decay_identity")
    torch.testing.assert_close(got, expected)
    got.backward()
    assert all(layer.decay_logit.grad.abs().sum() > 0 for layer in layers.values())
    views = operators_of(model, inputs)
    ceiling = ess_penalty(
        views, layers, "ceiling", max_ess=0.0, positions=None, batch_rows=None, max_operators=None
    )
    avg = torch.stack([entropy_ess(v.op).mean() for v in views.values()]).mean()
    torch.testing.assert_close(ceiling, avg)
    assert float(ess_penalty(views, layers, "ceiling", max_ess=100.0)) == 0.0


def test_decay_identity_counts_only_learned_transitions():
    """A short conv's shift register and linear attention's identity are fixed: they neither add a
    constant nor dilute the mean over the layers whose transitions the penalty can move."""
    from ess_train.models import SequenceModel

    torch.manual_seed(0)
    tokens = torch.randint(0, 32, (2, 16))
    hybrid = SequenceModel(vocab_size=32, d_model=16, n_layers=2, mixer=["short_conv", "gla"])
    layers = find_ess_layers(hybrid)
    assert set(layers) == {"blocks.0.mixer", "blocks.1.mixer"}
    views = operators_of(hybrid, tokens)
    assert ess_penalty(views, layers, "decay_identity") is not None
    gla_only = {"blocks.1.mixer": layers["blocks.1.mixer"]}
    torch.testing.assert_close(
        ess_penalty(views, layers, "decay_identity"), ess_penalty(views, gla_only, "decay_identity")
    )
    fixed = SequenceModel(vocab_size=32, d_model=16, n_layers=2, mixer=["short_conv", "linear_attention"])
    views = operators_of(fixed, tokens)
    assert all(isinstance(v.op, RecurrentOperator) for v in views.values())
    assert ess_penalty(views, find_ess_layers(fixed), "decay_identity") is None


def test_penalty_targets_are_checked_and_keyword_only():
    _, _, layers, views = toy_views()
    with pytest.raises(ValueError, match="max_ess"):
        ess_penalty(views, layers, "ceiling")
    with pytest.raises(TypeError):  # the targets are keyword-only: no positional target by mistake
        ess_penalty(views, layers, "floor", 0.9)
