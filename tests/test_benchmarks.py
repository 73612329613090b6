"""Every benchmark script runs end to end in its ``--quick`` form and prints its table (so none can rot)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# script -> a line its table must print (a ratio or a rate, measured)
EXPECTED = {
    "bench_ess.py": r"\|\s+\d+x \|\s+[\d.]+x",  # speed-up over the obvious loop, ratio to the floor
    "bench_families.py": r"\| bloom \| 2 \| [\d.]+ \| [\d.]+ \| \d+x \|",
    "bench_mixers.py": r"\| gla \| core \(recurrence only\) \|.*\| [\d.]+ \|",
    "bench_callbacks.py": r"ratio \d+\.\d{3}",
    "bench_tasks.py": r"\| mqar \| .* \| [\d.]+ \| [\d,]+ \|",
    # a monitor share of training, and a bounded state (400 vs 100 measurements)
    "bench_scale.py": (
        r"\| attention \| 4 \| 128 \| .* \| [\d.]+% \|(?s:.*)"
        r"\| attention \| 4 \| 128 \| \d+ \| .* \| 1\.\d\d \|"
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_benchmark_quick_runs(
    script: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In this process (each script's ``main`` reads ``sys.argv``, as from the command line)."""
    import importlib

    import torch

    args = ["--quick", "--no-memory"] if script == "bench_ess.py" else ["--quick"]
    if script == "bench_callbacks.py":
        args += ["--steps", "12", "--monitor-every", "5", "--ab-iters", "2"]
    monkeypatch.setattr(sys, "argv", [script, *args])
    threads = torch.get_num_threads()
    try:
        importlib.import_module(f"benchmarks.{script.removesuffix('.py')}").main()
    finally:
        torch.set_num_threads(threads)  # a script may set its own
    out = capsys.readouterr().out
    assert re.search(EXPECTED[script], out), out[-3000:]


# ---------------------------------------------------------------------------------- --device, gpu_check.sh
DEVICE_SCRIPTS = ["bench_ess", "bench_mixers", "bench_callbacks"]


@pytest.mark.parametrize("script", DEVICE_SCRIPTS)
def test_device_flag_is_parsed(script: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``--device`` takes cpu or cuda (anything else is an argparse error), and cuda without CUDA stops at
    once with a clear message instead of running on the CPU."""
    import importlib

    import torch

    main = importlib.import_module(f"benchmarks.{script}").main
    with pytest.raises(SystemExit) as bad:
        main(["--device", "tpu"])
    assert bad.value.code == 2 and "invalid choice: 'tpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda: CUDA is not available"):
            main(["--device", "cuda"])


def test_timing_helpers_and_target_table() -> None:
    import argparse

    import torch

    from benchmarks.timing import (
        Target,
        add_device_argument,
        best_of,
        median_of,
        resolve_device,
        target_table,
    )

    p = argparse.ArgumentParser()
    add_device_argument(p)
    assert p.parse_args([]).device == "cpu" and p.parse_args(["--device", "cuda"]).device == "cuda"
    assert resolve_device("cpu") == torch.device("cpu")
    calls = []
    assert best_of(lambda: calls.append(1), 3) >= 0 and len(calls) == 3
    assert median_of(lambda: calls.append(1), 2, "cpu") >= 0 and len(calls) == 3 + 1 + 2  # one warm-up
    table = target_table(
        [Target("speed-up", 150.0, 100.0), Target("overhead", 7.5, 5.0, at_least=False, unit="%")], "title"
    )
    assert table.splitlines()[0] == "title"
    assert "| speed-up | 150x | >= 100x | PASS |" in table
    assert "| overhead | 7.5% | <= 5.0% | MISS |" in table


def test_gpu_check_script_is_valid_bash_and_documents_its_call() -> None:
    script = ROOT / "benchmarks" / "gpu_check.sh"
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = script.read_text()
    assert 'run(command="bash benchmarks/gpu_check.sh", timeout_s=' in text
    assert "DEVICE=cpu bash benchmarks/gpu_check.sh" in text
    for name in ("bench_ess.py", "bench_mixers.py", "bench_callbacks.py", "--device cuda -m device"):
        assert name in text, name


@pytest.mark.slow
def test_pytest_device_cuda_without_cuda_is_an_error() -> None:
    """``pytest --device cuda`` without CUDA fails at once (a usage error), it does not run on the CPU."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-n",
            "0",
            "-p",
            "no:cacheprovider",
            "--device",
            "cuda",
            "--co",
        ]
        + ["tests/models/test_ops_fft_conv.py"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 4, out.stdout[-2000:] + out.stderr[-2000:]
    assert "--device cuda: CUDA is not available" in out.stdout + out.stderr
