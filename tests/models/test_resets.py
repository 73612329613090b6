"""Forced resets at a delimiter token (``SequenceModel(reset_token=...)``, GLA's shut gate)."""

from __future__ import annotations

import pytest
import torch

from ess_train.models import SequenceModel
from ess_train.models.mixers.gla import GatedLinearAttention
from ess_train.models.ops.naive import gated_reference
from ess_train.models.resets import RESET_LOG_GATE, current_resets, reset_positions

EOS = 15


def _inputs(L: int, eos_at: list[int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, EOS, (2, L), generator=g)
    x[:, eos_at] = EOS
    return x


@pytest.mark.parametrize("L, chunk", [(40, 64), (150, 32)])  # one chunk; several chunks with resets inside
def test_the_chunked_gla_with_resets_matches_the_recurrence_on_outputs_and_gradients(L, chunk):
    torch.manual_seed(0)
    layer = GatedLinearAttention(32, num_heads=2, chunk_size=chunk).double()
    x = torch.randn(2, L, 32, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[0, [5, 33, L - 2]] = True
    mask[1, [min(chunk, L) - 1, min(chunk, L - 1)]] = True  # on both sides of a chunk boundary
    with reset_positions(mask):
        y = layer.operator(x).y
        f = layer.features(x)
    assert torch.all(f["gk"][mask[:, None, :, None].expand_as(f["gk"])] == RESET_LOG_GATE)
    ref = gated_reference(f["q"], f["k"], f["v"], f["gk"], layer.scale)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    w = torch.randn_like(y)
    (gy,) = torch.autograd.grad((y * w).sum(), x, retain_graph=True)
    (gr,) = torch.autograd.grad((ref * w).sum(), x)
    torch.testing.assert_close(gy, gr, rtol=1e-9, atol=1e-11)
    assert current_resets() is None  # the context ends with the block


def test_a_reset_model_carries_nothing_across_the_delimiter_and_a_free_one_does():
    torch.manual_seed(0)
    kw = dict(vocab_size=16, d_model=32, n_layers=2, mixer=["short_conv", "gla"])
    reset = SequenceModel(**kw, reset_token=-1).double()
    free = SequenceModel(**kw).double()
    free.load_state_dict(reset.state_dict())
    x = _inputs(40, [13, 27])
    t_reset = reset.ess_operators(x)["blocks.1.mixer"].op.dense()
    t_free = free.ess_operators(x)["blocks.1.mixer"].op.dense()
    scale = t_reset.abs().max()
    # across the EOS at 13 only what exp(RESET_LOG_GATE) lets through survives
    assert t_reset[..., 13:, :13].abs().max() <= 10 * torch.exp(torch.tensor(RESET_LOG_GATE)) * scale
    assert t_free[..., 13:, :13].abs().max() > 1e-2 * scale
    # before the first delimiter the two models are the same operator
    torch.testing.assert_close(t_reset[..., :13, :13], t_free[..., :13, :13])
    assert torch.isfinite(reset(x)).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reset_token=16), "outside the vocabulary of 16"),
        (dict(reset_token=-17), "outside the vocabulary"),
        (dict(reset_token=True), "reset_token must be None or a token id"),
        (dict(reset_token=3, mixer="attention"), "no layer supports resets"),
    ],
)
def test_bad_reset_tokens_are_refused_by_name(kwargs, match):
    base = dict(vocab_size=16, d_model=32, n_layers=1, mixer="gla")
    with pytest.raises(ValueError, match=match):
        SequenceModel(**{**base, **kwargs})
