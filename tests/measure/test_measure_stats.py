"""Per-layer statistics: the one utilization definition, batched entropy profiles, operator subsets."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from ess_train.ess import DenseOperator, RecurrentOperator
from ess_train.measure import (
    compute_copy,
    entropy_profile,
    entropy_profiles,
    layer_ess,
    layer_utilization,
    position_bounds,
)
from ess_train.models.protocol import find_ess_layers, operators_of
from tests.tolerances import tol
from tests.toy_modules import ToyDataModule, ToyDense, ToyDenseNet, ToyLM

# float32 sums and means of at most 8 rows x 8 channels x 12 positions of ESS values (all >= 0: no
# cancellation), taken in different orders by the code and by the test (tests/tolerances.py)
AGG = tol(torch.float32, n=8 * 8 * 12)


def test_layer_utilization_against_the_rank_bounds():
    ess = torch.tensor([[0.0, 1.0, 2.0, 1.0]])  # L = 4, per_operator 2: bounds 0, 1, 2, 1
    assert float(layer_utilization(ess, 2, 4, None)) == pytest.approx(1.0)
    # position 0 (b_0 = 0, ESS_0 = 0) changes nothing
    assert float(layer_utilization(ess[:, 1:], 2, 4, [1, 2, 3])) == pytest.approx(1.0)
    assert layer_utilization(ess, 0, 4, None) is None
    assert layer_utilization(torch.zeros(1, 1), 3, 1, None) is None  # L = 1


def test_gaussian_dense_operator_scales_to_its_rank():
    """Random lower-triangular T: every H_i has full rank min(i, L - i); entropy-ESS (effective rank of a
    Gaussian block) is ~0.9 of it, where the old definition gave < 0.5."""
    pl.seed_everything(0)
    lm = ToyLM(model=ToyDenseNet([ToyDense(kind="gaussian")]))
    inputs = ToyDataModule().train_dataloader().dataset.inputs[:4]
    layer = find_ess_layers(lm)["model.layers.0"]
    view = operators_of(lm, inputs)["model.layers.0"]
    stats = layer_ess(view, layer.state_size(12), None)
    assert 0.8 < stats.utilization < 1
    assert stats.avg_tolerance == pytest.approx(sum(position_bounds(6, 12, None)) / 12, rel=AGG)


def test_operator_subset_rotates_over_all_operators():
    a = torch.arange(10.0).reshape(1, 10, 1, 1).expand(2, 10, 3, 1).contiguous()
    op = RecurrentOperator(a, a, a)
    assert compute_copy(op) is op  # nothing cut: the operator itself
    seen = set()
    for offset in range(10):
        small = compute_copy(op, rows=1, operators=4, offset=offset)
        assert small.batch_shape == (1, 4)
        seen |= {int(v) for v in small.a[0, :, 0, 0]}
    assert seen == set(range(10))


def test_entropy_profiles_batches_compatible_operators_without_changing_results():
    """One engine call per compatible group gives each operator's own profile, with its own gradients."""
    g = torch.Generator().manual_seed(0)

    def rec(batch, N, full=False):
        a = torch.rand(*batch, 12, N, N, generator=g) / N if full else torch.rand(*batch, 12, N, generator=g)
        return [
            t.requires_grad_()
            for t in (a, torch.randn(*batch, 12, N, generator=g), torch.randn(*batch, 12, N, generator=g))
        ]

    leaves = [rec((2, 3), 4), rec((1, 5), 4), rec((2, 3), 3), rec((2, 2), 3, full=True)]
    ops = [RecurrentOperator(*x) for x in leaves]
    T = torch.tril(torch.randn(2, 3, 12, 12, generator=g)).requires_grad_()
    ops += [DenseOperator(T), DenseOperator(T[:1] * 2)]
    positions = [[1, 5, 11], [1, 5, 11], [1, 5, 11], None, [2, 6], [2, 6]]
    got = entropy_profiles(ops, positions)
    for op, pos, out in zip(ops, positions, got):
        torch.testing.assert_close(out, entropy_profile(op, pos), rtol=1e-5, atol=1e-6)
    sum(out.sum() for out in got).backward(retain_graph=True)
    grads = [x.grad.clone() for trio in leaves for x in trio] + [T.grad.clone()]
    for x in [x for trio in leaves for x in trio] + [T]:
        x.grad = None
    sum(entropy_profile(op, pos).sum() for op, pos in zip(ops, positions)).backward()
    for a, b in zip(grads, [x.grad for trio in leaves for x in trio] + [T.grad]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
