"""Config validation: every key must mean something, before any training starts.

Hydra merges YAML files silently; a typo such as ``model.n_layer: 4`` would otherwise reach a
constructor as an unexpected keyword (or, worse, be dropped by a ``**kwargs``). ``validate_config``
checks every ``_target_`` node's keys against its target's signature, and the top level against
the keys the app knows, and raises :class:`ConfigError` naming the full key path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from ess_train.checks import (
    accepted_keywords,
    check_bool,
    check_choice,
    check_int,
    check_non_negative_float,
    check_positive_float,
    unknown_keys_message,
)

__all__ = ["ConfigError", "validate_config", "check_values", "TOP_LEVEL_KEYS"]

TOP_LEVEL_KEYS = frozenset(
    {
        "model",
        "task",
        "trainer",
        "logger",
        "callbacks",
        "experiment",
        "seed",
        "optim",
        "output_dir",
        "ckpt_path",
        "resume",
        "checkpoint",
        "save_plots",
        "hydra",
    }
)
# Keys of a ``_target_`` node that Hydra itself consumes.
_HYDRA_KEYS = frozenset({"_target_", "_recursive_", "_convert_", "_partial_", "_args_"})
# Keys the app passes itself when it instantiates these groups.
_PASSED_BY_APP = {"model": {"vocab_size"}, "trainer": {"callbacks", "logger"}}


class ConfigError(ValueError):
    """A configuration key or value that cannot be used."""


def _validate_node(node: Any, path: str, group: str) -> None:
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            _validate_node(item, f"{path}[{i}]", group)
        return
    if not isinstance(node, DictConfig):
        return
    target_name = node.get("_target_") if "_target_" in node else None
    if target_name is not None:
        try:
            target = get_object(str(target_name))
        except Exception as err:  # ImportError, AttributeError, hydra's InstantiationException
            raise ConfigError(f"{path}._target_: cannot import '{target_name}': {err}") from err
        accepted, var_kw = accepted_keywords(target)
        passed = _PASSED_BY_APP.get(path, set())
        for key in node:
            key = str(key)
            if key in _HYDRA_KEYS:
                continue
            if key in passed:
                raise ConfigError(
                    f"{path}.{key}: set by the app (from the task/run), do not set it in the config"
                )
            if key not in accepted and not var_kw:
                raise ConfigError(
                    f"{path}.{key}: {unknown_keys_message([key], accepted - passed, f'for {target_name}')}"
                )
        # a target may check its keys' values too (SequenceModel: mixer names and mixer_kwargs)
        check = getattr(target, "validate_kwargs", None)
        if callable(check):
            values = {
                k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in _HYDRA_KEYS
            }
            try:
                check(**values)
            except (ValueError, TypeError) as err:
                raise ConfigError(f"{path}: {err}") from err
    for key in node:
        if str(key) in _HYDRA_KEYS:
            continue
        _validate_node(node._get_node(key), f"{path}.{key}" if path else str(key), group)


#: what Lightning's Trainer accepts for these (the app's own check: Lightning takes some silently, e.g.
#: max_steps=0, or fails mid-run with an unnamed error, e.g. val_check_interval=0)
_ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu")
_PRECISIONS = (
    "64",
    "32",
    "16",
    "bf16",
    "transformer-engine",
    "transformer-engine-float16",
    "16-mixed",
    "bf16-mixed",
    "32-true",
    "64-true",
    "16-true",
    "bf16-true",
)


def _check_value(key: str, check: Callable[[Any], Any], value: Any) -> None:
    try:
        check(value)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{key}: {err}") from err


def _positive_or_unit(name: str, value: Any) -> None:
    """val_check_interval: a number of batches (int >= 1) or a fraction of an epoch in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be an int number of steps >= 1 or a fraction in (0, 1], got {value!r}")
    if isinstance(value, int) and value < 1 or isinstance(value, float) and not 0 < value <= 1:
        raise ValueError(f"{name} must be an int number of steps >= 1 or a fraction in (0, 1], got {value!r}")


