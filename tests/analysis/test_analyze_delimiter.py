"""The delimiter study: ESS aligned at each occurrence of a token, from analyze() at those positions."""

from __future__ import annotations

import json

import pytest
import torch

import ess_train
from ess_train.analysis.cli import main
from ess_train.analysis.delimiter import delimiter_figure, delimiter_study
from tests.hf_models import model, tokens

DELIM = 63


def _ids() -> torch.Tensor:
    ids = tokens(batch=2, length=40) % 60  # no delimiter by chance
    ids[0, 12] = ids[0, 26] = ids[1, 20] = DELIM
    ids[1, 38] = DELIM  # too close to the end for a window of 4: not used
    return ids


@pytest.mark.parametrize("family", ["llama", "mamba"])
def test_aligned_profiles_are_analyze_at_the_shifted_positions(family):
    m = model(family)
    ids = _ids()
    study = delimiter_study(m, ids, DELIM, window=4)
    assert study.occurrences == [(0, 12), (0, 26), (1, 20)] and study.offsets == list(range(-4, 5))
    name = next(iter(study.layers))
    # by hand: row 0 at positions 8..16 and 22..30, row 1 at 16..24, averaged
    parts = []
    for row, p in study.occurrences:
        rep = ess_train.analyze(m, ids[row : row + 1], positions=list(range(p - 4, p + 5)))
        parts.append(torch.tensor(rep.layers[name].entropy_ess))
    expected = torch.stack(parts).mean(0)
    assert torch.allclose(torch.tensor(study.layers[name]["entropy_ess"]), expected, rtol=1e-5)
    kind = study.layers[name]["kind"]
    assert len(study.kinds[kind]["entropy_ess"]) == 9 and study.layers[name]["tolerance_ess"] is not None
    json.dumps(study.to_dict())
    assert delimiter_figure(study) is not None


def test_no_usable_occurrence_is_an_error():
    with pytest.raises(ValueError, match="no occurrence of token 63"):
        delimiter_study(model("mamba", layers=1), tokens(length=16) % 60, DELIM, window=4)


def test_cli_delimiter_by_id(tmp_path):
    path = tmp_path / "ck"
    model("llama").save_pretrained(path)
    out = tmp_path / "ess.json"
    code = main(
        [
            str(path),
            "--seq-len",
            "64",
            "--seed",
            "3",
            "--delimiter",
            "id:7",
            "--window",
            "2",
            "--json",
            str(out),
            "--plots",
            str(tmp_path / "plots"),
            "--no-progress",
        ]
    )
    assert code == 0
    data = json.loads(out.read_text())
    assert data["delimiter"]["delimiter_id"] == 7 and data["delimiter"]["occurrences"]
    assert (tmp_path / "plots" / "ess_delimiter.png").is_file()
