"""Atomic file writes: a file holds either its old or its new content, never a mix.

Everything ntdist writes as a whole file (checkpoints, results.json, config.yaml,
sweep.json, reports) goes through `replacing`: write to a temporary file beside
the target, flush it to disk, rename it into place. A kill before the rename
leaves the temporary (`.tmp-` and 8 random characters before the target's name),
which `temporary_target` recognises, so that the run directory's rules
(`records.manifest`) can clean up after it.
"""

import contextlib
import errno
import os
import re
import tempfile
from typing import Optional

from ntdist.errors import UserError

FULL_DISK = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}   # errno -> words
TEMP_PREFIX = ".tmp-"
_TEMPORARY = re.compile(re.escape(TEMP_PREFIX) + r"[a-z0-9_]{8}(.+)")   # mkstemp's 8 characters, then the name


@contextlib.contextmanager
def full_disk_is_user_error(path: str):
    """Turn a write to `path` that fails for lack of space (or quota) into one line for the user (exit 2)."""
    try:
        yield
    except OSError as err:
        if err.errno not in FULL_DISK:
            raise
        raise UserError(f"{FULL_DISK[err.errno]} while writing '{path}' (left as it was); free some space and "
                        "rerun: an interrupted run continues with --resume") from None


@contextlib.contextmanager
def replacing(path: str):
    """Yield a temporary path beside `path`; once written, it is flushed to disk and renamed into place.
    A full disk leaves `path` as it was and raises a UserError naming it."""
    with full_disk_is_user_error(path), _replacing(path) as tmp:
        yield tmp


@contextlib.contextmanager
def _replacing(path: str):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=TEMP_PREFIX,
                               suffix=os.path.basename(path))
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; give the file the mode any other new file gets
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def temporary_target(name: str) -> Optional[str]:
    """The file name a temporary of `replacing` named `name` was to become, or None if it is not one."""
    match = _TEMPORARY.fullmatch(name)
    return match.group(1) if match else None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` so that `path` holds either its old or its new content, never a mix."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def remove_if_present(path: str) -> None:
    """Delete `path` if it exists (a state file once the stage's final checkpoint has replaced it)."""
    if os.path.exists(path):
        os.unlink(path)
