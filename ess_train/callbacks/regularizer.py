"""``ESSRegularizer``: add an ESS penalty to the training loss of any LightningModule."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from ess_train.checks import (
    check_bool,
    check_int,
    check_non_negative_float,
    check_optional_positive_int,
    check_patterns,
    check_position_spec,
    check_positive_float,
    check_positive_int,
)
from ess_train.measure import ESSWarning, Mode, PositionSpec, ess_penalty, resolve_positions
from ess_train.measure.cost import BUDGET_FLOOR_FLOPS, LayerShape, layer_cost
from ess_train.measure.layers import find_layers
from ess_train.measure.penalty import DEFAULT_MIN_UTILIZATION, DEFAULT_PENALTY_POSITIONS, penalty_targets
from ess_train.models.protocol import capture_operators

__all__ = ["ESSRegularizer"]


def _logs_this_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes step-level metrics at this step (``log_every_n_steps``): ``self.log`` costs
    about 2 ms a call on CPU, so the regularizer only logs on the steps that are written."""
    flag = getattr(getattr(trainer, "_logger_connector", None), "should_update_logs", None)
    return True if flag is None else bool(flag)


class ESSRegularizer(Callback):
    """Add ``weight * penalty`` to the training loss, computed on the training batch itself.

    At ``setup`` the module's ``training_step`` is wrapped (an instance attribute, removed at
    ``teardown``): the step runs inside ``capture_operators(layers)``, and the loss it returns (a Tensor or
    a dict with ``"loss"``) gets ``+ weight_t * ess_penalty(...)``. Lightning then handles the combined loss,
    so gradient accumulation, AMP/bf16 and DDP behave as for the user's own loss. No extra forward pass
    for ``ESSMixer`` layers; other protocol layers are captured by a pre-hook that calls ``operator()``.

    ``weight_t = weight * min(1, (step + 1) / warmup_steps)`` (``step``: the global step); the penalty is
    applied when ``step % every_n_steps == 0``. Logs ``ess/reg_loss`` (the unweighted penalty) and
    ``ess/reg_weight`` through ``pl_module.log`` on the steps Lightning writes (``log_every_n_steps``).
    Manual optimization is not supported (the callback warns and stands aside). A penalty that is not
    finite (NaN/inf) is never added: that step keeps the user's loss, with a warning (once). When, by the
    cost model of ``ess_train.measure.cost``, the penalty on dense layers (softmax attention) costs more
    than a training step (from L of about 512 at these defaults), it says so once: its defaults hold for
    recurrent layers, not there (README, "Monitoring cost at scale").

    Args:
        weight: penalty weight.
        mode: ``"floor"``, ``"ceiling"`` or ``"decay_identity"`` (see :func:`ess_penalty`).
        min_utilization: ``floor`` only: the state utilization each layer is pushed up to, in ``(0, 1]``
            (default 0.5; the utilization ESSMonitor logs as ``ess/<layer>/utilization``:
            ``sum_i ESS_i / sum_i min(per_operator, i, L - i)``).
        max_ess: ``ceiling`` only (and required there): the ESS budget per operator, the mean entropy-ESS
            (over positions, rows and operators) above which a layer is penalized.
        include, exclude: ``fnmatch`` patterns on layer names.
        every_n_steps: regularize one step in ``every_n_steps``.
        positions: positions for the ESS estimate, as ESSMonitor's and ESSInitializer's (``PositionSpec``):
            an int ``k`` is ``k`` evenly spaced positions in ``[1, L-1]`` (default 16), ``None`` all, a list
            those positions.
        batch_rows: batch rows for the ESS estimate (``None``: all).
        max_operators: operators (heads/channels) per layer for the estimate (``None``: all); the subset
            rotates from step to step so that every operator is regularized in turn.
        warmup_steps: linear warm-up of the weight.
        log: log ``ess/reg_loss`` and ``ess/reg_weight``.
    """

    def __init__(
        self,
        weight: float = 1e-2,
        mode: Mode = "floor",
        min_utilization: float = DEFAULT_MIN_UTILIZATION,
        max_ess: float | None = None,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        every_n_steps: int = 1,
        positions: PositionSpec = DEFAULT_PENALTY_POSITIONS,
        batch_rows: int | None = 2,
        max_operators: int | None = 8,
        warmup_steps: int = 0,
        log: bool = True,
    ) -> None:
        super().__init__()
        min_utilization, max_ess = penalty_targets(mode, min_utilization, max_ess)
        self.weight = check_non_negative_float("weight", weight)
        if max_ess is not None:
            check_positive_float("max_ess", max_ess)
        self.mode = mode
        self.min_utilization = min_utilization
        self.max_ess = max_ess
        self.include = check_patterns("include", include)
        self.exclude = check_patterns("exclude", exclude)
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        self.positions = check_position_spec("positions", positions)
        self.batch_rows = check_optional_positive_int("batch_rows", batch_rows)
        self.max_operators = check_optional_positive_int("max_operators", max_operators)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, low=0)
        self.log = check_bool("log", log)
        self.layers: dict[str, nn.Module] = {}
        #: schedule state (saved in checkpoints): global step of the last regularized step, calls made.
        self.step = 0
        self.num_calls = 0
        self._last_penalty: Tensor | None = None
        self._module: pl.LightningModule | None = None
        self._had_instance_attr = False
        self._previous: Any = None
        self._warned: set[str] = set()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, include=self.include, exclude=self.exclude)

    # ------------------------------------------------------------------------------------------ schedule
    def weight_at(self, step: int) -> float:
        """The weight used at global step ``step`` (0 on steps that are not regularized)."""
        if step % self.every_n_steps:
            return 0.0
        if self.warmup_steps:
            return self.weight * min(1.0, (step + 1) / self.warmup_steps)
        return self.weight

    # ------------------------------------------------------------------------------------------ lightning
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._module is not None:
            return
        if not pl_module.automatic_optimization:
            self._warn_once("manual", "ESSRegularizer: manual optimization is not supported; standing aside.")
            return
        self.layers = find_layers(pl_module, include=self.include, exclude=self.exclude)
        if not self.layers:
            self._warn_once(
                "no-layers",
                f"ESSRegularizer: {type(pl_module).__name__} has no layer implementing the ESS protocol "
                f"matching include={self.include} exclude={self.exclude}; standing aside.",
            )
            return
        self._had_instance_attr = "training_step" in vars(pl_module)
        self._previous = vars(pl_module).get("training_step")
        original = pl_module.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            return self._regularized_step(trainer, pl_module, original, *args, **kwargs)

        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._module = pl_module

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._module is None:
            return
        if self._had_instance_attr:
            self._module.training_step = self._previous  # type: ignore[method-assign]
        else:
            vars(self._module).pop("training_step", None)
        self._module = None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "num_calls": self.num_calls, "last_penalty": self.last_penalty}

    @property
    def last_penalty(self) -> float | None:
        """The unweighted penalty of the last regularized step."""
        return None if self._last_penalty is None else float(self._last_penalty)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict.get("step", 0))
        self.num_calls = int(state_dict.get("num_calls", 0))
        last = state_dict.get("last_penalty")
        self._last_penalty = None if last is None else torch.tensor(float(last))

    # ---------------------------------------------------------------------------------------- internals
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=ESSWarning)

    def _check_cost(self, views: Mapping[str, Any], pl_module: nn.Module) -> None:
        """Warn once when the penalty's SVD work (forward + backward, ``ess_train.measure.cost``'s cost
        model) exceeds a training step's (``6 * parameters * tokens``, a lower bound) when dense layers
        (softmax attention) take part: at long L the defaults do not hold for them (README, "Monitoring cost
        at scale"). Recurrent layers' defaults do (~0.1 training steps per step); tiny costs are not said."""
        shapes = {name: LayerShape.of(v.op) for name, v in views.items()}
        if not shapes:
            return
        cost = 0.0
        for shape in shapes.values():
            pos = resolve_positions(self.positions, shape.seq_len)
            cost += 3 * layer_cost(shape, pos, self.batch_rows, self.max_operators)
        first = next(iter(shapes.values()))
        tokens = first.rows * first.seq_len
        step = 6.0 * sum(p.numel() for p in pl_module.parameters()) * tokens
        dense = sorted(name for name, shape in shapes.items() if shape.form == "dense")
        if dense and cost > max(step, BUDGET_FLOOR_FLOPS):
            self._warn_once(
                "cost",
                f"ESSRegularizer: its penalty costs about {cost / step:.2g} training steps per regularized "
                f"step by the cost model (L={first.seq_len}; dense layers: {dense[:3]}"
                f"{' ...' if len(dense) > 3 else ''}): pass every_n_steps=, fewer positions= or batch_rows=, "
                "or exclude= the dense layers.",
            )

    def _regularized_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, original: Any, *args: Any, **kwargs: Any
    ) -> Any:
        step = trainer.global_step
        weight = self.weight_at(step)
        if weight == 0.0:
            return original(*args, **kwargs)
        with capture_operators(self.layers) as views:
            out = original(*args, **kwargs)
        if out is None:  # the user skipped this batch
            return out
        loss = out["loss"] if isinstance(out, Mapping) else out
        if not isinstance(loss, Tensor):
            self._warn_once(
                "loss-type", f"ESSRegularizer: training_step returned {type(out).__name__}; skipped."
            )
            return out
        try:
            penalty = ess_penalty(
                views,
                self.layers,
                self.mode,
                min_utilization=self.min_utilization,
                max_ess=self.max_ess,
                positions=self.positions,
                batch_rows=self.batch_rows,
                max_operators=self.max_operators,
                offset=self.num_calls,
                warn=self._warn_once,
            )
        except ValueError as exc:  # non-finite operator (the engine's check): leave the user's loss alone
            self._warn_once(
                "nonfinite", f"ESSRegularizer: no penalty at step {step} (and while this lasts): {exc}"
            )
            return out
        if penalty is None:
            self._warn_once(
                "no-views",
                f"ESSRegularizer: no operator applies to mode={self.mode!r} in this step's forward "
                "(layers not called, or no learned recurrent transitions for decay_identity); nothing added.",
            )
            return out
        if not bool(torch.isfinite(penalty.detach())):  # one host sync; never put NaN/inf into the loss
            self._warn_once(
                "nonfinite-penalty",
                f"ESSRegularizer: the ESS penalty is not finite at step {step} ({float(penalty):g}); "
                "skipped (and on every step where this happens).",
            )
            return out
        if self.num_calls == 0:
            self._check_cost(views, pl_module)
        self.step = step
        self.num_calls += 1
        self._last_penalty = penalty.detach()  # no host sync here; read through ``last_penalty``
        total = loss + weight * penalty.to(loss.dtype)
        if self.log and _logs_this_step(trainer):
            bs = next(iter(views.values())).u.shape[0]
            pl_module.log("ess/reg_loss", penalty.detach(), on_step=True, on_epoch=False, batch_size=bs)
            pl_module.log("ess/reg_weight", weight, on_step=True, on_epoch=False, batch_size=bs)
        if isinstance(out, Mapping):
            out = dict(out)
            out["loss"] = total
            return out
        return total
