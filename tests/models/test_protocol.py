"""The operator protocol: discovery of layers, capture of the forward's own views."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ess_train.ess import RecurrentOperator
from ess_train.models import build_mixer, mixer_names
from ess_train.models.protocol import (
    ESSMixer,
    OperatorView,
    StateSize,
    SupportsESS,
    capture_operators,
    find_ess_layers,
    operators_of,
)


class DecayMixer(ESSMixer):
    """y_t = sum_s prod(decay) x_s per channel: a diagonal recurrence with N = 1."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.linspace(-1, 2, d))
        self.calls = 0

    def operator(self, x: torch.Tensor) -> OperatorView:
        self.calls += 1
        B, L, D = x.shape
        a = torch.sigmoid(self.logit).expand(B, L, D).transpose(1, 2).unsqueeze(-1)  # [B, D, L, 1]
        ones = torch.ones_like(a)
        op = RecurrentOperator(a, ones, ones)
        u = x.transpose(1, 2)
        return OperatorView(op=op, u=u, y=op.apply(u))

    def readout(self, view: OperatorView, x: torch.Tensor) -> torch.Tensor:
        return view.y.transpose(1, 2)

    def state_size(self, seq_len: int) -> StateSize:
        return StateSize(total=self.logit.numel(), per_operator=1)


class UserLayer(nn.Module):
    """A user's layer that implements the protocol without subclassing ESSMixer."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.inner = DecayMixer(d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.inner(x)

    def operator(self, x: torch.Tensor) -> OperatorView:
        return self.inner.operator(x)

    def state_size(self, seq_len: int) -> StateSize:
        return self.inner.state_size(seq_len)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = DecayMixer(3)
        self.b = UserLayer(3)
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(self.a(x)))


def test_find_layers_skips_nested_and_filters_by_pattern() -> None:
    net = Net()
    assert list(find_ess_layers(net)) == ["a", "b"]  # b.inner is owned by b
    assert list(find_ess_layers(net, include=["b*"])) == ["b"]
    assert list(find_ess_layers(net, exclude=["a"])) == ["b"]
    assert isinstance(net.a, SupportsESS) and not isinstance(net.head, SupportsESS)


def test_capture_uses_the_forward_view_and_detaches_afterwards() -> None:
    net = Net()
    x = torch.randn(2, 5, 3)
    views = operators_of(net, x)
    assert set(views) == {"a", "b"}
    # ESSMixer: one operator() call per forward (the forward's own); user layer: pre-hook recomputes
    assert net.a.calls == 1
    for view in views.values():
        torch.testing.assert_close(view.op.apply(view.u), view.y)
    # the view of `a` is the forward's own: gradients flow from it to the parameters
    views["a"].y.sum().backward()
    assert net.a.logit.grad is not None and net.a.logit.grad.abs().sum() > 0
    # after the context, nothing is captured any more
    with capture_operators(find_ess_layers(net)) as sink:
        pass
    net(x)
    assert sink == {}
    assert net.a._capture_sinks == []


def test_two_nested_captures_both_receive() -> None:
    net = Net()
    layers = find_ess_layers(net)
    with capture_operators(layers) as outer, capture_operators({"a": net.a}) as inner:
        net(torch.randn(1, 4, 3))
    assert set(outer) == {"a", "b"} and set(inner) == {"a"}
    assert outer["a"] is inner["a"]


def test_view_shapes_are_batch_by_channel() -> None:
    view = operators_of(Net(), torch.randn(2, 6, 3))["a"]
    assert tuple(view.op.batch_shape) == (2, 3)
    assert view.u.shape == (2, 3, 6)


def test_state_size_is_frozen() -> None:
    s = StateSize(total=8, per_operator=4, multiplicity=2)
    with pytest.raises(AttributeError):
        s.total = 3  # type: ignore[misc]


@pytest.mark.parametrize("name", mixer_names())
def test_operator_subset_is_the_cut_of_the_whole_operator(name: str) -> None:
    """``op.subset(rows, index)`` (what the callbacks estimate ESS on) is the same kind of operator and
    equals the corresponding block of the whole operator; lazy zoo operators cut their factors."""
    torch.manual_seed(0)
    mixer = build_mixer(name, d_model=16)
    view = mixer.operator(torch.randn(3, 10, 16))
    op = view.op
    G = op.batch_shape[1]
    index = torch.tensor([G - 1, 0])
    sub = op.subset(2, index)
    assert type(sub) is type(op)
    assert tuple(sub.batch_shape) == (2, 2, *op.batch_shape[2:])
    torch.testing.assert_close(sub.dense(), op.dense()[:2].index_select(1, index))
    if hasattr(sub, "dt"):  # Mamba: the factors are cut, not a materialized [batch, D, L, N]
        assert sub.dt.shape == (2, 2, 10) and sub.A.shape[0] == 2
