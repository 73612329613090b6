"""ess_train.checks: the one signature helper (accepted keywords, unknown-key errors) and renamed keywords."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from ess_train.checks import (
    accepted_keywords,
    check_keywords,
    suggest,
    unknown_keys_message,
)


def f(a, b=1, *args, c, **kwargs):
    pass


class Plain:
    def __init__(self, x: int, y: int = 0) -> None:
        pass


@dataclasses.dataclass
class Fields:
    seed: int = 0
    hidden: int = dataclasses.field(default=1, init=False)


class WithConfig:
    config_cls = Fields

    def __init__(self, config: Fields | None = None, **kwargs: int) -> None:
        pass


def test_accepted_keywords_of_callables_classes_and_config_classes() -> None:
    assert accepted_keywords(f) == ({"a", "b", "c"}, True)
    assert accepted_keywords(Plain) == ({"x", "y"}, False)  # self left out
    assert accepted_keywords(Fields) == ({"seed"}, False)  # init fields only
    assert accepted_keywords(WithConfig) == ({"seed"}, False)  # the config dataclass, not **kwargs


def test_unknown_keys_message_suggests_the_closest_name() -> None:
    assert suggest("n_layer", ["n_layers", "d_model"]) == " (did you mean 'n_layers'?)"
    assert suggest("zzz", ["n_layers"]) == ""
    msg = unknown_keys_message(["n_layer"], ["d_model", "n_layers"], "for SequenceModel")
    assert (
        msg
        == "unknown key 'n_layer' for SequenceModel (did you mean 'n_layers'?); valid keys: d_model, n_layers"
    )
    msg = unknown_keys_message(["zzz", "d_modle"], ["d_model", "n_layers"])
    assert msg.startswith("unknown keys ['d_modle', 'zzz'] (did you mean 'd_model' for 'd_modle'?)")


def test_check_keywords() -> None:
    check_keywords({"x": 1}, Plain)
    check_keywords({"anything": 1}, f)  # **kwargs: nothing is unknown
    with pytest.raises(
        ValueError, match=r"unknown key 'xx' for Plain \(did you mean 'x'\?\); valid keys: x, y"
    ):
        check_keywords({"xx": 1}, Plain, where="for Plain")
    with pytest.raises(KeyError, match="'q'"):
        check_keywords(["q"], accepted=["p"], error=KeyError)


def test_checks_import_no_torch() -> None:
    code = "import sys, ess_train.checks; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
