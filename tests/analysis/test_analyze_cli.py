"""``ess-analyze PATH`` on tiny checkpoints saved to a temporary folder and loaded offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ess_train.analysis.cli import main
from tests.hf_models import model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    model("llama").save_pretrained(path)
    return path


def _tokenizer(path: Path) -> None:
    """A word-level tokenizer saved next to the weights (built here: nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(63)} | {"[UNK]": 63}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)


def test_cli_writes_per_layer_ess_json_and_plots(llama_dir, tmp_path, capsys):
    out = tmp_path / "ess.json"
    code = main(
        [
            str(llama_dir),
            "--seq-len",
            "32",
            "--positions",
            "8",
            "--json",
            str(out),
            "--plots",
            str(tmp_path / "plots"),
            "--no-progress",
        ]
    )
    assert code == 0
    data = json.loads(out.read_text())
    assert sorted(data["layers"]) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    layer = data["layers"]["model.layers.0.self_attn"]
    assert len(layer["positions"]) == 8 and len(layer["entropy_ess"]) == 8 and layer["entropy_ess"][-1] > 0
    assert (tmp_path / "plots" / "ess_profiles.png").stat().st_size > 1000
    assert "LlamaAttention" in capsys.readouterr().out


def test_cli_mamba2_all_positions_and_text(tmp_path):
    path = tmp_path / "mamba2"
    model("mamba2", layers=1).save_pretrained(path)
    _tokenizer(path)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 63}" for i in range(40)))
    out = tmp_path / "ess.json"
    assert (
        main(
            [
                str(path),
                "--seq-len",
                "16",
                "--positions",
                "all",
                "--text",
                str(text),
                "--json",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert data["positions"] == list(range(16)) and "backbone.layers.0.mixer" in data["layers"]


def test_cli_errors_name_the_path(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main([str(missing), "--no-progress"]) == 2
    assert f"checkpoint directory not found: {missing}" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    (corrupt / "model.safetensors").write_bytes(b"garbage")
    assert main([str(corrupt), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(corrupt) in err and "config" in err


def test_cli_refuses_corrupt_weights_pickles_and_long_sequences(llama_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((llama_dir / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    assert main([str(broken), "--no-progress"]) == 2
    assert f"cannot load the checkpoint weights in {broken}" in capsys.readouterr().err
    (broken / "model.safetensors").unlink()
    (broken / "pytorch_model.bin").write_bytes(b"\x00")
    assert main([str(broken), "--no-progress"]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main([str(llama_dir), "--seq-len", "200", "--no-progress"]) == 2
    assert "exceeds the model's context of 128" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_is_declared_and_runs(llama_dir):
    assert 'ess-analyze = "ess_train.analysis.cli:main"' in (ROOT / "pyproject.toml").read_text()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ess_train.analysis.cli",
            str(llama_dir),
            "--seq-len",
            "16",
            "--positions",
            "4",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "model.layers.1.self_attn" in done.stdout and "ESS" in done.stderr  # the progress bar
