"""Mamba (selective SSM, S6; Gu and Dao 2023) as an :class:`ESSMixer`, after ``mamba_ssm``'s ``Mamba`` module.

``in_proj`` to ``(x, z)`` (width ``d_inner = expand * d_model`` each), a short causal depthwise conv + SiLU
giving ``u``, ``x_proj(u)`` to ``(dt, B, C)``, ``dt = softplus(dt_proj(dt) + bias)``, ``A = -exp(A_log)``.
Per channel ``c`` (state size ``N``): ``h_t = exp(dt_{t,c} A_c) h_{t-1} + dt_{t,c} B_t u_{t,c}``,
``y_{t,c} = C_t . h_t``. Readout: ``out_proj((y + D u) * silu(z))``.

Operator per channel (batch shape ``[batch, d_inner]``): the engine's :class:`SelectiveSSMOperator`,
diagonal with ``a = exp(dt A)``, ``b = dt B``, ``c = C``, built from the factors;
``u`` = the conv output; ``D u`` and the gate belong to the readout. TSS ``d_inner * N``.

Fast forward: :func:`~ess_train.models.ops.mamba_scan` (the chunked cumsum form with a custom backward,
:mod:`ess_train.models.ops.scan`), or on CUDA the fused Triton kernel
:func:`~ess_train.models.ops.triton_scan.triton_mamba_scan` (``scan_backend``); the initializations shared
with S4D are in :mod:`.ssm_init`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ess_train.checks import check_choice, check_positive_float, check_positive_int
from ess_train.ess import SelectiveSSMOperator, compute_dtype
from ess_train.models.mixers.ssm_init import (
    A_INITS,
    DT_RANGES,
    check_dt_range,
    init_a_log_,
    init_dt_bias_,
    parse_dt_range,
)
from ess_train.models.ops import mamba_scan
from ess_train.models.ops.triton_scan import SCAN_BACKENDS, select_scan_backend, triton_mamba_scan
from ess_train.models.protocol import ESSMixer, OperatorView, StateSize

__all__ = ["Mamba"]


class Mamba(ESSMixer):
    """Mamba block's mixer (S6 selective SSM), pure PyTorch.

    Args:
        d_model: model width.
        d_state: SSM state size ``N`` per channel (16).
        d_conv: short conv kernel size (4).
        expand: ``d_inner = int(expand * d_model)`` (2).
        dt_rank: rank of the dt projection; ``"auto"`` = ``ceil(d_model / 16)``.
        dt_min, dt_max: ``softplus(dt_bias)`` is drawn log-uniform in ``[dt_min, dt_max]`` (0.001, 0.1).
        dt_init: ``"random"`` (uniform +-dt_rank^-0.5 * dt_scale) or ``"constant"`` dt_proj weight.
        dt_scale: scale of the dt_proj weight init.
        dt_init_floor: lower clamp of the initial dt (1e-4).
        a_init: A initialization, one of :data:`A_INITS` (default ``"s4d_real"``: ``A = -(1..N)``).
        conv_bias: bias of the short conv.
        bias: biases of in_proj/out_proj.
        chunk_size: chunk of the scan (None: a power of two near ``sqrt(L)``).
        scan_backend: the scan's forward, one of :data:`SCAN_BACKENDS`: ``"auto"`` (the fused Triton
            kernel on CUDA where triton imports, else torch), ``"torch"`` (the chunked form), ``"triton"``
            (CUDA, or CPU under ``TRITON_INTERPRET=1``). Same gradients either way.

    TSS ``d_inner * N``; per operator ``min(N, L // 2)``; multiplicity 1.
    ``dt_proj.bias`` is flagged ``_no_reinit`` (and ``A_log``, ``D`` ``_no_weight_decay``) as in mamba_ssm;
    :class:`~ess_train.models.backbone.SequenceModel` never re-initializes mixers.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        a_init: str = "s4d_real",
        conv_bias: bool = True,
        bias: bool = False,
        chunk_size: int | None = None,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.d_state = check_positive_int("d_state", d_state)
        self.d_conv = check_positive_int("d_conv", d_conv)
        self.expand = check_positive_float("expand", expand)
        self.d_inner = int(self.expand * d_model)
        if self.d_inner < 1:
            raise ValueError(f"expand * d_model must be >= 1, got expand={expand}, d_model={d_model}")
        if dt_rank == "auto":
            self.dt_rank = math.ceil(d_model / 16)
        else:
            self.dt_rank = check_positive_int("dt_rank", dt_rank)
        self.dt_min, self.dt_max = check_dt_range(dt_min, dt_max)
        self.dt_init = check_choice("dt_init", dt_init, ("random", "constant"))
        self.dt_scale = check_positive_float("dt_scale", dt_scale)
        self.dt_init_floor = check_positive_float("dt_init_floor", dt_init_floor)
        self.a_init = check_choice("a_init", a_init, A_INITS)
        self.chunk_size = None if chunk_size is None else check_positive_int("chunk_size", chunk_size)
        self.scan_backend = check_choice("scan_backend", scan_backend, SCAN_BACKENDS)
        for name, flag in (("conv_bias", conv_bias), ("bias", bias)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")

        D, N = self.d_inner, self.d_state
        self.in_proj = nn.Linear(d_model, 2 * D, bias=bias)
        self.conv1d = nn.Conv1d(D, D, d_conv, groups=D, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(D, self.dt_rank + 2 * N, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, D, bias=True)
        self.A_log = nn.Parameter(torch.empty(D, N))
        self.D = nn.Parameter(torch.ones(D))
        self.out_proj = nn.Linear(D, d_model, bias=bias)
        # flags read by model-wide initializers / optimizers (mamba_ssm conventions)
        self.dt_proj.bias._no_reinit = True  # type: ignore[attr-defined]
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D._no_weight_decay = True  # type: ignore[attr-defined]
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        """mamba_ssm's init: PyTorch-default Linear/Conv, dt_proj special init, S4D-Real A, D = 1."""
        for m in (self.in_proj, self.conv1d, self.x_proj, self.out_proj):
            m.reset_parameters()
        std = self.dt_rank**-0.5 * self.dt_scale
        with torch.no_grad():
            if self.dt_init == "constant":
                self.dt_proj.weight.fill_(std)
            else:
                self.dt_proj.weight.uniform_(-std, std)
            self.D.fill_(1.0)
        init_dt_bias_(self.dt_proj.bias, self.dt_min, self.dt_max, self.dt_init_floor)
        init_a_log_(self.A_log, self.a_init)

    def init_search_space(self) -> dict[str, list]:
        """``dt_range`` and ``a_init`` candidates; the first of each is the layer's constructor setting."""
        own = (self.dt_min, self.dt_max)
        return {
            "dt_range": list(dict.fromkeys([own, *DT_RANGES])),
            "a_init": list(dict.fromkeys([self.a_init, *A_INITS])),
        }

    def apply_init(self, *, dt_range: Any = None, a_init: str | None = None) -> None:
        """Re-draw ``dt_proj.bias`` (``dt_range=(dt_min, dt_max)``) and/or ``A_log`` (``a_init``) in place."""
        if dt_range is not None:
            lo, hi = parse_dt_range(dt_range)
            init_dt_bias_(self.dt_proj.bias, lo, hi, self.dt_init_floor)
        if a_init is not None:
            init_a_log_(self.A_log, check_choice("a_init", a_init, A_INITS))

    # ------------------------------------------------------------------------------------------ forward
    def features(self, x: Tensor) -> dict[str, Tensor]:
        """u ``[B, D, L]``, z ``[B, L, D]``, dt ``[B, D, L]``, A ``[D, N]``, B and C ``[B, L, N]``."""
        L = x.shape[1]
        cd = compute_dtype(x.dtype)
        xi, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self.conv1d(xi.transpose(1, 2))[..., :L])
        dt_in, Bm, Cm = self.x_proj(u.transpose(1, 2)).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1
        )
        dt = F.softplus(F.linear(dt_in, self.dt_proj.weight).to(cd) + self.dt_proj.bias.to(cd)).transpose(
            1, 2
        )
        A = -torch.exp(self.A_log.to(cd))
        return {"u": u, "z": z, "dt": dt, "A": A, "B": Bm.to(cd), "C": Cm.to(cd)}

    def operator(self, x: Tensor) -> OperatorView:
        f = self.features(x)
        u, dt, A, Bm, Cm = f["u"], f["dt"], f["A"], f["B"], f["C"]
        scan = (
            triton_mamba_scan if select_scan_backend(self.scan_backend, dt.device) == "triton" else mamba_scan
        )
        y = scan(dt, A, Bm, Cm, u, self.chunk_size)  # [B, D, L]
        return OperatorView(op=SelectiveSSMOperator(dt, A, Bm, Cm), u=u, y=y, extras={"z": f["z"]})

    def readout(self, view: OperatorView, x: Tensor) -> Tensor:
        y = view.y + self.D.to(view.y.dtype)[:, None] * view.u
        y = y.transpose(1, 2) * F.silu(view.extras["z"])
        return self.out_proj(y.to(x.dtype))

    def state_size(self, seq_len: int) -> StateSize:
        return StateSize(
            total=self.d_inner * self.d_state, per_operator=min(self.d_state, seq_len // 2), multiplicity=1
        )

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}, "
            f"dt_rank={self.dt_rank}, dt=[{self.dt_min:g}, {self.dt_max:g}], a_init={self.a_init}, "
            f"scan_backend={self.scan_backend}"
        )
