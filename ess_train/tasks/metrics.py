"""Answer accuracy for the synthetic tasks: argmax of the logits against the labels where
``labels != -100``, overall and per slice. Torch only; tensors stay on their device."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import IGNORE_INDEX


def _counts(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Per-row ``(correct, answers)`` counts."""
    mask = labels != ignore_index
    correct = (logits.argmax(dim=-1) == labels) & mask
    return correct.sum(dim=-1), mask.sum(dim=-1)


def _per_slice(values: Tensor, slice_id: Tensor, num_slices: int) -> Tensor:
    out = torch.zeros(num_slices, dtype=torch.float64, device=values.device)
    return out.index_add_(0, slice_id.to(values.device), values.to(torch.float64))


def _report(
    correct: Tensor, total: Tensor, slice_names: Sequence[str] | None, slice_kv_pairs: Sequence[int] | None
) -> dict[str, Tensor]:
    """Dict from per-slice correct/total counts (float64, ``[S]``)."""
    overall_total = total.sum()
    out: dict[str, Tensor] = {
        "accuracy": (correct.sum() / overall_total.clamp(min=1)).float(),
        "num_answers": overall_total.long(),
    }
    if slice_names is None:
        return out
    acc = correct / total  # nan where a slice had no answers
    for i, name in enumerate(slice_names):
        out[f"accuracy/{name}"] = acc[i].float()
        out[f"num_answers/{name}"] = total[i].long()
        if slice_kv_pairs is not None:
            out[f"kv_pairs/{name}"] = torch.tensor(int(slice_kv_pairs[i]), device=acc.device)
    return out


def answer_accuracy(
    logits: Tensor,
    labels: Tensor,
    slice_id: Tensor | None = None,
    slice_names: Sequence[str] | None = None,
    slice_kv_pairs: Sequence[int] | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, Tensor]:
    """Accuracy on the answer positions of one batch.

    logits ``[B, L, V]``, labels ``[B, L]``, slice_id ``[B]`` (indices into ``slice_names``).
    Returns 0-d tensors: ``accuracy`` and ``num_answers`` overall; with ``slice_id`` and
    ``slice_names`` also ``accuracy/<name>`` (nan for a slice without answers in the batch),
    ``num_answers/<name>`` and, given ``slice_kv_pairs`` (MQAR/recall), ``kv_pairs/<name>``.
    For epoch-level per-slice numbers use :class:`SliceAccuracy` (counts, not batch means).
    """
    c, t = _counts(logits, labels, ignore_index)
    if slice_id is None or slice_names is None:
        return _report(c.sum()[None].double(), t.sum()[None].double(), None, None)
    s = len(slice_names)
    return _report(_per_slice(c, slice_id, s), _per_slice(t, slice_id, s), slice_names, slice_kv_pairs)


class SliceAccuracy:
    """Accumulates correct/answer counts per slice over batches (e.g. a validation epoch)."""

    def __init__(
        self,
        slice_names: Sequence[str],
        slice_kv_pairs: Sequence[int] | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.slice_names = list(slice_names)
        self.slice_kv_pairs = None if slice_kv_pairs is None else list(slice_kv_pairs)
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self.correct: Tensor | None = None
        self.total: Tensor | None = None

    @torch.no_grad()
    def update(self, logits: Tensor, labels: Tensor, slice_id: Tensor) -> None:
        c, t = _counts(logits, labels, self.ignore_index)
        s = len(self.slice_names)
        c, t = _per_slice(c, slice_id, s), _per_slice(t, slice_id, s)
        if self.correct is None:
            self.correct, self.total = c, t
        else:
            self.correct += c.to(self.correct.device)
            self.total += t.to(self.total.device)

    def compute(self) -> dict[str, Tensor]:
        """Same keys as :func:`answer_accuracy`; slices never seen report nan accuracy."""
        if self.correct is None:
            z = torch.zeros(len(self.slice_names), dtype=torch.float64)
            return _report(z, z, self.slice_names, self.slice_kv_pairs)
        return _report(self.correct, self.total, self.slice_names, self.slice_kv_pairs)

    @classmethod
    def for_datamodule(cls, datamodule: object) -> SliceAccuracy:
        """From a task data module (``slice_names`` and, if any, ``slice_kv_pairs``)."""
        return cls(datamodule.slice_names, getattr(datamodule, "slice_kv_pairs", None))
