"""The app's checkpointing on Lightning's hooks: atomic, checksummed files, and a current ``last.ckpt``.

- :class:`AtomicCheckpointIO` (a ``TorchCheckpointIO``, the trainer's ``plugins``): every file Lightning
  writes (``ModelCheckpoint``'s, the signal handler's, SLURM's ``hpc_ckpt``) goes through
  :func:`ess_train.app.checkpoint_files.write_checkpoint_file`: a temporary file in the same directory, fsync,
  rename, and a sidecar ``<file>.json`` with its step and sha256. Lightning's own writer stages the file in
  ``$TMPDIR`` and copies it when that is another filesystem, which a full disk truncates.
- :class:`RunCheckpoint` (a ``ModelCheckpoint``): ``last.ckpt`` at every validation and at the end of
  training, not only when a best checkpoint was written (Lightning's ``save_last``), always under that name
  (replaced atomically; Lightning would write ``last-v1.ckpt`` beside a ``last.ckpt`` it did not write
  itself, and a resume from it would then find two); a run directory that
  was moved or copied keeps its bookkeeping (paths in the checkpointed state are rebased to the new
  directory, so the copy writes ``last.ckpt``, not ``last-v1.ckpt``, and never deletes the original's files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn

from ess_train.app.checkpoint_files import remove_checkpoint_file, write_checkpoint_file

__all__ = ["AtomicCheckpointIO", "RunCheckpoint"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` writing local files atomically in their own directory, with a sha256 sidecar.

    A failed write raises :class:`ess_train.app.checkpoint_files.CheckpointWriteError` (an ``OSError``) and
    leaves the previous file as it was. Remote paths (``s3://``...) go to Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        step = checkpoint.get("global_step")
        epoch = checkpoint.get("epoch")
        write_checkpoint_file(
            path,
            lambda f: torch.save(checkpoint, f),
            step=None if step is None else int(step),
            epoch=None if epoch is None else int(epoch),
        )

    def remove_checkpoint(self, path: Any) -> None:
        if not _is_local_file_protocol(str(path)):
            return super().remove_checkpoint(path)
        remove_checkpoint_file(path)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` (``save_last=True``) is written at every validation and at the
    end of training, and whose bookkeeping follows a moved or copied run directory.

    Its checkpointed state keeps ``ModelCheckpoint``'s key, so runs started with a plain ``ModelCheckpoint``
    resume with their best-checkpoint record.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_saved_step: int | None = None

    @property
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        if self.save_last and not self.last_model_path:  # the first save of this run, or a resume from a
            # checkpoint written before last.ckpt (best-*): replace last.ckpt (atomically), no last-v1.ckpt
            self.last_model_path = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_saved_step = trainer.global_step

    def _save_last_if_behind(self, trainer: pl.Trainer) -> None:
        if (
            not self.save_last
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
            or bool(trainer.fast_dev_run)
            or trainer.global_step == 0
            or self._last_saved_step == trainer.global_step
        ):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_last_if_behind(trainer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old = state_dict.get("dirpath")
        if old and self.dirpath and str(old) != str(self.dirpath):
            state_dict = _rebase_paths(state_dict, str(old), str(self.dirpath))
        super().load_state_dict(state_dict)


def _rebase_paths(state: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """``state`` with every path under ``old`` moved under ``new`` (a run directory moved or copied)."""

    def move(path: Any) -> Any:
        if not isinstance(path, str) or not path:
            return path
        try:
            rel = Path(path).relative_to(old)
        except ValueError:
            return path
        return str(Path(new) / rel)

    out = dict(state)
    out["dirpath"] = new
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if key in out:
            out[key] = move(out[key])
    if isinstance(out.get("best_k_models"), dict):
        out["best_k_models"] = {move(k): v for k, v in out["best_k_models"].items()}
    return out
