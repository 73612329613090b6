"""Task configurations: the fields every task shares (:class:`TaskConfig`), their validation, and the
error an unknown key raises (:class:`UnknownConfigKeyError`, via :func:`ess_train.checks.check_keywords`).

``IGNORE_INDEX`` (-100) is the label of every position where nothing is scored (docs/DESIGN.md).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from ess_train.checks import check_int, check_keywords

__all__ = ["IGNORE_INDEX", "UnknownConfigKeyError", "TaskConfig"]

IGNORE_INDEX = -100


class UnknownConfigKeyError(TypeError, ValueError):
    """A configuration key that the task does not know (a TypeError and a ValueError)."""


def _plain(value: Any) -> Any:
    """Turn OmegaConf containers (and tuples) into plain dicts/lists so configs hash and pickle."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


@dataclass
class TaskConfig:
    """Fields shared by every task.

    seed: master seed; train, test and every slice draw from disjoint seeds derived from it.
    num_train / num_test: examples per slice (MQAR slices may set their own count).
    batch_size, num_workers: DataLoader settings. cache_dir: save/load generated tensors there (None: off).
    """

    seed: int = 0
    num_train: int = 20_000
    num_test: int = 1_000
    batch_size: int = 64
    num_workers: int = 0
    cache_dir: str | None = None

    #: fields that do not change the generated data (left out of the cache key)
    LOADER_FIELDS: ClassVar[tuple[str, ...]] = ("batch_size", "num_workers", "cache_dir")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> TaskConfig:
        """Build and validate; unknown keys raise UnknownConfigKeyError listing the valid ones."""
        check_keywords(kwargs, cls, error=lambda msg: UnknownConfigKeyError(f"{cls.__name__}: {msg}"))
        return cls(**kwargs)

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, _plain(getattr(self, f.name)))
        self.validate()

    def replace(self, **kwargs: Any) -> TaskConfig:
        """A validated copy with some fields changed."""
        return type(self).from_kwargs(**{**dataclasses.asdict(self), **kwargs})

    def validate(self) -> None:
        """Raise ValueError naming the parameter and the bound it breaks."""
        check_int("seed", self.seed)
        check_int("num_train", self.num_train, 1)
        check_int("num_test", self.num_test, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("num_workers", self.num_workers, 0)
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, os.PathLike)):
            raise ValueError(f"cache_dir must be a path or None, got {self.cache_dir!r}")

    def data_fields(self) -> dict[str, Any]:
        """The fields that determine the generated data."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.LOADER_FIELDS}
