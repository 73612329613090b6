"""``SequenceModel``: token embedding, ``n_layers`` pre-norm blocks (mixer + MLP), final norm, LM head.

Mixers come from the registry by name; a list of names makes a hybrid (tiled over the layers):
``SequenceModel(vocab_size=64, d_model=128, n_layers=4, mixer=["short_conv", "gla"])``.
The backbone initializes only its own modules (embedding, norms, MLPs, head): every mixer keeps the
initialization its constructor gave it (Mamba's dt bias and A, S4D's spectrum, ...).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ess_train.checks import check_keywords
from ess_train.models.mixer_registry import build_mixer, mixer_parameters, resolve_mixer_name
from ess_train.models.mixers.parts import RMSNorm
from ess_train.models.protocol import OperatorView, StateSize, find_ess_layers, operators_of
from ess_train.models.resets import reset_positions

__all__ = ["SequenceModel", "Block", "MLP", "RMSNorm", "build_model"]


def _make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps) if kind == "layernorm" else RMSNorm(dim, eps=eps)


class MLP(nn.Module):
    """``fc2(GELU(fc1(x)))`` with hidden width ``hidden``."""

    def __init__(self, d_model: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm residual block: ``x + mixer(norm1(x))``, then ``x + mlp(norm2(x))`` (if ``mlp``)."""

    def __init__(
        self,
        mixer: nn.Module,
        norm1: nn.Module,
        mlp: nn.Module | None,
        norm2: nn.Module | None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1, self.mixer = norm1, mixer
        self.norm2, self.mlp = norm2, mlp
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.dropout(self.mixer(self.norm1(x)))
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x


def _layer_names(mixer: str | Sequence[str], n_layers: int) -> list[str]:
    if isinstance(mixer, str):
        return [resolve_mixer_name(mixer)] * n_layers
    names = list(mixer)
    if not names:
        raise ValueError("mixer must be a name or a non-empty list of names, got an empty list")
    if n_layers % len(names):
        raise ValueError(
            f"mixer lists {len(names)} names ({names}); n_layers={n_layers} must be a multiple of that "
            "(the list is tiled over the layers)"
        )
    return [resolve_mixer_name(n) for n in names] * (n_layers // len(names))


def _split_mixer_kwargs(
    mixer_kwargs: Mapping[str, Any] | None, names: list[str]
) -> dict[str, dict[str, Any]]:
    """Per-name kwargs from a common dict, a per-name dict, or both mixed.

    Keys that are mixer names (or aliases) with dict values apply to that mixer only; the other keys are
    common and go to every mixer that accepts them. A common key no mixer in the model accepts, or a
    per-name key its mixer does not accept, raises ``ValueError`` naming it.
    """
    mixer_kwargs = dict(mixer_kwargs or {})
    common: dict[str, Any] = {}
    per_name: dict[str, dict[str, Any]] = {n: {} for n in names}
    for key, value in mixer_kwargs.items():
        canon = None
        if isinstance(value, Mapping):
            try:
                canon = resolve_mixer_name(key)
            except ValueError:
                canon = None
        if canon is None:
            common[key] = value
        elif canon in per_name:
            per_name[canon].update(dict(value))
        else:
            raise ValueError(
                f"mixer_kwargs has settings for mixer {key!r}, which this model does not use ({names})"
            )
    if "d_model" in common or any("d_model" in kw for kw in per_name.values()):
        raise ValueError("mixer_kwargs must not set d_model: the backbone passes its own d_model")
    out: dict[str, dict[str, Any]] = {}
    used: set[str] = set()
    for name in dict.fromkeys(names):
        accepted, var_kw = mixer_parameters(name)
        kw = {k: v for k, v in common.items() if var_kw or k in accepted}
        used |= set(kw)
        if not var_kw:
            check_keywords(per_name[name], accepted=accepted, where=f"in mixer_kwargs[{name!r}]")
        kw.update(per_name[name])
        out[name] = kw
    unused = sorted(set(common) - used)
    if unused:
        raise ValueError(
            f"mixer_kwargs key(s) {unused} are accepted by none of the mixers {sorted(set(names))}"
        )
    return out


class SequenceModel(nn.Module):
    """Language model over a mixer stack: ``inputs [B, L] (token ids) -> logits [B, L, vocab_size]``.

    Args:
        vocab_size: tokens.
        d_model: width.
        n_layers: blocks.
        mixer: a registry name (every layer) or a list of names tiled over the layers
            (``["short_conv", "gla"]`` with ``n_layers=4``: conv, GLA, conv, GLA).
        mixer_kwargs: common keyword arguments (given to each mixer that accepts them), and/or per-name
            dicts (``{"gla": {"num_heads": 2}, "short_conv": {"kernel_size": 3}}``).
        mlp_ratio: MLP hidden width ``int(mlp_ratio * d_model)``; 0 drops the MLPs.
        norm: ``"layernorm"`` or ``"rmsnorm"``.
        max_seq_len: longest input (checked in ``forward``); passed to mixers accepting ``max_seq_len``
            (Hyena) unless set in ``mixer_kwargs``; required by ``pos_embedding``.
        pos_embedding: learned absolute position embedding (default off: mixers carry position).
        tie_embeddings: share the embedding matrix with the LM head.
        dropout: dropout on the mixer and MLP outputs.
        norm_eps: epsilon of the norms.
        init_std: std of the embedding/MLP/head normal init (the MLP output layer is scaled by
            ``1 / sqrt(2 n_layers)``, GPT-2 style).
        reset_token: a delimiter token id (negative: counted from the end of the vocabulary, ``-1`` = the
            last id, the delimited-recall task's EOS) at which every layer that supports resets (GLA) shuts
            its gate: the state after it holds nothing from before (:mod:`ess_train.models.resets`).
            ``None`` (default): no forced resets.
    """

    @staticmethod
    def validate_kwargs(
        n_layers: int = 1, mixer: str | Sequence[str] = "attention", mixer_kwargs: Any = None, **_: Any
    ) -> None:
        """Check the mixer names and ``mixer_kwargs`` without building anything (the app's config check)."""
        _split_mixer_kwargs(mixer_kwargs, _layer_names(mixer, n_layers))

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_layers: int,
        mixer: str | Sequence[str] = "attention",
        mixer_kwargs: Mapping[str, Any] | None = None,
        mlp_ratio: float = 4.0,
        norm: str = "layernorm",
        max_seq_len: int | None = None,
        pos_embedding: bool = False,
        tie_embeddings: bool = True,
        dropout: float = 0.0,
        norm_eps: float = 1e-5,
        init_std: float = 0.02,
        reset_token: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model), ("n_layers", n_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {norm!r}")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or mlp_ratio < 0:
            raise ValueError(f"mlp_ratio must be a number >= 0, got {mlp_ratio!r}")
        if max_seq_len is not None and (
            isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1
        ):
            raise ValueError(f"max_seq_len must be None or a positive int, got {max_seq_len!r}")
        if pos_embedding and max_seq_len is None:
            raise ValueError("pos_embedding=True needs max_seq_len")
        if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if not (isinstance(init_std, (int, float)) and init_std > 0):
            raise ValueError(f"init_std must be > 0, got {init_std!r}")
        self.vocab_size, self.d_model, self.n_layers = vocab_size, d_model, n_layers
        self.max_seq_len, self.init_std = max_seq_len, float(init_std)
        self.mixer_names = _layer_names(mixer, n_layers)
        kwargs = _split_mixer_kwargs(mixer_kwargs, self.mixer_names)
        if max_seq_len is not None:
            for name, kw in kwargs.items():
                if "max_seq_len" in mixer_parameters(name)[0]:
                    kw.setdefault("max_seq_len", max_seq_len)

        self.embedding = nn.Embedding(vocab_size, d_model)
        self.pos_embedding = nn.Embedding(max_seq_len, d_model) if pos_embedding else None
        hidden = int(mlp_ratio * d_model)
        self.blocks = nn.ModuleList(
            Block(
                build_mixer(name, d_model=d_model, **kwargs[name]),
                _make_norm(norm, d_model, norm_eps),
                MLP(d_model, hidden, dropout) if hidden > 0 else None,
                _make_norm(norm, d_model, norm_eps) if hidden > 0 else None,
                dropout,
            )
            for name in self.mixer_names
        )
        self.reset_token = self._check_reset_token(reset_token, vocab_size)
        self.norm_f = _make_norm(norm, d_model, norm_eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        self._init_weights()

    def _check_reset_token(self, reset_token: int | None, vocab_size: int) -> int | None:
        if reset_token is None:
            return None
        if isinstance(reset_token, bool) or not isinstance(reset_token, int):
            raise ValueError(f"reset_token must be None or a token id (int), got {reset_token!r}")
        token = reset_token + vocab_size if reset_token < 0 else reset_token
        if not 0 <= token < vocab_size:
            raise ValueError(f"reset_token={reset_token} is outside the vocabulary of {vocab_size} tokens")
        if not any(getattr(b.mixer, "supports_resets", False) for b in self.blocks):
            raise ValueError(
                f"reset_token is set but no layer supports resets (mixers: {', '.join(self.mixer_names)}; "
                "GLA does)"
            )
        return token

    def _resets(self, inputs: Tensor):
        return reset_positions(None if self.reset_token is None else inputs == self.reset_token)

    def _own_modules(self) -> list[nn.Module]:
        """The backbone's modules, mixers excluded."""
        mods: list[nn.Module] = [self.embedding, self.norm_f, self.lm_head]
        if self.pos_embedding is not None:
            mods.append(self.pos_embedding)
        for block in self.blocks:
            mods += [m for m in (block.norm1, block.norm2, block.mlp) if m is not None]
        return mods

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Normal(0, init_std) embeddings/Linear weights, zero biases, unit norms; never touches a mixer."""
        resid_std = self.init_std / math.sqrt(2 * self.n_layers)
        for root in self._own_modules():
            for m in root.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    m.weight.normal_(0.0, self.init_std)
                    if getattr(m, "bias", None) is not None:
                        m.bias.zero_()
                elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                    m.reset_parameters()
        for block in self.blocks:
            if block.mlp is not None:
                block.mlp.fc2.weight.normal_(0.0, resid_std)

    def forward(self, inputs: Tensor) -> Tensor:
        if inputs.dim() != 2:
            raise ValueError(f"inputs must be token ids [batch, L], got shape {tuple(inputs.shape)}")
        L = inputs.shape[1]
        if self.max_seq_len is not None and L > self.max_seq_len:
            raise ValueError(f"sequence length {L} exceeds max_seq_len={self.max_seq_len}")
        x = self.embedding(inputs)
        if self.pos_embedding is not None:
            x = x + self.pos_embedding(torch.arange(L, device=inputs.device))
        with self._resets(inputs):
            for block in self.blocks:
                x = block(x)
        return self.lm_head(self.norm_f(x))

    # ------------------------------------------------------------------------------------------ ESS
    def ess_layers(self) -> dict[str, nn.Module]:
        """Every mixer, keyed ``"blocks.<i>.mixer"``."""
        return find_ess_layers(self)

    def ess_operators(self, inputs: Tensor) -> dict[str, OperatorView]:
        """Every layer's :class:`OperatorView` from one forward pass on ``inputs``, keyed by layer name."""
        with self._resets(inputs):
            return operators_of(self, inputs)

    def state_sizes(self, seq_len: int) -> dict[str, StateSize]:
        """Every layer's theoretical state size at ``seq_len``, keyed by layer name."""
        return {name: layer.state_size(seq_len) for name, layer in self.ess_layers().items()}


def build_model(**kwargs: Any) -> SequenceModel:
    """``SequenceModel(**kwargs)``; ``ValueError`` naming unknown keys."""
    check_keywords(kwargs, SequenceModel, where="for SequenceModel")
    return SequenceModel(**kwargs)
