"""Bad input to ``analyze`` and ``ess-analyze`` gets a clear error (issue 22's small cases), and a
delimiter that never occurs still leaves the report that was asked for."""

from __future__ import annotations

import json

import pytest
import torch

from ess_train import analyze
from ess_train.analysis.cli import main
from ess_train.measure.positions import resolve_positions
from tests.hf_models import model, tokens


@pytest.mark.parametrize(
    ("positions", "message"),
    [
        (16.0, r"got the float 16\.0 \(pass 16\)"),  # was: 'float' object is not iterable
        ([4.7], r"positions must be ints, got \[4\.7\]"),  # was: silently position 4
        ([3, torch.tensor(2.5)], "positions must be ints"),
        ("most", "got str 'most'"),
        (True, "got a bool"),
    ],
)
def test_positions_that_are_not_ints_are_refused_by_name(positions, message) -> None:
    with pytest.raises(TypeError, match=message):
        resolve_positions(positions, 32)
    with pytest.raises((TypeError, ValueError), match="positions"):
        analyze(model("llama"), tokens(length=16), positions=positions)


def test_integer_positions_of_any_integer_type_still_work() -> None:
    import numpy as np

    assert resolve_positions([np.int64(3), torch.tensor(5), 7], 16) == [3, 5, 7]
    assert resolve_positions(np.int64(2), 16) == [1, 15]


def test_device_cuda_without_cuda_is_one_line(tmp_path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the error path is for machines without it")
    path = tmp_path / "llama"
    model("llama").save_pretrained(path)
    code = main([str(path), "--seq-len", "16", "--device", "cuda", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "CUDA is not available" in err and "Traceback" not in err


def test_a_delimiter_that_never_occurs_still_writes_the_json(tmp_path, capsys) -> None:
    path = tmp_path / "llama"
    model("llama").save_pretrained(path)
    out = tmp_path / "ess.json"
    args = [str(path), "--seq-len", "16", "--positions", "4", "--no-progress", "--json", str(out)]
    code = main([*args, "--delimiter", "id:999"])  # not in the random tokens (vocab 64)
    assert code == 0
    data = json.loads(out.read_text())
    assert data["layers"] and "no occurrence" in data["delimiter"]["skipped"]
    assert "delimiter study skipped" in capsys.readouterr().err
