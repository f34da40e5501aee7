"""The run-directory lock: one ntdist run at a time per directory.

Rank 0 holds an exclusive `flock` on `.ntdist-lock` for the whole run and
writes its pid, host and SLURM job id into it. The kernel (or the NFS server)
drops the lock when the process dies, however it dies, so a lock left by a
killed run is stale by construction: the next run takes it over and says so.
On a file system without flock support the recorded holder is checked
instead: a dead pid on this host, or this very SLURM job (a requeue), is stale.
"""

import errno
import fcntl
import json
import os
import socket
from typing import Optional

from ntdist.errors import UserError
from ntdist.records.manifest import LOCK_FILE

_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": os.environ.get("SLURM_JOB_ID", "")}


def _read(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            info = json.loads(f.read() or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _holder_alive(info: dict) -> bool:
    """Without flock: whether the recorded holder may still run (unknown holders count as alive)."""
    me = _me()
    if info.get("slurm_job") and info.get("slurm_job") == me["slurm_job"] and info.get("pid") != me["pid"]:
        return False   # a requeued job finds the lock of its own earlier incarnation
    if info.get("host") != me["host"] or not isinstance(info.get("pid"), int):
        return True
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _in_use(run_dir: str, info: dict) -> UserError:
    return UserError(f"run directory '{run_dir}' is in use by pid {info.get('pid', '?')} on host "
                     f"{info.get('host', '?')}; wait for that run to end (or stop it), or choose another output.dir")


class RunLock:
    """The lock on one run directory; `acquire` raises a UserError naming the holder when it is taken."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._fd: Optional[int] = None
        self.took_over: Optional[dict] = None   # the holder of a stale lock this run replaced

    def acquire(self) -> None:
        for _ in range(5):   # another run may release (unlink) the file between our open and our flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise _in_use(self.run_dir, _read(self.path)) from None
                if err.errno not in _NO_FLOCK:
                    raise
                old = _read(self.path)
                if old and _holder_alive(old):
                    raise _in_use(self.run_dir, old) from None
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            old = _read(self.path)
            if old.get("pid") is not None:
                self.took_over = old
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(_me()).encode())
            os.fsync(fd)
            self._fd = fd
            return
        raise _in_use(self.run_dir, _read(self.path))

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in this order, so no one locks a removed file)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None


def lock_holder(run_dir: str) -> Optional[dict]:
    """Who holds `run_dir`'s lock now ({'pid', 'host'}), or None when it is free or stale."""
    path = os.path.join(run_dir, LOCK_FILE)
    if not os.path.isfile(path):
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return _read(path)
        info = _read(path)
        return info if info and _holder_alive(info) else None
    finally:
        os.close(fd)
    return None


def check_free(run_dir: str) -> None:
    """Raise the 'in use by pid N on host H' error when another live run holds `run_dir`."""
    holder = lock_holder(run_dir)
    if holder is not None:
        raise _in_use(run_dir, holder)
