"""The engine's operator contract: the ``Operator`` base class and the structured operators.

Each structured operator is compared with the plain form built from the tensors it says it stands for
(``RecurrentOperator(a, b, c)`` / ``DenseOperator(T)``): ``apply``, ``dense``, ``subset`` and gradients,
in float64 (one recurrence of ``L`` steps: ``tol(float64, scale, L)``). Large tensors are built once.
"""

from __future__ import annotations

import pytest
import torch

from ess_train.ess import (
    DeltaRuleOperator,
    DenseOperator,
    GatedToeplitzOperator,
    Operator,
    RecurrentOperator,
    SelectiveSSMOperator,
    ShiftRegisterOperator,
    entropy_ess,
)
from tests.tolerances import assert_within, tol

F64 = torch.float64
BATCH, D, L, N = 2, 3, 12, 4


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def selective(g: torch.Generator) -> SelectiveSSMOperator:
    dt = torch.rand(BATCH, D, L, generator=g, dtype=F64) * 0.5 + 0.01
    A = -torch.rand(D, N, generator=g, dtype=F64) * 2 - 0.1
    B, C = (torch.randn(BATCH, L, N, generator=g, dtype=F64) for _ in range(2))
    return SelectiveSSMOperator(dt, A, B, C)


def delta_rule(g: torch.Generator) -> DeltaRuleOperator:
    k = torch.nn.functional.normalize(torch.randn(BATCH, D, L, N, generator=g, dtype=F64), dim=-1)
    beta = torch.rand(BATCH, D, L, generator=g, dtype=F64)
    c = torch.randn(BATCH, D, L, N, generator=g, dtype=F64)
    return DeltaRuleOperator(k, beta, c)


def toeplitz(g: torch.Generator) -> GatedToeplitzOperator:
    h = torch.randn(D, L, generator=g, dtype=F64)
    g_out, g_in = (torch.randn(BATCH, D, L, generator=g, dtype=F64) for _ in range(2))
    return GatedToeplitzOperator(h, g_out, g_in)


def shift_register(g: torch.Generator) -> ShiftRegisterOperator:
    return ShiftRegisterOperator(torch.randn(D, N, generator=g, dtype=F64), BATCH, L)


def gated_shift_register(g: torch.Generator) -> ShiftRegisterOperator:
    """LFM2's gated short convolution: ``T[t, s] = g_out[t] taps[t - s] g_in[s]``."""
    taps = torch.randn(D, N, generator=g, dtype=F64)
    g_in, g_out = (torch.randn(BATCH, D, L, generator=g, dtype=F64) for _ in range(2))
    return ShiftRegisterOperator(taps, BATCH, L, g_in=g_in, g_out=g_out)


STRUCTURED = {
    "selective": selective,
    "delta_rule": delta_rule,
    "toeplitz": toeplitz,
    "shift": shift_register,
    "gated_shift": gated_shift_register,
}


def plain(op: Operator) -> Operator:
    """The same operator in its plain form, from the tensors the structured one builds."""
    if isinstance(op, DenseOperator):
        return DenseOperator(op.T.clone())
    assert isinstance(op, RecurrentOperator)
    tails = (2 if op.diagonal else 3, 2, 2)
    a, b, c = (x.expand(*op.batch_shape, *x.shape[x.dim() - t :]) for x, t in zip((op.a, op.b, op.c), tails))
    return RecurrentOperator(a.clone(), b.clone(), c.clone())


def test_operator_is_abstract():
    with pytest.raises(TypeError):
        Operator()  # type: ignore[abstract]
    op = RecurrentOperator(*(torch.randn(1, L, N) for _ in range(3)))
    assert isinstance(op, Operator) and isinstance(DenseOperator(torch.eye(L)), Operator)
    assert op.num_operators == 1


