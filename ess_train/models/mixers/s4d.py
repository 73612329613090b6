"""S4D with real diagonal A (Gu et al. 2022) as an :class:`ESSMixer`, after state-spaces' standalone ``S4D``.

Per channel ``h`` (``d_model`` channels, ``N`` states each), input-invariant (LTI):
``s_t = exp(dt_h A_h) * s_{t-1} + dt_h B_h u_t``, ``y_t = C_h . s_t``, i.e. the convolution with
``K_h[k] = sum_n C_hn exp(dt_h A_hn)^k dt_h B_hn``. ``A = -exp(A_log)`` (S4D-Real init ``-(1..N)``),
``log dt`` learned per channel (log-uniform in ``[dt_min, dt_max]`` at init), ``B``, ``C`` per channel,
skip ``D``. Readout (S4D block): ``GELU(y + D u)``, then ``Linear(d_model, 2 d_model)`` + GLU.

Operator per channel: a diagonal :class:`RecurrentOperator` whose ``a``, ``b``, ``c`` are ``[N]`` vectors
expanded (not copied) to ``[batch, d_model, L, N]``. Fast forward: the kernel from a Vandermonde product
(``exp(k dt A)``, exponents ``<= 0``), then an FFT convolution
(:func:`~ess_train.models.ops.fft_causal_conv`). TSS ``d_model * N``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ess_train.checks import check_choice, check_positive_int
from ess_train.ess import RecurrentOperator, compute_dtype
from ess_train.models.mixers.ssm_init import A_INITS, DT_RANGES, check_dt_range, init_a_log_, parse_dt_range
from ess_train.models.ops import exp_nonpositive, fft_causal_conv
from ess_train.models.protocol import ESSMixer, OperatorView, StateSize

__all__ = ["S4D"]


class S4D(ESSMixer):
    """S4D-Real layer (LTI diagonal SSM).

    Args:
        d_model: channels (each its own SSM).
        d_state: states ``N`` per channel (64).
        dt_min, dt_max: range of the log-uniform initial step size (0.001, 0.1).
        a_init: A initialization, one of ``A_INITS`` of :mod:`.ssm_init` (default ``"s4d_real"``).
        activation: ``"gelu"`` (S4D default) or ``"identity"`` after ``y + D u``.
        gated_output: ``Linear(d_model, 2 d_model)`` + GLU output (S4D default) or a plain ``Linear``.

    TSS ``d_model * N``; per operator ``min(N, L // 2)``; multiplicity 1.
    ``init_search_space()``: ``dt_range`` and ``a_init`` (first = constructor setting).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        a_init: str = "s4d_real",
        activation: str = "gelu",
        gated_output: bool = True,
    ) -> None:
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.d_state = check_positive_int("d_state", d_state)
        self.dt_min, self.dt_max = check_dt_range(dt_min, dt_max)
        self.a_init = check_choice("a_init", a_init, A_INITS)
        self.activation = check_choice("activation", activation, ("gelu", "identity"))
        if not isinstance(gated_output, bool):
            raise ValueError(f"gated_output must be a bool, got {gated_output!r}")
        self.gated_output = gated_output
        H, N = d_model, d_state
        self.log_dt = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H, N))
        self.B = nn.Parameter(torch.empty(H, N))
        self.C = nn.Parameter(torch.empty(H, N))
        self.D = nn.Parameter(torch.empty(H))
        self.output_linear = nn.Linear(H, 2 * H if gated_output else H)
        for p in (self.log_dt, self.A_log):
            p._no_weight_decay = True  # type: ignore[attr-defined]
        self.reset_parameters()

    def _init_log_dt(self, dt_min: float, dt_max: float) -> None:
        with torch.no_grad():
            lo, hi = math.log(dt_min), math.log(dt_max)
            self.log_dt.copy_(torch.rand_like(self.log_dt) * (hi - lo) + lo)

    def reset_parameters(self) -> None:
        """S4D init: log-uniform dt, S4D-Real A, ``B = 1``, ``C ~ N(0, 1)``, ``D ~ N(0, 1)``."""
        self._init_log_dt(self.dt_min, self.dt_max)
        init_a_log_(self.A_log, self.a_init)
        with torch.no_grad():
            self.B.fill_(1.0)
            self.C.normal_(0.0, 1.0)
            self.D.normal_(0.0, 1.0)
        self.output_linear.reset_parameters()

    def init_search_space(self) -> dict[str, list]:
        """``dt_range`` and ``a_init`` candidates; the first of each is the constructor setting."""
        return {
            "dt_range": list(dict.fromkeys([(self.dt_min, self.dt_max), *DT_RANGES])),
            "a_init": list(dict.fromkeys([self.a_init, *A_INITS])),
        }

    def apply_init(self, *, dt_range: Any = None, a_init: str | None = None) -> None:
        """Re-draw ``log_dt`` (``dt_range``) and/or ``A_log`` (``a_init``) in place."""
        if dt_range is not None:
            self._init_log_dt(*parse_dt_range(dt_range))
        if a_init is not None:
            init_a_log_(self.A_log, check_choice("a_init", a_init, A_INITS))

    def ssm(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
        """Discrete per-channel ``(log a, b, c)``, each ``[d_model, N]``: ``a = exp(dt A)``, ``b = dt B``."""
        dt = self.log_dt.to(dtype).exp()[:, None]
        log_a = -dt * torch.exp(self.A_log.to(dtype))
        return log_a, dt * self.B.to(dtype), self.C.to(dtype)

    def kernel(self, L: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """``K [d_model, L]``, ``K[h, k] = sum_n c_hn exp(k log a_hn) b_hn`` (Vandermonde; exponents <= 0)."""
        log_a, b, c = self.ssm(dtype)
        k = torch.arange(L, device=log_a.device, dtype=dtype)
        return torch.einsum("hn,hnl->hl", c * b, exp_nonpositive(log_a[..., None] * k))

    def operator(self, x: Tensor) -> OperatorView:
        batch, L, H = x.shape
        cd = compute_dtype(x.dtype)
        u = x.transpose(1, 2)  # [B, H, L]
        y = fft_causal_conv(u, self.kernel(L, cd))
        log_a, b, c = self.ssm(cd)
        shape = (batch, H, L, self.d_state)
        op = RecurrentOperator(
            log_a.exp()[None, :, None, :].expand(shape),
            b[None, :, None, :].expand(shape),
            c[None, :, None, :].expand(shape),
            validate=False,
        )
        return OperatorView(op=op, u=u, y=y)

    def readout(self, view: OperatorView, x: Tensor) -> Tensor:
        y = view.y + self.D.to(view.y.dtype)[:, None] * view.u
        if self.activation == "gelu":
            y = F.gelu(y)
        y = self.output_linear(y.transpose(1, 2).to(x.dtype))
        return F.glu(y, dim=-1) if self.gated_output else y

    def state_size(self, seq_len: int) -> StateSize:
        return StateSize(
            total=self.d_model * self.d_state, per_operator=min(self.d_state, seq_len // 2), multiplicity=1
        )

    def extra_repr(self) -> str:
        dt = f"[{self.dt_min:g}, {self.dt_max:g}]"
        return f"d_model={self.d_model}, d_state={self.d_state}, dt={dt}, a_init={self.a_init}"
