"""The manifest of a run directory: the files ntdist wrote there, so that --overwrite removes only those.

`.ntdist-manifest` lists paths relative to the directory, one per line, after a
first line naming its format (`FORMAT`; a manifest without that line is of
format 1, written before finished checkpoints recorded their owner). A run
adds the names of every file it will write before it writes any of them (member
checkpoints are written by ranks other than 0, which never touch the manifest),
and reports and sweep summaries add theirs when they are written. `--overwrite`
deletes the listed files that exist and nothing else; every other file is
"foreign" and is left where it is. The manifest is also what marks a directory
as written by ntdist, which `--resume` requires, and its format tells a resume
whether the directory's finished checkpoints must record their owner.
"""

import os
import re
from typing import Iterable, List, Optional, Set

from ntdist.errors import UserError
from ntdist.records.files import atomic_write_text, temporary_target

MANIFEST_FILE = ".ntdist-manifest"
LOCK_FILE = ".ntdist-lock"
PROBE_FILE = ".write-test"   # written and removed at once: can the run write here?
BOOKKEEPING = (MANIFEST_FILE, LOCK_FILE, PROBE_FILE)   # ntdist's own files: neither listed nor foreign
FORMAT = 2            # of the manifests written now
OWNED_SINCE = 2       # the first format whose run's finished checkpoints record their owner
_HEADER = re.compile(r"# ntdist manifest format (\d+)")


def _header(version: int) -> str:
    return f"# ntdist manifest format {version}\n"


def _lines(run_dir: str) -> Optional[List[str]]:
    """The lines of `run_dir`'s manifest, or None when it has none."""
    path = os.path.join(run_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read '{path}' ({err}); delete it and clean the directory by hand") from None


def read_manifest(run_dir: str) -> Optional[Set[str]]:
    """The relative paths listed in `run_dir`'s manifest, or None when it has none."""
    lines = _lines(run_dir)
    if lines is None:
        return None
    return {name for name in lines if not name.startswith("#") and _inside(run_dir, name)}


def manifest_format(run_dir: str) -> Optional[int]:
    """The format of `run_dir`'s manifest (1 when it names none), or None when it has no manifest."""
    lines = _lines(run_dir)
    if lines is None:
        return None
    match = _HEADER.fullmatch(lines[0]) if lines else None
    return int(match.group(1)) if match else 1


def add_to_manifest(run_dir: str, names: Iterable[str]) -> None:
    """Record that ntdist writes `names` (relative to `run_dir`); atomic, so the list is never torn."""
    old = read_manifest(run_dir) or set()
    new = old | {os.path.normpath(n) for n in names}
    if new != old or not os.path.exists(os.path.join(run_dir, MANIFEST_FILE)):
        # a manifest that lists files keeps its format: those files were written by the version it names
        version = manifest_format(run_dir) if old else FORMAT
        header = _header(version) if version > 1 else ""
        atomic_write_text(os.path.join(run_dir, MANIFEST_FILE), header + "".join(f"{n}\n" for n in sorted(new)))


def _inside(run_dir: str, name: str) -> bool:
    """Whether `name` stays inside `run_dir` (a crafted manifest must not reach files elsewhere)."""
    if os.path.isabs(name) or name.split(os.sep)[0] == ".." or os.path.normpath(name).startswith(".."):
        return False
    root = os.path.realpath(run_dir)
    parent = os.path.realpath(os.path.dirname(os.path.join(run_dir, name)))
    return parent == root or parent.startswith(root + os.sep)


def all_files(run_dir: str) -> List[str]:
    """Every file below `run_dir`, relative to it, sorted (ntdist's bookkeeping files excluded)."""
    found = []
    for folder, _, files in os.walk(run_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), run_dir)
            if rel not in BOOKKEEPING:
                found.append(rel)
    return sorted(found)


def _temporaries(run_dir: str, ours: Set[str]) -> List[str]:
    """ntdist's temporaries below `run_dir` (left by a kill during an atomic write): those of a file in `ours`
    or of the manifest, which ntdist writes before anything else."""
    found = []
    for name in all_files(run_dir):
        folder, base = os.path.split(name)
        target = temporary_target(base)
        if target is not None and (os.path.join(folder, target) in ours or (not folder and target in BOOKKEEPING)):
            found.append(name)
    return found


def remove_temporaries(run_dir: str, planned: Iterable[str] = ()) -> None:
    """Delete ntdist's temporaries left in `run_dir` by a kill during an atomic write (`_temporaries`): those of
    a listed file, and of the `planned` ones this run writes, which an older manifest may not list yet."""
    ours = (read_manifest(run_dir) or set()) | {os.path.normpath(n) for n in planned}
    for name in _temporaries(run_dir, ours):
        os.unlink(os.path.join(run_dir, name))


def only_leftovers(run_dir: str) -> bool:
    """Whether `run_dir` holds nothing but ntdist's bookkeeping, its temporaries and empty folders: what a run
    killed during its very first write leaves, a directory that is ntdist's and as good as empty."""
    return not [name for name in all_files(run_dir) if name not in _temporaries(run_dir, set())]


def remove_written(run_dir: str, planned: Iterable[str] = ()) -> List[str]:
    """Delete the files the manifest lists and ntdist's temporaries (also those of the `planned` files), start a
    new manifest; returns the foreign files left behind."""
    listed = read_manifest(run_dir) or set()
    for name in sorted(listed):
        path = os.path.join(run_dir, name)
        if os.path.islink(path) or os.path.isfile(path):
            os.unlink(path)
    remove_temporaries(run_dir, planned)
    if os.path.exists(os.path.join(run_dir, MANIFEST_FILE)):
        atomic_write_text(os.path.join(run_dir, MANIFEST_FILE), _header(FORMAT))
    return all_files(run_dir)


def describe_foreign(run_dir: str, foreign: List[str], limit: int = 5) -> str:
    """One line naming the files --overwrite kept because ntdist did not write them."""
    shown = ", ".join(foreign[:limit]) + (f" and {len(foreign) - limit} more" if len(foreign) > limit else "")
    return (f"ntdist: warning: --overwrite kept {len(foreign)} file(s) in '{run_dir}' that ntdist did not write: "
            f"{shown}; move them away if they are not yours to keep")
