"""Short causal depthwise convolution as an :class:`ESSMixer` (the ``ShortConvolution`` of H3/Based/fla).

Per channel, ``y_t = sum_{j=0}^{k-1} w_j u_{t-j}`` (kernel size ``k``, taps ``w_j`` on lag ``j``);
optional bias and SiLU in the readout.

Operator per channel: the shift-register realization, the engine's :class:`ShiftRegisterOperator`
(full constant transition ``A = shift`` (``A[i, i-1] = 1``), ``b = e_0``, ``c = (w_0, ..., w_{k-1})``,
expanded, not copied, over batch and time). The register holds ``u_t, ..., u_{t-k+1}``: ``k`` slots,
because in the convention ``y_t = c . h_t`` the state also carries the current input (the direct
tap ``w_0``). What is carried between steps (``rank(H_i)``) is ``k - 1``: TSS ``d_model * (k - 1)``,
``dense()`` is the Toeplitz band.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ess_train.checks import check_choice, check_int, check_positive_int
from ess_train.ess import ShiftRegisterOperator
from ess_train.models.protocol import ESSMixer, OperatorView, StateSize

__all__ = ["ShortConv"]


class ShortConv(ESSMixer):
    """Depthwise causal convolution with a short kernel.

    Args:
        d_model: channels.
        kernel_size: taps per channel (>= 2; 3 or 4 usual; default 4).
        bias: per-channel bias (added in the readout).
        activation: ``"identity"`` (default) or ``"silu"`` (fla's ShortConvolution), in the readout.

    TSS ``d_model * (kernel_size - 1)``; per operator ``min(kernel_size - 1, L // 2)``; multiplicity 1.
    """

    def __init__(
        self, d_model: int, kernel_size: int = 4, bias: bool = False, activation: str = "identity"
    ) -> None:
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.kernel_size = check_int("kernel_size", kernel_size, low=2)
        if not isinstance(bias, bool):
            raise ValueError(f"bias must be a bool, got {bias!r}")
        self.activation = check_choice("activation", activation, ("identity", "silu"))
        # nn.Conv1d layout [d_model, 1, k] (cross-correlation: weight[..., k - 1 - j] is the tap on lag j)
        self.conv = nn.Conv1d(
            d_model, d_model, kernel_size, groups=d_model, padding=kernel_size - 1, bias=bias
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's Conv1d default (Kaiming-uniform taps, uniform bias)."""
        self.conv.reset_parameters()

    @property
    def taps(self) -> Tensor:
        """``[d_model, k]``: ``taps[:, j]`` multiplies ``u_{t-j}``."""
        return self.conv.weight[:, 0, :].flip(-1)

    def operator(self, x: Tensor) -> OperatorView:
        batch, L, _ = x.shape
        u = x.transpose(1, 2)  # [B, H, L]
        y = F.conv1d(u, self.conv.weight, None, padding=self.kernel_size - 1, groups=self.d_model)[..., :L]
        return OperatorView(op=ShiftRegisterOperator(self.taps, batch, L), u=u, y=y)

    def readout(self, view: OperatorView, x: Tensor) -> Tensor:
        y = view.y
        if self.conv.bias is not None:
            y = y + self.conv.bias[:, None]
        if self.activation == "silu":
            y = F.silu(y)
        return y.transpose(1, 2)

    def state_size(self, seq_len: int) -> StateSize:
        k1 = self.kernel_size - 1
        return StateSize(total=self.d_model * k1, per_operator=min(k1, seq_len // 2), multiplicity=1)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, kernel_size={self.kernel_size}, activation={self.activation}"
