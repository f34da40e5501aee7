"""`ntdist fuse` into a Hugging Face folder: config.json and model.safetensors, as `save_pretrained` writes them.

The fused model is written as such a folder when the members are Hugging Face
folders (`hf:DIR`, or `--model hf:DIR`) and `-o` does not name a `.safetensors`
file; `-o fused.safetensors` still writes one ntdist checkpoint. The config is
the first member's (NT keeps its widths), so `AutoModelFor...from_pretrained(OUT)`
or the config's own class loads the result. The folder is written beside the
target first and moved into place only once complete; `--force` replaces the
model files of a folder that is not empty (config.json, the weights and their
shard index), and nothing else in it.
"""

import os
import shutil
import tempfile
from typing import Optional, Sequence

import torch

from ntdist.errors import UserError
from ntdist.models import hf

CHECKPOINT_SUFFIX = ".safetensors"   # an -o with it names one file, not a folder


def writes_folder(output: str, paths: Sequence[str], model: Optional[str]) -> bool:
    """Whether `ntdist fuse` writes a Hugging Face folder: members (or --model) are HF folders and `output`
    names no .safetensors file."""
    return hf.is_hf(model or paths[0]) and not output.endswith(CHECKPOINT_SUFFIX)


def check_folder(output: str, paths: Sequence[str], force: bool) -> str:
    """The folder to write for `-o output`; UserError unless it is new, empty or (with `force`) replaceable, in
    a writable folder, and none of the inputs."""
    out = os.path.abspath(output)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"-o '{output}' is a file, and Hugging Face members fuse into a folder; choose a new "
                        f"folder, or end -o with {CHECKPOINT_SUFFIX} for one ntdist checkpoint")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise UserError(f"folder '{output}' is not empty; pass --force to replace its model files, or choose "
                        "a new -o")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UserError(f"cannot write folder '{output}': '{parent}' is missing or not writable")
    inputs = {os.path.abspath(hf.folder(p, "checkpoint") if hf.is_hf(p) else p) for p in paths}
    if out in inputs:
        raise UserError(f"output '{output}' is one of the inputs; choose another folder")
    return output


def _model_files(path: str):
    """The files of a Hugging Face folder that a new model replaces."""
    return [name for name in os.listdir(path) if name == hf.CONFIG_FILE or
            (name.startswith("model") and ".safetensors" in name)]


def install_folder(staged: str, output: str) -> None:
    """Move the complete folder `staged` to `output`: renamed when `output` is new or empty, else its model
    files replaced by the staged ones."""
    if os.path.isdir(output) and os.listdir(output):
        for name in _model_files(output):
            os.remove(os.path.join(output, name))
        for name in os.listdir(staged):
            os.replace(os.path.join(staged, name), os.path.join(output, name))
        os.rmdir(staged)
        return
    if os.path.isdir(output):
        os.rmdir(output)
    os.replace(staged, output)


def staging(output: str) -> str:
    """A new hidden folder beside `output`, on the same file system, to write into before moving."""
    return tempfile.mkdtemp(prefix=".ntdist-", dir=os.path.dirname(os.path.abspath(output)))


def save_folder(model: torch.nn.Module, output: str) -> None:
    """Write `model` (a Hugging Face class, as `models.hf` builds them) as a save_pretrained folder."""
    hf.transformers().utils.logging.disable_progress_bar()   # one line per fused model, as for checkpoints
    staged = staging(output)
    try:
        model.save_pretrained(staged)
        install_folder(staged, output)
    finally:
        if os.path.isdir(staged):
            shutil.rmtree(staged)
