"""Config validation: every key must mean something, before any training starts.

Hydra merges YAML files silently; a typo such as ``model.n_layer: 4`` would otherwise reach a
constructor as an unexpected keyword (or, worse, be dropped by a ``**kwargs``). ``validate_config``
checks every ``_target_`` node's keys against its target's signature, and the top level against
the keys the app knows, and raises :class:`ConfigError` naming the full key path.
"""

from __future__ import annotations

from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from ess_train.checks import accepted_keywords, unknown_keys_message

__all__ = ["ConfigError", "validate_config", "TOP_LEVEL_KEYS"]

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


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for any unknown key in ``cfg`` (the app's composed config)."""
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
