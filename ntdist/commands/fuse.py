"""`ntdist fuse`: fuse member checkpoints into one checkpoint of the same architecture.

The models are rebuilt from the specs stored in ntdist's checkpoints, or, for
plain state dicts (safetensors or weights-only torch files, e.g. from another
training script), from `--model NAME --model-kwargs JSON`. The output is an
ntdist checkpoint (it carries the spec, so later commands need no `--model`),
written only after fusion succeeded, atomically, so a failure leaves nothing behind.
"""

import json
import os
import time
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open

from ntdist.errors import UserError
from ntdist.fusion import DEFAULT_IMPORTANCE, DEFAULT_PRUNER, fuse
from ntdist.fusion.options import NTOptions
from ntdist.models import ModelSpec
from ntdist.models.weights import read_state_dict
from ntdist.records.checkpoint import load_model, save_checkpoint


def example_input(spec: ModelSpec) -> torch.Tensor:
    """A dummy batch with the input shape the spec describes (used to trace the data flow)."""
    kw = spec.kwargs
    if "input_dim" in kw:
        return torch.zeros(2, kw["input_dim"])
    channels = kw.get("in_channels", 3)
    size = kw.get("image_size", 32)
    return torch.zeros(2, channels, size, size)


def parse_model_kwargs(text: Optional[str]) -> dict:
    """`--model-kwargs` as a dict: a JSON object such as '{"num_classes": 10}'."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as err:
        raise UserError(f"--model-kwargs is not valid JSON ({err}); write e.g. '{{\"num_classes\": 10}}'") from None
    if not isinstance(value, dict):
        raise UserError(f"--model-kwargs must be a JSON object such as '{{\"num_classes\": 10}}', got {text}")
    return value


def read_inputs(path: str) -> torch.Tensor:
    """`--dedup-inputs`: a batch of inputs saved with torch.save (one floating-point tensor, at least 2 rows)."""
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError) as err:
        raise UserError(f"--dedup-inputs '{path}' is not a readable torch file ({str(err).splitlines()[0]})") from None
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() < 2 or len(value) < 2:
        raise UserError(f"--dedup-inputs '{path}' must hold one floating-point tensor of at least 2 inputs "
                        "(torch.save(x[:256], path))")
    return value


def load_with_spec(path: str, spec: ModelSpec) -> torch.nn.Module:
    """Build `spec` and load the state dict of `path` (an ntdist checkpoint or a plain one) into it, strictly."""
    model = spec.build()
    state = read_state_dict(path)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    kinds = [k for k in own if k in state and state[k].is_floating_point() != own[k].is_floating_point()]
    if missing or unexpected or wrong or kinds:
        detail = (f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected else
                  f"'{wrong[0]}' has shape {list(state[wrong[0]].shape)}, the model {list(own[wrong[0]].shape)}"
                  if wrong else f"'{kinds[0]}' is stored as {state[kinds[0]].dtype}, the model holds "
                  f"{own[kinds[0]].dtype}")
        raise UserError(f"'{path}' does not fit {spec.name} {spec.kwargs} ({detail}); fuse members of one "
                        "architecture and check --model and --model-kwargs")
    model.load_state_dict(state)
    return model


def _has_spec(path: str) -> bool:
    """Whether `path` is a safetensors file with ntdist's metadata (a missing file counts as one: load_model
    then says it is missing)."""
    if not os.path.isfile(path):
        return True
    try:
        with safe_open(path, framework="pt") as f:
            return "ntdist" in (f.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        # a torch file is a plain state dict; anything else gets load_model's "not a readable checkpoint"
        return not path.endswith((".pt", ".pth", ".bin"))


def load_members(paths, model: Optional[str], model_kwargs: dict):
    """(models, spec): from `--model` when given, else from the spec in the first checkpoint."""
    if model is not None:
        spec = ModelSpec(model, model_kwargs)
        return [load_with_spec(p, spec) for p in paths], spec
    if model_kwargs:
        raise UserError("--model-kwargs needs --model (the checkpoints' own spec already holds its kwargs)")
    if not _has_spec(paths[0]):
        raise UserError(f"'{paths[0]}' is a plain state dict without a model spec; pass --model NAME "
                        "(e.g. torchvision:resnet18) and --model-kwargs JSON to rebuild it")
    loaded = [load_model(paths[0])]
    spec = ModelSpec.from_dict(loaded[0][1]["model"])
    return [loaded[0][0]] + [load_with_spec(p, spec) for p in paths[1:]], spec


def fuse_command(paths, output: str, method: str = "nt", schedule: str = "recursive",
                 importance: str = DEFAULT_IMPORTANCE, order: str = "merge_prune", width=None, keep_ratio=None,
                 force: bool = False, pruner: str = DEFAULT_PRUNER,
                 model: Optional[str] = None, model_kwargs: Optional[str] = None, device: str = "cpu",
                 dedup: bool = False, dedup_threshold: Optional[float] = None,
                 dedup_overflow: Optional[str] = None, dedup_criterion: Optional[str] = None,
                 dedup_inputs: Optional[str] = None) -> str:
    if len(paths) < 2:
        raise UserError(f"fusion needs at least 2 checkpoints, got {len(paths)}")
    given = [flag for flag, value in (("--dedup-threshold", dedup_threshold), ("--dedup-overflow", dedup_overflow),
                                      ("--dedup-criterion", dedup_criterion)) if value is not None]
    if given and not dedup:
        raise UserError(f"{given[0]} only applies with --dedup; add --dedup or leave it out")
    if dedup and method != "nt":
        raise UserError(f"--dedup belongs to NT (--method nt); {method} keeps the members' width and merges nothing")
    if (dedup_criterion == "activations") != (dedup_inputs is not None):
        raise UserError("--dedup-criterion activations and --dedup-inputs FILE go together: the activations "
                        "are the units' outputs on those inputs")
    dedup_args = dict(dedup=dedup, dedup_overflow=dedup_overflow or "drop",
                      dedup_criterion=dedup_criterion or "weights")
    if dedup_threshold is not None:
        dedup_args["dedup_threshold"] = dedup_threshold
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
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as err:
        raise UserError(f"--device {device} is not usable here ({str(err).splitlines()[0]}); use cpu or cuda") from None
    models, spec = load_members(paths, model, parse_model_kwargs(model_kwargs))
    models = [m.eval().to(dev) for m in models]
    resized = width is not None or keep_ratio is not None
    if resized and spec.name != "mlp":
        raise UserError(f"--width/--keep-ratio change the architecture, and a resized {spec.name} cannot be "
                        "rebuilt from its spec; use the Python API fuse(models, width=...) for it")
    examples = example_input(spec) if dedup_inputs is None else read_inputs(dedup_inputs)
    start = time.perf_counter()
    fused = fuse(models, method=method, schedule=schedule, importance=importance, order=order, width=width,
                 keep_ratio=keep_ratio, example_inputs=examples.to(dev),
                  pruner=pruner, **(dedup_args if method == "nt" else {}))
    seconds = time.perf_counter() - start
    if resized:
        first = next(m for m in fused.modules() if isinstance(m, torch.nn.Linear))
        spec = ModelSpec(spec.name, dict(spec.kwargs, width=first.out_features))
    info = {"stage": "fused", "method": method, "schedule": schedule, "inputs": [os.path.basename(p) for p in paths]}
    if dedup:
        info.update(dedup_threshold=dedup_args.get("dedup_threshold", NTOptions.default("dedup_threshold")),
                    dedup_overflow=dedup_args["dedup_overflow"], dedup_criterion=dedup_args["dedup_criterion"])
    save_checkpoint(output, fused.cpu(), spec, info=info)
    print(f"fused {len(models)} models with {method} ({schedule}) on {dev} in {seconds:.3f} s -> {output}")
    return output
