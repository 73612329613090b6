"""Config validation: every key must mean something, before any training starts.

Hydra merges YAML files silently; a typo such as ``model.n_layer: 4`` would otherwise reach a
constructor as an unexpected keyword (or, worse, be dropped by a ``**kwargs``). ``validate_config``
checks every ``_target_`` node's keys against its target's signature, and the top level against
the keys the app knows, and raises :class:`ConfigError` naming the full key path.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Iterable
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

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


def _suggest(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _accepted_keys(target: Any) -> tuple[set[str], bool]:
    """Keyword names ``target`` accepts, and whether it takes ``**kwargs``.

    A class with a dataclass ``config_cls`` (the task data modules) accepts that dataclass's fields.
    """
    config_cls = getattr(target, "config_cls", None)
    if config_cls is not None and dataclasses.is_dataclass(config_cls):
        return {f.name for f in dataclasses.fields(config_cls)}, False
    sig = inspect.signature(target)
    names = set()
    var_kw = False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.add(p.name)
    names.discard("self")
    return names, var_kw


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
        accepted, var_kw = _accepted_keys(target)
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
                    f"{path}.{key}: unknown key for {target_name}{_suggest(key, accepted)}; "
                    f"valid keys: {', '.join(sorted(accepted - passed))}"
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
            raise ConfigError(
                f"{key}: unknown top-level key{_suggest(str(key), TOP_LEVEL_KEYS)}; "
                f"valid keys: {', '.join(sorted(TOP_LEVEL_KEYS - {'hydra'}))}"
            )
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

        accepted, _ = _accepted_keys(SequenceLM)
        for key in optim:
            if str(key) not in accepted - {"model"}:
                raise ConfigError(
                    f"optim.{key}: unknown key for ess_train.lit.SequenceLM{_suggest(str(key), accepted)}; "
                    f"valid keys: {', '.join(sorted(accepted - {'model'}))}"
                )
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
