"""Every benchmark script runs end to end in its ``--quick`` form and prints its table (so none can rot)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# script -> a line its table must print (a ratio or a rate, measured)
EXPECTED = {
    "bench_ess.py": r"\|\s+\d+x \|\s+[\d.]+x",  # speed-up over the obvious loop, ratio to the floor
    "bench_mixers.py": r"\| gla \| core \(recurrence only\) \|.*\| [\d.]+ \|",
    "bench_callbacks.py": r"ratio \d+\.\d{3}",
    "bench_tasks.py": r"\| mqar \| .* \| [\d.]+ \| [\d,]+ \|",
    # a monitor share of training, and a bounded state (400 vs 100 measurements)
    "bench_scale.py": (
        r"\| attention \| 4 \| 128 \| .* \| [\d.]+% \|(?s:.*)"
        r"\| attention \| 4 \| 128 \| \d+ \| .* \| 1\.\d\d \|"
    ),
}


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_benchmark_quick_runs(script: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = ["--quick", "--no-memory"] if script == "bench_ess.py" else ["--quick"]
    if script == "bench_callbacks.py":
        args += ["--steps", "12", "--monitor-every", "5", "--ab-iters", "2"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(EXPECTED[script], out.stdout), out.stdout[-3000:]
