"""Probe batches and the one probe forward that captures every layer's operator.

A measurement runs the model once on a fixed probe batch, ``no_grad`` and in eval mode, and records each
protocol layer's :class:`~ess_train.models.protocol.OperatorView` (:func:`probe_views`, used by ESSMonitor
and ESSInitializer alike). The probe rows come from a user batch (:func:`probe_from_batch`) or from the
loaders of a trainer or datamodule (:func:`fetch_probe`), read as plain attributes: nothing here imports
Lightning, so a plain ``nn.Module`` and a DataLoader are measured the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ess_train.models.protocol import OperatorView, capture_operators

__all__ = [
    "extract_inputs",
    "probe_from_batch",
    "probe_rows",
    "fetch_probe",
    "kv_pairs_for",
    "eval_mode",
    "probe_views",
]

Probe = tuple[Tensor, Tensor | None]


# ------------------------------------------------------------------------------------------------ batches
def extract_inputs(batch: Any, input_key: str = "inputs") -> Tensor:
    """The model input of a batch: ``batch[input_key]`` for dicts, ``batch[0]`` for tuples/lists."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict):
        if input_key not in batch:
            raise KeyError(f"batch has no key {input_key!r} (keys: {sorted(batch)}); set input_key=")
        return batch[input_key]
    if isinstance(batch, (list, tuple)) and batch:
        return batch[0]
    raise TypeError(f"cannot extract model inputs from a batch of type {type(batch).__name__}")


def probe_from_batch(batch: Any, probe_size: int, input_key: str = "inputs") -> Probe:
    """``(inputs, slice_id or None)`` from a user-given probe batch (Tensor, dict or tuple)."""
    x = extract_inputs(batch, input_key)[:probe_size]
    sid = batch.get("slice_id") if isinstance(batch, dict) else None
    sid = sid[: x.shape[0]] if isinstance(sid, Tensor) else None
    return x.detach().clone(), None if sid is None else sid.detach().clone()


# ------------------------------------------------------------------------------------------------ loaders
def first_loader(loaders: Any) -> Any:
    if loaders is None:
        return None
    flat = getattr(loaders, "flattened", None)  # CombinedLoader
    if flat is not None:
        return flat[0] if flat else None
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    return loaders


def probe_rows(loader: Any, n: int, input_key: str = "inputs") -> Probe | None:
    """The first ``n`` input rows of ``loader`` (any iterable of batches), and their ``slice_id`` when every
    batch carries one; at most 64 batches are read. ``None`` when it yields nothing."""
    rows: list[Tensor] = []
    sids: list[Tensor] = []
    have = 0
    for i, batch in enumerate(loader):
        x = extract_inputs(batch, input_key)[: n - have]
        rows.append(x)
        sid = batch.get("slice_id") if isinstance(batch, dict) else None
        if isinstance(sid, Tensor):
            sids.append(sid[: x.shape[0]])
        have += x.shape[0]
        if have >= n or i >= 63:
            break
    if not rows:
        return None
    slice_id = torch.cat(sids) if len(sids) == len(rows) else None
    return torch.cat(rows), slice_id


def fetch_probe(source: Any, probe_size: int, input_key: str = "inputs") -> Probe | None:
    """First ``probe_size`` input rows (and their ``slice_id`` when batches carry one) of the validation data,
    falling back to the training data; ``None`` when no data can be reached.

    ``source`` is a trainer, read in the order ``datamodule.val_dataloader()``, ``trainer.val_dataloaders``,
    ``datamodule.train_dataloader()``, ``trainer.train_dataloader`` (attributes, any of them may be missing
    or ``None``), or a datamodule itself (no ``datamodule`` attribute, a ``train_dataloader()`` method):
    ``val_dataloader()``, then ``train_dataloader()``.
    Of a list, dict or ``CombinedLoader`` of loaders the first is read; a source that raises (not
    implemented, not set up) is skipped.
    """
    if not hasattr(source, "datamodule") and callable(getattr(source, "train_dataloader", None)):
        sources = [lambda: source.val_dataloader(), lambda: source.train_dataloader()]  # a datamodule
    else:
        dm = getattr(source, "datamodule", None)
        sources = [
            lambda: dm.val_dataloader() if dm is not None else None,
            lambda: source.val_dataloaders,
            lambda: dm.train_dataloader() if dm is not None else None,
            lambda: source.train_dataloader,
        ]
    for get in sources:
        try:
            loader = first_loader(get())
        except Exception:  # not implemented / not set up: try the next source
            continue
        if loader is None:
            continue
        got = probe_rows(loader, probe_size, input_key)
        if got is not None and got[0].shape[0] > 0:
            x, sid = got
            return x.detach().clone(), None if sid is None else sid.detach().clone()
    return None


def kv_pairs_for(datamodule: Any, slice_id: Tensor | None) -> Tensor | None:
    """Key-value pairs per probe row from ``datamodule.slice_kv_pairs`` (per slice, indexed by
    ``slice_id``) or ``datamodule.num_kv_pairs``; ``None`` when the task has no such notion."""
    if datamodule is None:
        return None
    per_slice = getattr(datamodule, "slice_kv_pairs", None)
    if per_slice is not None and slice_id is not None:
        if isinstance(per_slice, dict):
            names = list(getattr(datamodule, "slice_names", []) or [])
            per_slice = [per_slice.get(n, 0) for n in names] if names else list(per_slice.values())
        table = torch.as_tensor([float(v) for v in per_slice])
        if table.numel() and int(slice_id.max()) < table.numel():
            return table[slice_id.long().cpu()]
    num = getattr(datamodule, "num_kv_pairs", None)
    if isinstance(num, (int, float)) and not isinstance(num, bool) and num > 0:
        return torch.tensor(float(num))
    return None


# ------------------------------------------------------------------------------------------------ forward
@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode and restore each sub-module's own ``training`` flag afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in modes:
            m.training = flag


def probe_views(
    module: nn.Module,
    inputs: Tensor,
    layers: Mapping[str, nn.Module],
    forward_fn: Callable[[nn.Module, Tensor], Any] | None = None,
    context: contextlib.AbstractContextManager | None = None,
) -> dict[str, OperatorView]:
    """The operator view of each of ``layers`` (by name) from one forward of ``module`` on ``inputs``.

    The forward runs under ``torch.no_grad()``, in eval mode (each sub-module's own flag restored after),
    inside ``capture_operators(layers)`` and, innermost, ``context`` when given (e.g. a trainer's precision
    context, so the probe sees the numerics of training). ``forward_fn(module, inputs)`` replaces
    ``module(inputs)`` for models with another signature. A layer the forward did not call has no entry.
    """
    with torch.no_grad(), eval_mode(module), capture_operators(dict(layers)) as captured:
        with context if context is not None else contextlib.nullcontext():
            if forward_fn is not None:
                forward_fn(module, inputs)
            else:
                module(inputs)
    return dict(captured)
