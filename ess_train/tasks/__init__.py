"""Synthetic memory tasks as LightningDataModules: MQAR (Zoology), the MAD suite, delimited recall.

``build_task(name, **kwargs)`` builds one from keyword arguments (what Hydra passes); unknown keys
raise :class:`UnknownConfigKeyError` (a TypeError and a ValueError) listing the valid ones.
Batches: ``{"inputs": Long[B, L], "labels": Long[B, L] (-100 unscored), "slice_id": Long[B]}``;
``labels[t]`` is the output expected at position ``t`` (already shifted).
"""

from __future__ import annotations

from typing import Any

from .base import (
    IGNORE_INDEX,
    SyntheticTaskDataModule,
    TaskConfig,
    TensorDictDataset,
    UnknownConfigKeyError,
    derive_seed,
    make_generator,
)
from .delimited import DelimitedRecallConfig, DelimitedRecallDataModule, generate_delimited_recall
from .mad import (
    CompressionConfig,
    CompressionDataModule,
    FuzzyInContextRecallConfig,
    FuzzyInContextRecallDataModule,
    InContextRecallConfig,
    InContextRecallDataModule,
    MemorizationConfig,
    MemorizationDataModule,
    NoisyInContextRecallConfig,
    NoisyInContextRecallDataModule,
    SelectiveCopyingConfig,
    SelectiveCopyingDataModule,
    generate_compression,
    generate_fuzzy_in_context_recall,
    generate_in_context_recall,
    generate_memorization,
    generate_selective_copying,
)
from .metrics import SliceAccuracy, answer_accuracy
from .mqar import MQARConfig, MQARDataModule, MQARSlice, generate_mqar

TASKS: dict[str, type[SyntheticTaskDataModule]] = {
    cls.task_name: cls
    for cls in (
        MQARDataModule,
        InContextRecallDataModule,
        NoisyInContextRecallDataModule,
        FuzzyInContextRecallDataModule,
        SelectiveCopyingDataModule,
        CompressionDataModule,
        MemorizationDataModule,
        DelimitedRecallDataModule,
    )
}


def task_names() -> list[str]:
    """Registered task names (MAD's hyphenated names are accepted too)."""
    return list(TASKS)


def build_task(name: str, **kwargs: Any) -> SyntheticTaskDataModule:
    """Build a task data module by name, e.g. ``build_task("mqar", seq_len=128, num_kv_pairs=8)``."""
    key = name.strip().lower().replace("-", "_")
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {task_names()}")
    return TASKS[key](**kwargs)


__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "CompressionConfig",
    "CompressionDataModule",
    "DelimitedRecallConfig",
    "DelimitedRecallDataModule",
    "FuzzyInContextRecallConfig",
    "FuzzyInContextRecallDataModule",
    "InContextRecallConfig",
    "InContextRecallDataModule",
    "MQARConfig",
    "MQARDataModule",
    "MQARSlice",
    "MemorizationConfig",
    "MemorizationDataModule",
    "NoisyInContextRecallConfig",
    "NoisyInContextRecallDataModule",
    "SelectiveCopyingConfig",
    "SelectiveCopyingDataModule",
    "SliceAccuracy",
    "SyntheticTaskDataModule",
    "TaskConfig",
    "TensorDictDataset",
    "UnknownConfigKeyError",
    "answer_accuracy",
    "build_task",
    "derive_seed",
    "generate_compression",
    "generate_delimited_recall",
    "generate_fuzzy_in_context_recall",
    "generate_in_context_recall",
    "generate_memorization",
    "generate_mqar",
    "generate_selective_copying",
    "make_generator",
    "task_names",
]
