"""Hyena operator of order 2 (Poli et al. 2023) as an :class:`ESSMixer`, after safari's ``HyenaOperator``.

``in_proj`` to ``(x0, x1, v)`` (``d_model`` each), a short causal depthwise conv (3 taps) on all three, then
``y = x0 * (h * (x1 * v) + bias * x1 * v)`` with a long implicit filter ``h`` (length ``L``, one per
channel): positional features (``t``, ``(emb_dim - 1) / 2`` sine/cosine bands) -> MLP with ``sin``
activations -> exponential-decay window. Readout: ``out_proj``. Fast forward: FFT convolution.

Operator per channel on the stream ``v``: ``T[t, s] = x0_t (h[t - s] + bias [t = s]) x1_s`` for ``s <= t``,
a :class:`GatedToeplitzOperator` (a :class:`DenseOperator` built when read). TSS ``d_model * L``: the filter
spans the sequence, so the rank bound of ``H_i`` is ``min(i, L - i)`` (grows with ``L``, like attention).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ess_train.checks import check_int, check_positive_float, check_positive_int
from ess_train.ess import GatedToeplitzOperator, compute_dtype
from ess_train.models.ops import fft_causal_conv
from ess_train.models.protocol import ESSMixer, OperatorView, StateSize

__all__ = ["Hyena", "HyenaFilter"]


class _Sin(nn.Module):
    """``sin(freq * x)`` with a learned per-feature frequency (shared by every layer of the filter MLP)."""

    def __init__(self, dim: int, w: float) -> None:
        super().__init__()
        self.w = w
        self.freq = nn.Parameter(torch.full((1, dim), float(w)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.freq * x)


class HyenaFilter(nn.Module):
    """Implicit long filter ``h [d_model, L]`` (safari's ``HyenaFilter``, features built on the fly).

    Position ``k`` has time ``t = k / (max_seq_len - 1)`` and angle ``2 pi k / max_seq_len`` (safari's grid
    for ``L <= max_seq_len``; longer sequences extrapolate). Window ``exp(-t |delta_c|)`` with ``delta_c``
    spaced from ``log(target) / slow_decay_pct`` to ``log(target) / fast_decay_pct`` over the channels.
    """

    def __init__(
        self,
        d_model: int,
        max_seq_len: int,
        emb_dim: int = 3,
        filter_order: int = 64,
        num_inner_mlps: int = 2,
        w: float = 1.0,
        fast_decay_pct: float = 0.3,
        slow_decay_pct: float = 1.5,
        target: float = 1e-2,
        modulate: bool = True,
    ) -> None:
        super().__init__()
        self.max_seq_len, self.emb_dim, self.modulate = max_seq_len, emb_dim, modulate
        act = _Sin(filter_order, w)
        layers: list[nn.Module] = [nn.Linear(emb_dim, filter_order), act]
        for _ in range(num_inner_mlps):
            layers += [nn.Linear(filter_order, filter_order), act]
        layers.append(nn.Linear(filter_order, d_model, bias=False))
        self.mlp = nn.Sequential(*layers)
        max_decay = math.log(target) / fast_decay_pct
        min_decay = math.log(target) / slow_decay_pct
        self.register_buffer("deltas", torch.linspace(min_decay, max_decay, d_model), persistent=False)

    def reset_parameters(self) -> None:
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                m.reset_parameters()
            elif isinstance(m, _Sin):
                with torch.no_grad():
                    m.freq.fill_(m.w)

    def features(self, L: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """Positional features ``z [L, emb_dim]`` and times ``t [L, 1]``."""
        k = torch.arange(L, dtype=dtype, device=device)[:, None]
        t = k / max(self.max_seq_len - 1, 1)
        bands = (self.emb_dim - 1) // 2
        f = torch.linspace(1e-4, bands - 1, bands, dtype=dtype, device=device)[None, :]
        ang = f * (2 * math.pi * k / self.max_seq_len)
        return torch.cat([t, torch.cos(ang), -torch.sin(ang)], dim=-1), t

    def forward(self, L: int, dtype: torch.dtype = torch.float32) -> Tensor:
        z, t = self.features(L, dtype, self.deltas.device)
        h = self.mlp(z.to(self.mlp[0].weight.dtype)).to(dtype)  # [L, d_model]
        if self.modulate:
            h = h * torch.exp(-t * self.deltas.to(dtype).abs())
        return h.transpose(0, 1)


class Hyena(ESSMixer):
    """Hyena (order 2) with an implicit exponentially windowed long filter.

    Args:
        d_model: model width.
        max_seq_len: length scale of the filter's positional features (safari's ``l_max``; default 1024).
        filter_order: width of the filter MLP (64).
        emb_dim: positional feature dim (odd, >= 3; default 3).
        num_inner_mlps: hidden layers of the filter MLP (2).
        short_filter_order: taps of the short conv on the projections (3).
        w: initial frequency of the sine activations (1).
        fast_decay_pct, slow_decay_pct, decay_target: the exponential window (0.3, 1.5, 1e-2).
        modulate: apply the window.

    TSS ``d_model * L``; per operator ``L // 2``; multiplicity 1.
    """

    def __init__(
        self,
        d_model: int,
        max_seq_len: int = 1024,
        filter_order: int = 64,
        emb_dim: int = 3,
        num_inner_mlps: int = 2,
        short_filter_order: int = 3,
        w: float = 1.0,
        fast_decay_pct: float = 0.3,
        slow_decay_pct: float = 1.5,
        decay_target: float = 1e-2,
        modulate: bool = True,
    ) -> None:
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.max_seq_len = check_int("max_seq_len", max_seq_len, low=2)
        check_positive_int("filter_order", filter_order)
        check_int("emb_dim", emb_dim, low=3)
        if emb_dim % 2 == 0:
            raise ValueError(f"emb_dim must be odd (time plus sine/cosine pairs), got {emb_dim}")
        check_int("num_inner_mlps", num_inner_mlps, low=0)
        self.short_filter_order = check_positive_int("short_filter_order", short_filter_order)
        check_positive_float("w", w)
        check_positive_float("fast_decay_pct", fast_decay_pct)
        check_positive_float("slow_decay_pct", slow_decay_pct)
        if not 0 < check_positive_float("decay_target", decay_target) < 1:
            raise ValueError(f"decay_target must be in (0, 1), got {decay_target!r}")
        if not isinstance(modulate, bool):
            raise ValueError(f"modulate must be a bool, got {modulate!r}")
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.short_filter = nn.Conv1d(
            3 * d_model, 3 * d_model, short_filter_order, groups=3 * d_model, padding=short_filter_order - 1
        )
        self.filter = HyenaFilter(
            d_model,
            self.max_seq_len,
            emb_dim=emb_dim,
            filter_order=filter_order,
            num_inner_mlps=num_inner_mlps,
            w=w,
            fast_decay_pct=fast_decay_pct,
            slow_decay_pct=slow_decay_pct,
            target=decay_target,
            modulate=modulate,
        )
        self.bias = nn.Parameter(torch.empty(d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """safari's init: PyTorch-default projections and convs, sine frequency ``w``, ``bias ~ N(0, 1)``."""
        for m in (self.in_proj, self.short_filter, self.out_proj):
            m.reset_parameters()
        self.filter.reset_parameters()
        with torch.no_grad():
            self.bias.normal_(0.0, 1.0)

    def operator(self, x: Tensor) -> OperatorView:
        L = x.shape[1]
        cd = compute_dtype(x.dtype)
        uc = self.short_filter(self.in_proj(x).transpose(1, 2))[..., :L]
        x0, x1, v = (p.to(cd) for p in uc.split(self.d_model, dim=1))  # [B, d_model, L] each
        h = self.filter(L, cd)  # [d_model, L]
        h_eff = torch.cat([h[:, :1] + self.bias.to(cd)[:, None], h[:, 1:]], dim=1)  # skip folded into lag 0
        y = x0 * fft_causal_conv(x1 * v, h_eff)
        return OperatorView(op=GatedToeplitzOperator(h_eff, x0, x1), u=v, y=y)

    def readout(self, view: OperatorView, x: Tensor) -> Tensor:
        return self.out_proj(view.y.transpose(1, 2).to(x.dtype))

    def state_size(self, seq_len: int) -> StateSize:
        return StateSize(total=self.d_model * seq_len, per_operator=seq_len // 2, multiplicity=1)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_seq_len={self.max_seq_len}, order=2"
