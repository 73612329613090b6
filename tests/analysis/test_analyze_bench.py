"""benchmarks/bench_analyze.py runs end to end in its --quick form and prints its table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts processes or trains (the fast lane: -m 'not slow')

ROOT = Path(__file__).resolve().parents[2]


def test_bench_analyze_quick_prints_its_table() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_analyze.py"), "--quick"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for model in ("llama", "mamba"):
        for positions in ("16", "all"):
            assert re.search(
                rf"\| {model} \| 128 \| {positions} \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", out.stdout
            ), out.stdout
