"""Loggers as the app configures them (``conf/logger/``)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

__all__ = ["WandbLogger"]


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger``, without the ``anonymous`` argument that wandb >= 0.19 ignores.

    Lightning always passes ``anonymous`` to ``wandb.init`` (``None`` unless asked), and wandb then prints
    "The anonymous setting has no effect" at every run; it is only dropped when not asked for.
    """

    def __init__(self, *args: Any, anonymous: bool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, anonymous=anonymous, **kwargs)
        if not anonymous:
            self._wandb_init.pop("anonymous", None)
