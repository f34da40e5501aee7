"""Atomic file writes: a file holds either its old or its new content, never a mix.

Everything ntdist writes as a whole file (checkpoints, results.json, config.yaml,
sweep.json, reports) goes through `replacing`: write to a temporary file beside
the target, flush it to disk, rename it into place.
"""

import contextlib
import os
import tempfile


@contextlib.contextmanager
def replacing(path: str):
    """Yield a temporary path beside `path`; once written, it is flushed to disk and renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-",
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
