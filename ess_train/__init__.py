"""ess_train: effective state-size (ESS) as a training-time tool for sequence models."""

__version__ = "0.1.0"