def _devices(value: Any) -> None:
    """trainer.devices: ``"auto"``, a count >= 1 (``-1``: all), or a list of device indices."""
    if value == "auto" or value == -1 or isinstance(value, (list, ListConfig)):
        return
    check_int("trainer.devices", value, low=1)


def check_values(cfg: DictConfig) -> None:
    """Values the app reads itself or hands to Lightning, checked by name before anything is built (the
    model's, the task's and the callbacks' own arguments are checked by their constructors, which the app
    calls before training, naming the key)."""
    trainer = cfg.get("trainer") or {}
    checks: dict[str, Callable[[Any], Any]] = {
        "trainer.max_steps": lambda v: check_int("trainer.max_steps", v, low=1),
        "trainer.val_check_interval": lambda v: _positive_or_unit("trainer.val_check_interval", v),
        "trainer.log_every_n_steps": lambda v: check_int("trainer.log_every_n_steps", v, low=1),
        "trainer.accumulate_grad_batches": lambda v: check_int("trainer.accumulate_grad_batches", v, low=1),
        "trainer.gradient_clip_val": lambda v: (
            v is None or check_non_negative_float("trainer.gradient_clip_val", v)
        ),
        "trainer.accelerator": lambda v: check_choice("trainer.accelerator", str(v), _ACCELERATORS),
        "trainer.precision": lambda v: v is None or check_choice("trainer.precision", str(v), _PRECISIONS),
        "trainer.devices": _devices,
    }
    for key, check in checks.items():
        name = key.split(".", 1)[1]
        if name in trainer and trainer.get(name) is not None:
            _check_value(key, check, trainer.get(name))
    if "seed" in cfg:
        _check_value("seed", lambda v: check_int("seed", v, low=0), cfg.get("seed"))
    if "save_plots" in cfg:
        _check_value("save_plots", lambda v: check_bool("save_plots", v), cfg.get("save_plots"))
    optim = cfg.get("optim") or {}
    if "lr" in optim:
        _check_value("optim.lr", lambda v: check_positive_float("lr", v), optim.get("lr"))
    if "weight_decay" in optim:
        _check_value(
            "optim.weight_decay",
            lambda v: check_non_negative_float("weight_decay", v),
            optim.get("weight_decay"),
        )
    if "warmup_steps" in optim:
        _check_value(
            "optim.warmup_steps", lambda v: check_int("warmup_steps", v, low=0), optim.get("warmup_steps")
        )


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for any unknown key in ``cfg`` (the app's composed config), and for the
    values :func:`check_values` knows."""
    for key in cfg:
        if str(key) not in TOP_LEVEL_KEYS:
            message = unknown_keys_message([str(key)], TOP_LEVEL_KEYS - {"hydra"}, "at top level")
            raise ConfigError(f"{key}: {message}")
    for group in ("model", "task", "trainer", "logger", "callbacks", "checkpoint"):
        node = cfg.get(group)
        if node is None:
            continue
        if group in ("model", "task", "trainer") and (
            not isinstance(node, DictConfig) or "_target_" not in node
        ):
            raise ConfigError(f"{group}: needs a _target_ (pick one of conf/{group}/*.yaml)")
        _validate_node(node, group, group)
    optim = cfg.get("optim")
    if optim is not None:
        from ess_train.lit import SequenceLM

        accepted = accepted_keywords(SequenceLM)[0] - {"model"}
        for key in optim:
            if str(key) not in accepted:
                message = unknown_keys_message([str(key)], accepted, "for ess_train.lit.SequenceLM")
                raise ConfigError(f"optim.{key}: {message}")
    # resolve everything once so that broken interpolations fail now, not mid-run
    for key in cfg:
        if str(key) == "hydra":
            continue
        try:
            value = cfg[key]  # resolves a scalar's interpolation
            if OmegaConf.is_config(value):
                OmegaConf.to_container(value, resolve=True)
        except Exception as err:
            raise ConfigError(f"{key}: cannot resolve: {err}") from err
    check_values(cfg)
