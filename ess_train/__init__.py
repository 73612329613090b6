"""ess_train: effective state-size (ESS) as a training-time tool for sequence models."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["analyze"]


def __getattr__(name: str) -> Any:
    """``ess_train.analyze`` on first use (so that ``import ess_train`` stays light)."""
    if name == "analyze":
        from ess_train.analysis import analyze

        return analyze
    raise AttributeError(f"module 'ess_train' has no attribute {name!r}")
