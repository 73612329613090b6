"""Checkpoint files that are written atomically, verified before use, and chosen by the step they hold.

Every checkpoint ``<name>.ckpt`` the app writes has a sidecar ``<name>.ckpt.json``: the step and epoch it
holds, its size and its sha256 (and the previous entry, see below). A file is written

1. to a temporary file in the same directory (same filesystem: never staged in ``$TMPDIR`` and copied),
   flushed and fsynced;
2. its sidecar is replaced (temporary file, fsync, rename), keeping the entry of the file it replaces under
   ``previous``;
3. renamed over ``<name>.ckpt``, and the directory fsynced.

A crash at any point leaves either the old file or the new one, each matching its sidecar (the old one
its ``previous`` entry, between steps 2 and 3). A write that fails (a full disk) removes its temporary
file and raises :class:`CheckpointWriteError`; the previous ``<name>.ckpt`` is untouched.

:func:`choose_checkpoint` picks, of a run's checkpoints, the newest by the step it holds (whatever its file
name: ``last.ckpt``, ``last-v1.ckpt``, ``best-step100.ckpt``, Lightning's ``hpc_ckpt_<n>.ckpt``) that is
intact: its sha256 matches its sidecar, or, without a sidecar (files written before sidecars), it loads.
Torch only, no Lightning.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "SIDECAR_SUFFIX",
    "CheckpointWriteError",
    "CheckpointCheck",
    "NoIntactCheckpoint",
    "write_checkpoint_file",
    "remove_checkpoint_file",
    "write_text_atomically",
    "recorded_step",
    "check_checkpoint",
    "choose_checkpoint",
]

SIDECAR_SUFFIX = ".json"
_CHUNK = 1 << 20


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. a full disk); the previous file at ``path`` is intact."""

    def __init__(self, path: Path, step: int | None, cause: OSError) -> None:
        self.path, self.step, self.cause = Path(path), step, cause
        kept = check_checkpoint(self.path) if self.path.exists() else None
        if kept is not None and kept.ok:
            self.kept = f"{self.path.name} of step {kept.step} is intact"
        else:
            self.kept = f"there is no earlier {self.path.name}"
        reason = cause.strerror or str(cause)
        super().__init__(
            cause.errno,
            f"could not write the checkpoint of step {step} to {self.path}: {reason}; the partial file was "
            f"removed and {self.kept}",
        )


def sidecar_of(path: str | Path) -> Path:
    """``<name>.ckpt.json`` beside ``<name>.ckpt``."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


class _HashingWriter:
    """A binary file that hashes and counts what it writes."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha256.update(view)
        self.size += len(view)
        return self.f.write(view)

    def flush(self) -> None:
        self.f.flush()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # a platform without directory fds: the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _write_file(path: Path, write: Callable[[_HashingWriter], None]) -> _HashingWriter:
    """``write`` into a temporary file beside ``path``, fsynced; the temporary file is removed on failure."""
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return writer


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        entry = json.loads(sidecar_of(path).read_text())
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) and "sha256" in entry else None


def write_checkpoint_file(
    path: str | Path, write: Callable[[BinaryIO], None], step: int | None = None, epoch: int | None = None
) -> dict[str, Any]:
    """Write ``path`` atomically with ``write(f)`` (e.g. ``torch.save(checkpoint, f)``) and its sidecar.

    Returns the sidecar entry. Raises :class:`CheckpointWriteError` when the file system refuses (nothing
    of this write is left behind then, and the previous file and sidecar are as they were).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    side = sidecar_of(path)
    try:
        writer = _write_file(path, write)  # type: ignore[arg-type]
        previous = _read_sidecar(path) if path.exists() else None
        if previous is not None:
            previous.pop("previous", None)
        entry = {
            "file": path.name,
            "step": step,
            "epoch": epoch,
            "size": writer.size,
            "sha256": writer.sha256.hexdigest(),
            "previous": previous,
        }
        text = json.dumps(entry, indent=1).encode()
        _write_file(side, lambda f: f.write(text))
        os.replace(_temporary(side), side)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        _temporary(side).unlink(missing_ok=True)
        raise CheckpointWriteError(path, step, err) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        _temporary(side).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return entry


def write_text_atomically(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` (temporary file beside it, fsync, rename)."""
    path = Path(path)
    data = text.encode()
    _write_file(path, lambda f: f.write(data))
    os.replace(_temporary(path), path)


