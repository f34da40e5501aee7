"""Members trained elsewhere (`fusion.members`): checked before anything is written, loaded instead of trained.

Each file is a state dict of `model.name` with `model.kwargs` (a `.safetensors`
or torch file, an ntdist checkpoint, a Lightning `.ckpt`), read by
`models.statedict`: the prefixes of training wrappers are removed, and a file
that does not fit is refused with one line naming the first tensor that differs.
Every rank checks every file in `make_run` (so all ranks stop together, before
rank 0 writes into the run directory); afterwards each rank loads only the
members its layout holds, from a file system all ranks see, as they see the run
directory. The stages after training take them as they take trained members.
`members_digest` fingerprints the files' bytes: it is part of the run's identity,
so a `--resume` after a file was replaced refuses the states fine-tuned before.
"""

import filecmp
import hashlib
import os
from typing import Dict, Sequence

import torch

from ntdist.errors import UserError
from ntdist.models import ModelSpec
from ntdist.models.statedict import load_weights
from ntdist.records.manifest import read_manifest

HINT = "fusion.members must be state dicts of model.name with model.kwargs: check those two keys and the files"


def _target(spec: ModelSpec) -> str:
    return f"model.name {spec.name} with kwargs {spec.kwargs}"


def check_members(paths: Sequence[str], spec: ModelSpec) -> None:
    """UserError naming the first file of `paths` (fusion.members) that does not fit `spec`, and what differs."""
    if not paths:
        return
    model = spec.build()
    for path in paths:
        load_weights(model, path, _target(spec), HINT)


def members_digest(paths: Sequence[str]) -> str:
    """A short digest of the bytes of the files `paths` (fusion.members), in order; "" without files."""
    if not paths:
        return ""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0" + str(path).encode() + b"\0")
    return digest.hexdigest()[:16]


def repeated_files(paths: Sequence[str]) -> str:
    """"" when the files `paths` (fusion.members) all differ, else what the diversity warning adds: which entry
    repeats which (the same file, or a byte-identical copy)."""
    for j, later in enumerate(paths):
        for earlier in paths[:j]:
            if os.path.realpath(earlier) == os.path.realpath(later) or filecmp.cmp(earlier, later, shallow=False):
                return (f"; fusion.members gives the same weights twice ('{earlier}' and '{later}'): list each "
                        "member once")
    return ""


def check_not_overwritten(paths: Sequence[str], run_dir: str) -> None:
    """UserError when `--overwrite` of `run_dir` would remove one of the files `paths` (fusion.members): a file
    ntdist wrote there before (a member of an earlier run in the same output.dir)."""
    listed = read_manifest(run_dir) or set()
    for path in paths:
        inside = os.path.relpath(os.path.realpath(path), os.path.realpath(run_dir))
        if inside in listed:
            raise UserError(f"fusion.members file '{path}' is {inside} of the run directory '{run_dir}', which "
                            "--overwrite removes; copy the members out of it first, or choose another output.dir")


def load_members(paths: Sequence[str], spec: ModelSpec, indices: Sequence[int], device) -> Dict[int, torch.nn.Module]:
    """{i: member i} for the `indices` a rank holds, member i loaded from `paths[i]` (fusion.members) onto `device`."""
    held = {}
    for i in indices:
        model = spec.build()
        load_weights(model, paths[i], _target(spec), HINT)
        held[i] = model.to(device)
    return held
