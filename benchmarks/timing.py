"""Shared timing for the benchmarks: a ``--device`` flag, synchronized timers, best-of / median-of runs, and
the target table (measured ratio, target, PASS/MISS) that the GPU check (``benchmarks/gpu_check.sh``) reads.

On CUDA, kernels run asynchronously: every timer here calls ``torch.cuda.synchronize()`` before reading
the clock at both ends of a timed region, so a time is that of the work, not of its launch.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

DEVICES = ("cpu", "cuda")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device {cpu,cuda}`` (default cpu)."""
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="where tensors and models live (default cpu; cuda: timed regions are synchronized)",
    )


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``; exits with a clear message when CUDA is asked for and not available."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"--device cuda: CUDA is not available (torch {torch.__version__}, "
            f"torch.version.cuda={torch.version.cuda})"
        )
    return torch.device(name)


def describe(device: torch.device) -> str:
    """``NVIDIA H200`` or ``CPU (4 threads)``, with the torch version."""
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    return f"{where}, torch {torch.__version__}"


def sync(device: torch.device | str | None = None) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device | str | None = None) -> float:
    """``time.perf_counter()`` after the device's queued work is done."""
    sync(device)
    return time.perf_counter()


def timed(fn: Callable[[], object], device: torch.device | str | None = None) -> float:
    """Seconds of one ``fn()`` (synchronized at both ends on CUDA)."""
    t0 = now(device)
    fn()
    return now(device) - t0


def best_of(fn: Callable[[], object], repeats: int, device: torch.device | str | None = None) -> float:
    """The smallest of ``repeats`` timed runs of ``fn()`` (no warm-up: the caller's)."""
    return min(timed(fn, device) for _ in range(max(1, repeats)))


def median_of(
    fn: Callable[[], object], reps: int, device: torch.device | str | None = None, warmup: bool = True
) -> float:
    """The median of ``reps`` timed runs of ``fn()``, after one untimed warm-up run when ``warmup``."""
    if warmup:
        fn()
    return statistics.median(timed(fn, device) for _ in range(max(1, reps)))


@dataclass(frozen=True)
class Target:
    """One of the issue's targets: ``measured`` against ``target`` (``at_least``: measured >= target, else
    measured <= target)."""

    check: str
    measured: float
    target: float
    at_least: bool = True
    unit: str = "x"

    @property
    def passed(self) -> bool:
        return self.measured >= self.target if self.at_least else self.measured <= self.target

    def cells(self) -> list[str]:
        def fmt(v: float) -> str:
            return f"{v:.3g}{self.unit}" if self.unit != "%" else f"{v:.1f}%"

        op = ">=" if self.at_least else "<="
        return [self.check, fmt(self.measured), f"{op} {fmt(self.target)}", "PASS" if self.passed else "MISS"]


def target_table(targets: Sequence[Target], title: str = "") -> str:
    """A markdown table ``| check | measured | target | result |`` (result: PASS or MISS)."""
    lines = [title] if title else []
    lines += ["| check | measured | target | result |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(t.cells()) + " |" for t in targets]
    return "\n".join(lines)