@pytest.mark.parametrize("name", STRUCTURED)
def test_structured_matches_plain_form(name):
    op = STRUCTURED[name](_gen())
    ref = plain(op)
    assert ref.batch_shape == op.batch_shape == (BATCH, D) and ref.seq_len == op.seq_len == L
    assert op.dtype == F64
    u = torch.randn(BATCH, D, L, 2, generator=_gen(1), dtype=F64)
    scale = float(ref.dense().abs().max() * u.abs().max())
    assert_within(op.apply(u), ref.apply(u), tol(F64, scale, L), f"{name} apply")
    assert_within(op.dense(), ref.dense(), tol(F64, float(ref.dense().abs().max()), L), f"{name} dense")
    idx = torch.tensor([2, 0])
    sub, ref_sub = op.subset(rows=1, index=idx), ref.subset(rows=1, index=idx)
    assert type(sub) is type(op) and sub.batch_shape == (1, 2)
    assert_within(sub.dense(), ref_sub.dense(), tol(F64, float(ref.dense().abs().max()), L), f"{name} subset")
    pos = [3, 6, 9]
    assert_within(entropy_ess(op, positions=pos), entropy_ess(ref, positions=pos), 1e-9, f"{name} ESS")


def test_gated_shift_register_is_the_gated_short_convolution():
    op = gated_shift_register(_gen(2))
    band = GatedToeplitzOperator(torch.nn.functional.pad(op.taps, (0, L - N)), op.g_out, op.g_in)
    assert_within(op.dense(), band.dense(), tol(F64, float(band.dense().abs().max()), N), "gated shift")


@pytest.mark.parametrize("name", ["selective", "delta_rule", "toeplitz"])
def test_large_tensors_built_once(name):
    op = STRUCTURED[name](_gen())
    attrs = ["T"] if isinstance(op, DenseOperator) else ["a", "b", "c"]
    for attr in attrs:
        assert getattr(op, attr) is getattr(op, attr), f"{name}.{attr} rebuilt on a second read"


def test_subset_cuts_factors_not_built_tensors():
    op = delta_rule(_gen())
    sub = op.subset(rows=1, index=torch.tensor([1]))
    assert "a" not in vars(op) and "a" not in vars(sub)  # the [.., L, N, N] transitions never built
    sub.apply(torch.randn(1, 1, L, dtype=F64))
    assert "a" not in vars(sub)  # apply uses the rank-one form


def test_delta_rule_gradients_match_plain_form():
    g = _gen(3)
    k0 = torch.nn.functional.normalize(torch.randn(1, 2, L, N, generator=g, dtype=F64), dim=-1)
    beta0, c0 = torch.rand(1, 2, L, generator=g, dtype=F64), torch.randn(1, 2, L, N, generator=g, dtype=F64)
    u = torch.randn(1, 2, L, generator=g, dtype=F64)
    grads = []
    for structured in (True, False):
        k, beta, c = (x.clone().requires_grad_() for x in (k0, beta0, c0))
        op = DeltaRuleOperator(k, beta, c)
        if not structured:
            op = RecurrentOperator(op.a, op.b, op.c)
        op.apply(u).square().sum().backward()
        grads.append([x.grad for x in (k, beta, c)])
    for gs, gp in zip(*grads, strict=True):
        assert_within(gs, gp, tol(F64, float(gp.abs().max()), L * N), "delta rule grad")


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda: SelectiveSSMOperator(
                torch.rand(2, 3, 5), torch.rand(4, 2), torch.rand(2, 5, 2), torch.rand(2, 5, 2)
            ),
            "inconsistent shapes",
        ),
        (lambda: DeltaRuleOperator(torch.rand(2, 5, 3), torch.rand(2, 4), torch.rand(2, 5, 3)), "beta"),
        (lambda: GatedToeplitzOperator(torch.rand(3, 5), torch.rand(3, 4), torch.rand(3, 5)), "last dim L"),
        (lambda: ShiftRegisterOperator(torch.rand(3), 2, 5), r"taps must be \[G, k\]"),
        (
            lambda: ShiftRegisterOperator(torch.rand(3, 2), 2, 5, g_in=torch.rand(2, 3, 4)),
            r"g_in must be \[batch, G, L\]",
        ),
        (
            lambda: SelectiveSSMOperator(
                *(torch.ones(2, 3, 5, dtype=torch.long) for _ in range(1)),
                torch.rand(3, 2),
                torch.rand(2, 5, 2),
                torch.rand(2, 5, 2),
            ),
            "floating",
        ),
    ],
)
def test_structured_bad_input(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()
