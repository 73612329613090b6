"""Positions where a model's recurrent layers reset their state: a delimiter token, fixed by the model.

``SequenceModel(reset_token=...)`` marks every position that holds that token and makes the mask current
for the duration of its forward (:func:`reset_positions`); a mixer that supports resets (``supports_resets =
True``: GLA) reads it with :func:`current_resets` and shuts its gate there, so that the state after a
delimiter holds nothing from before it. The same context covers ``ess_operators``, so the measured operator
is the one the model computes. A context variable, not an argument, because the mixers' forward takes only
the hidden states.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from torch import Tensor

__all__ = ["reset_positions", "current_resets", "RESET_LOG_GATE"]

# log of the gate at a reset: exp(-20) ~ 2e-9 of the state survives, below float32's resolution of what the
# delimiter adds, and the chunked kernels' factored exponents stay bounded
RESET_LOG_GATE = -20.0
_RESETS: ContextVar[Tensor | None] = ContextVar("ess_train_resets", default=None)


@contextmanager
def reset_positions(mask: Tensor | None) -> Iterator[None]:
    """Make ``mask`` (bool ``[batch, L]``: reset at these positions) current inside the block."""
    token = _RESETS.set(mask)
    try:
        yield
    finally:
        _RESETS.reset(token)


def current_resets() -> Tensor | None:
    """The reset mask of the forward in progress (``None``: no resets)."""
    return _RESETS.get()