def remove_checkpoint_file(path: str | Path) -> None:
    """Remove a checkpoint and its sidecar."""
    path = Path(path)
    path.unlink(missing_ok=True)
    sidecar_of(path).unlink(missing_ok=True)


@dataclass(frozen=True)
class CheckpointCheck:
    """What :func:`check_checkpoint` found: the step a file holds (None where unknown) and its problem."""

    path: Path
    step: int | None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _load_step(path: Path) -> int:
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:  # not a zip file (legacy format): mmap is not possible
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "global_step" not in ckpt:
        raise ValueError("not a Lightning checkpoint (no global_step)")
    return int(ckpt["global_step"])


def recorded_step(path: str | Path) -> int | None:
    """The step ``path``'s sidecar records (no check of the file itself), else None."""
    entry = _read_sidecar(Path(path))
    return None if entry is None or entry.get("step") is None else int(entry["step"])


def check_checkpoint(path: str | Path) -> CheckpointCheck:
    """Verify one checkpoint: against its sidecar's sha256 and size, or, without a sidecar, by loading it."""
    path = Path(path)
    entry = _read_sidecar(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        return CheckpointCheck(path, None if entry is None else entry.get("step"), f"cannot be read: {err}")
    if entry is not None:
        candidates = [entry] + ([entry["previous"]] if isinstance(entry.get("previous"), dict) else [])
        sized = [e for e in candidates if e.get("size") == size]
        if sized:
            digest = _sha256(path)
            for e in sized:
                if e.get("sha256") == digest:
                    return CheckpointCheck(path, e.get("step"))
        recorded = f"{entry['size']} bytes, sha256 {str(entry['sha256'])[:12]}..."
        found = f"{size} bytes" + (f", sha256 {digest[:12]}..." if sized else "")
        return CheckpointCheck(
            path, entry.get("step"), f"fails its checksum (recorded {recorded}; the file has {found})"
        )
    if size == 0:
        return CheckpointCheck(path, None, "is empty (0 bytes)")
    try:
        return CheckpointCheck(path, _load_step(path))
    except Exception as err:
        return CheckpointCheck(path, None, f"does not load ({type(err).__name__}: {err})")


class NoIntactCheckpoint(ValueError):
    """Checkpoints exist, but none is intact."""


def _candidates(paths: Iterable[Path]) -> list[tuple[int | None, float, Path]]:
    out = []
    for p in paths:
        if not p.is_file():
            continue
        step = recorded_step(p)
        if step is None and p.stat().st_size > 0:
            try:
                step = _load_step(p)
            except Exception:
                step = None
        out.append((step, p.stat().st_mtime, p))
    return out


def choose_checkpoint(paths: Iterable[Path]) -> tuple[CheckpointCheck | None, list[str]]:
    """The newest intact checkpoint of ``paths`` by recorded step (then by time written), and a message
    for every newer one that was skipped, saying why and how many steps that costs.

    ``(None, [])`` when there is no checkpoint; raises :class:`NoIntactCheckpoint` naming every file when
    there are checkpoints and none is intact.
    """
    # unknown steps first (such a file is named when it fails), then the newest by step and time written
    found_all = _candidates(paths)
    known = sorted((c for c in found_all if c[0] is not None), key=lambda c: (c[0], c[1]), reverse=True)
    order = [c for c in found_all if c[0] is None] + known
    bad: list[CheckpointCheck] = []
    for _, _, path in order:
        found = check_checkpoint(path)
        if found.ok:
            return found, [_skip_message(b, found) for b in bad]
        bad.append(found)
    if bad:
        raise NoIntactCheckpoint("no intact checkpoint: " + "; ".join(f"{b.path} {b.problem}" for b in bad))
    return None, []


def _skip_message(bad: CheckpointCheck, chosen: CheckpointCheck) -> str:
    if bad.step is None:
        cost = "its step is unknown"
    else:
        lost = max(0, int(bad.step) - int(chosen.step or 0))
        cost = f"it held step {bad.step}: this costs {lost} step{'s' if lost != 1 else ''}"
    return f"skipped {bad.path}: it {bad.problem} ({cost}; resuming from step {chosen.step})"
