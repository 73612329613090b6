"""``RunLock``: one live process per run directory.

The app holds ``<run dir>/.ess_train.lock`` while it runs: an exclusive ``flock`` on that file (the kernel
drops it when the process ends, however it ends), and the holder's pid, host and start time written in it.
A second start into the same directory (the same ``hydra.run.dir``, or ``resume`` of a run that is still
going) is refused with :class:`RunDirectoryBusy` naming the holder, so ``resume: auto`` never adopts a live
run. A lock file left by a process that is gone (killed, crashed: the flock is free, the file still names
it) is taken over, with a note. Where the filesystem has no ``flock`` (some network filesystems), the pid in
the file is checked instead: a live pid on this host holds the directory; one on another host cannot be
checked and is reported as holding it.

Under DDP only the launching process (rank 0) takes the lock: ranks started by Lightning, torchrun or
SLURM (``LOCAL_RANK``/``NODE_RANK``/``RANK``/``SLURM_PROCID`` other than 0) belong to the run that holds it.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

__all__ = ["LOCK_FILE", "RunLock", "RunDirectoryBusy", "is_launching_process"]

LOCK_FILE = ".ess_train.lock"
_RANK_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "RANK", "GLOBAL_RANK", "SLURM_PROCID")

try:
    import fcntl
except ImportError:  # Windows: pid files only
    fcntl = None  # type: ignore[assignment]


class RunDirectoryBusy(RuntimeError):
    """Another live process runs in this run directory."""


def is_launching_process() -> bool:
    """False in a process that is a non-zero rank of a distributed run."""
    return all(os.environ.get(name, "0") in ("", "0") for name in _RANK_VARIABLES)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(owner: dict[str, Any]) -> str:
    started = owner.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {when}"


class RunLock:
    """An exclusive lock on a run directory (see the module docstring). ``with RunLock(d) as lock:``."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.note: str | None = None  #: set when a stale lock of a dead process was taken over
        self._fd: int | None = None

    def _read_owner(self, fd: int) -> dict[str, Any]:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 4096)
        try:
            owner = json.loads(data.decode() or "{}")
        except ValueError:
            return {}
        return owner if isinstance(owner, dict) else {}

    def _busy(self, owner: dict[str, Any]) -> RunDirectoryBusy:
        return RunDirectoryBusy(
            f"run directory {self.run_dir} is in use by a live run ({_describe(owner)}; lock file "
            f"{self.path}); wait for it to end, or start this run in another directory (hydra.run.dir=...)"
        )

    def acquire(self) -> RunLock:
        """Take the lock; raises :class:`RunDirectoryBusy` when a live process holds it."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            flocked = False
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    flocked = True
                except BlockingIOError:
                    raise self._busy(self._read_owner(fd)) from None
                except OSError as err:  # no flock on this filesystem: the pid check below decides
                    if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        raise
            owner = self._read_owner(fd)
            pid = owner.get("pid")
            if isinstance(pid, int) and pid != os.getpid():
                same_host = owner.get("host") == socket.gethostname()
                if not flocked and (not same_host or _alive(pid)):
                    raise self._busy(owner)
                self.note = f"took over the lock of a run that is gone ({_describe(owner)}): {self.path}"
            mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(mine).encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Clear the holder's record and drop the lock (the file stays: removing it would race)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError:
                pass
        os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
