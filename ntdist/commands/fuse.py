"""`ntdist fuse`: fuse member checkpoints into one checkpoint of the same architecture.

The models are rebuilt from the specs stored in the checkpoints; the output is
written only after fusion succeeded, atomically, so a failure leaves nothing behind.
"""

import os
import time

import torch

from ntdist.errors import UserError
from ntdist.fusion import fuse
from ntdist.models import ModelSpec
from ntdist.records.checkpoint import load_model, save_checkpoint


def example_input(spec: ModelSpec) -> torch.Tensor:
    """A dummy batch with the input shape the spec describes (used to trace the data flow)."""
    kw = spec.kwargs
    if "input_dim" in kw:
        return torch.zeros(2, kw["input_dim"])
    channels = kw.get("in_channels", 3)
    size = kw.get("image_size", 32)
    return torch.zeros(2, channels, size, size)


def fuse_command(paths, output: str, method: str = "nt", schedule: str = "recursive", importance: str = "l2",
                 order: str = "merge_prune", width=None, keep_ratio=None, force: bool = False) -> str:
    if len(paths) < 2:
        raise UserError(f"fusion needs at least 2 checkpoints, got {len(paths)}")
    if width is not None and width < 1:
        raise UserError(f"--width must be a positive number of units, got {width}")
    if keep_ratio is not None and not 0 < keep_ratio <= len(paths):
        raise UserError(f"--keep-ratio must be in (0, {len(paths)}] for {len(paths)} checkpoints, got {keep_ratio}")
    if os.path.isdir(output):
        raise UserError(f"-o '{output}' is a folder; give the file name of the fused checkpoint")
    if os.path.exists(output) and not force:
        raise UserError(f"'{output}' exists; pass --force to replace it, or choose another -o")
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        raise UserError(f"cannot write '{output}': folder '{out_dir}' is missing or not writable")
    if os.path.abspath(output) in {os.path.abspath(p) for p in paths}:
        raise UserError(f"output '{output}' is one of the inputs; choose another file name")
    loaded = [load_model(p) for p in paths]
    models = [m.eval() for m, _ in loaded]
    spec = ModelSpec.from_dict(loaded[0][1]["model"])   # checked by load_model
    resized = width is not None or keep_ratio is not None
    if resized and spec.name != "mlp":
        raise UserError(f"--width/--keep-ratio change the architecture, and a resized {spec.name} cannot be "
                        "rebuilt from its spec; use the Python API fuse(models, width=...) for it")
    start = time.perf_counter()
    fused = fuse(models, method=method, schedule=schedule, importance=importance, order=order, width=width,
                 keep_ratio=keep_ratio, example_inputs=example_input(spec))
    seconds = time.perf_counter() - start
    if resized:
        first = next(m for m in fused.modules() if isinstance(m, torch.nn.Linear))
        spec = ModelSpec(spec.name, dict(spec.kwargs, width=first.out_features))
    save_checkpoint(output, fused, spec, info={"stage": "fused", "method": method, "schedule": schedule,
                                               "inputs": [os.path.basename(p) for p in paths]})
    print(f"fused {len(models)} models with {method} ({schedule}) in {seconds:.3f} s -> {output}")
    return output
