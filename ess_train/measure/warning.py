"""``ESSWarning``: the one warning category of ESS measurement and of the callbacks built on it."""

from __future__ import annotations

__all__ = ["ESSWarning"]


class ESSWarning(UserWarning):
    """Category of every warning the ESS callbacks emit (filter with ``warnings.filterwarnings``)."""
