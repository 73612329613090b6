"""SSM initializations and argument checks shared by Mamba and S4D (``A`` inits, ``dt`` ranges)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ess_train.checks import check_choice, check_positive_float

__all__ = [
    "A_INITS",
    "DT_RANGES",
    "check_dt_range",
    "parse_dt_range",
    "init_a_log_",
    "log_uniform_dt",
    "init_dt_bias_",
]

# A initializations (magnitudes |A_n| of A = -exp(A_log)); the first is the default.
#   s4d_real      |A_n| = n + 1 (S4D-Real, Mamba's default): a spread of decay rates per channel
#   s4d_lin_real  |A_n| = 1/2 (the real part of S4D-Lin): every state decays alike
#   constant      |A_n| = 1
#   log_uniform   |A_n| log-uniform in [1, N], drawn per channel and state (a randomized S4D-Real)
A_INITS: tuple[str, ...] = ("s4d_real", "s4d_lin_real", "constant", "log_uniform")

# dt ranges searched by ``init_search_space`` after the layer's own: Mamba's default, then longer memory
# (smaller dt), shorter memory, and a wide range.
DT_RANGES: tuple[tuple[float, float], ...] = ((0.001, 0.1), (0.0001, 0.01), (0.01, 0.1), (0.001, 1.0))


# ----------------------------------------------------------------------------------------------------
# argument checks (ValueError naming the argument)
def check_dt_range(
    dt_min: Any, dt_max: Any, names: tuple[str, str] = ("dt_min", "dt_max")
) -> tuple[float, float]:
    """Validate ``0 < dt_min <= dt_max`` (errors name ``names``); returns floats."""
    lo, hi = check_positive_float(names[0], dt_min), check_positive_float(names[1], dt_max)
    if lo > hi:
        raise ValueError(f"{names[0]} must be <= {names[1]}, got {names[0]}={lo}, {names[1]}={hi}")
    return lo, hi


def parse_dt_range(value: Any) -> tuple[float, float]:
    """Validate an ``init_search_space`` ``dt_range`` setting, a pair ``(dt_min, dt_max)``; returns floats."""
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"dt_range must be a pair (dt_min, dt_max), got {value!r}")
    return check_dt_range(value[0], value[1], ("dt_range[0] (dt_min)", "dt_range[1] (dt_max)"))


# ----------------------------------------------------------------------------------------------------
# initializations
@torch.no_grad()
def init_a_log_(A_log: Tensor, a_init: str) -> Tensor:
    """Fill ``A_log [channels, N]`` in place: ``A = -exp(A_log)`` follows ``a_init`` (:data:`A_INITS`)."""
    check_choice("a_init", a_init, A_INITS)
    N = A_log.shape[-1]
    if a_init == "s4d_real":
        mags = torch.arange(1, N + 1, dtype=torch.float32, device=A_log.device).expand_as(A_log)
        A_log.copy_(torch.log(mags))
    elif a_init == "s4d_lin_real":
        A_log.fill_(math.log(0.5))
    elif a_init == "constant":
        A_log.fill_(0.0)
    else:  # log_uniform
        A_log.copy_(torch.rand_like(A_log) * math.log(max(N, 1)))
    return A_log


def log_uniform_dt(n: int, dt_min: float, dt_max: float, floor: float, device: Any = None) -> Tensor:
    """``n`` step sizes log-uniform in ``[dt_min, dt_max]``, clamped below at ``floor`` (float32)."""
    lo, hi = math.log(dt_min), math.log(dt_max)
    dt = torch.exp(torch.rand(n, device=device) * (hi - lo) + lo)
    return dt.clamp(min=floor)


@torch.no_grad()
def init_dt_bias_(bias: Tensor, dt_min: float, dt_max: float, floor: float = 1e-4) -> Tensor:
    """Mamba's dt bias, in place: ``softplus(bias)`` log-uniform in ``[dt_min, dt_max]``."""
    dt = log_uniform_dt(bias.numel(), dt_min, dt_max, floor, bias.device)
    bias.copy_((dt + torch.log(-torch.expm1(-dt))).reshape(bias.shape))  # softplus^{-1}(dt)
    return bias
