"""`ntdist fuse`: fuse member checkpoints into one checkpoint of the same architecture.

How to fuse is given by the `fusion.*` keys of `ntdist run` that make sense for
checkpoints (`KEYS`: the method, the schedule and NT's options), parsed and
checked by the same code as `ntdist run`'s overrides, into a `FusionConfig`
(`fusion_config`); each key also has a flag (`--importance l1` is
`fusion.importance=l1`). The models are rebuilt from the specs stored in
ntdist's checkpoints, or, for plain state dicts (safetensors or weights-only
torch files, e.g. from another training script), from `--model NAME
--model-kwargs JSON`. The output is an ntdist checkpoint (it carries the spec,
so later commands need no `--model`), written only after fusion succeeded,
atomically, so a failure leaves nothing behind.
"""

import json
import os
import sys
import time
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open

from ntdist.config import load_keys
from ntdist.distributed.devices import synchronize
from ntdist.errors import UserError
from ntdist.fusion import METHODS, FusionConfig, NTOptions, fuse
from ntdist.models import ModelSpec
from ntdist.models.weights import read_state_dict
from ntdist.options import import_callable, is_import_path
from ntdist.records.checkpoint import load_model, save_checkpoint


def example_input(spec: ModelSpec) -> torch.Tensor:
    """A dummy batch with the input shape the spec describes (used to trace the data flow)."""
    kw = spec.kwargs
    if "input_dim" in kw:
        return torch.zeros(2, kw["input_dim"])
    channels = kw.get("in_channels", 3)
    size = kw.get("image_size", 32)
    return torch.zeros(2, channels, size, size)


KEYS = ("methods", "schedule", *NTOptions.names(), "calibration_samples")   # the fusion.* keys that ntdist fuse takes


def flag(key: str) -> str:
    """The flag that stands for `fusion.<key>` (--method for the one method of fusion.methods)."""
    return "--method" if key == "methods" else "--" + key.replace("_", "-")


def fusion_config(paths, overrides) -> FusionConfig:
    """The `fusion:` section of dotted `fusion.*` overrides, checked as `ntdist run` checks them, with
    fusion.k the number of checkpoints."""
    if len(paths) < 2:
        raise UserError(f"fusion needs at least 2 checkpoints, got {len(paths)}")
    fusion = load_keys(overrides, [f"fusion.{key}" for key in KEYS], "fuse", [f"fusion.k={len(paths)}"]).fusion
    if len(fusion.methods) != 1:
        raise UserError(f"ntdist fuse fuses with one method, got fusion.methods {fusion.methods}; give one "
                        f"(--method {' | '.join(METHODS)})")
    return fusion


def model_spec(model: Optional[str], model_kwargs: Optional[str]) -> Optional[ModelSpec]:
    """The spec of `--model NAME --model-kwargs JSON`, or None to use the one stored in the checkpoints."""
    if model is None:
        if model_kwargs:
            raise UserError("--model-kwargs needs --model (the checkpoints' own spec already holds its kwargs)")
        return None
    return ModelSpec(model, parse_model_kwargs(model_kwargs))


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


def read_inputs(path: str, flag: str = "--dedup-inputs") -> torch.Tensor:
    """A batch of inputs saved with torch.save (one floating-point tensor, at least 2 rows)."""
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError) as err:
        raise UserError(f"{flag} '{path}' is not a readable torch file ({str(err).splitlines()[0]})") from None
    return checked_inputs(value, f"{flag} '{path}'")


def checked_inputs(value, what: str) -> torch.Tensor:
    """`value` if it is a floating-point tensor of at least 2 finite inputs, else a UserError naming `what`."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() < 2 or len(value) < 2:
        raise UserError(f"{what} must hold one floating-point tensor of at least 2 inputs, e.g. "
                        "torch.save(x[:2000], path)")
    if not torch.isfinite(value).all():
        raise UserError(f"{what} holds NaN or infinite values; give finite inputs")
    return value


def read_calibration(source: str, count: int) -> torch.Tensor:
    """`--calibration`: a torch file with one tensor of inputs, or `package.module:callable` returning such a
    tensor, a dataset of (input, label) pairs, or (train, val, test) datasets (train is used); at most
    `count` inputs (fusion.calibration_samples), drawn with seed 0."""
    if not is_import_path(source):
        inputs = read_inputs(source, "--calibration")
        return inputs[torch.randperm(len(inputs), generator=torch.Generator().manual_seed(0))[:count].sort().values]
    try:
        value = import_callable(source, "--calibration")()
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's code: one line naming it
        raise UserError(f"--calibration '{source}' raised {type(err).__name__}: {err}") from None
    if isinstance(value, (tuple, list)) and len(value) == 3 and not isinstance(value[0], torch.Tensor):
        value = value[0]
    if not isinstance(value, torch.Tensor):
        try:
            picked = torch.randperm(len(value), generator=torch.Generator().manual_seed(0))[:count].sort().values
            value = torch.stack([torch.as_tensor(value[int(i)][0]) for i in picked])
        except (TypeError, IndexError, RuntimeError) as err:
            raise UserError(f"--calibration '{source}' must return a tensor of inputs or a dataset of (input, "
                            f"label) pairs ({type(err).__name__}: {err})") from None
    return checked_inputs(value[:count], f"--calibration '{source}'")


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


def load_members(paths, spec: Optional[ModelSpec]):
    """(models, spec): built from `spec` when given, else from the spec in the first checkpoint."""
    if spec is not None:
        return [load_with_spec(p, spec) for p in paths], spec
    if not _has_spec(paths[0]):
        raise UserError(f"'{paths[0]}' is a plain state dict without a model spec; pass --model NAME "
                        "(e.g. torchvision:resnet18) and --model-kwargs JSON to rebuild it")
    loaded = [load_model(paths[0])]
    spec = ModelSpec.from_dict(loaded[0][1]["model"])
    return [loaded[0][0]] + [load_with_spec(p, spec) for p in paths[1:]], spec


def check_output(output: str, paths, force: bool) -> None:
    """UserError unless `output` is a new (or, with `force`, replaceable) file in a writable folder."""
    if os.path.isdir(output):
        raise UserError(f"-o '{output}' is a folder; give the file name of the fused checkpoint")
    if os.path.exists(output) and not force:
        raise UserError(f"'{output}' exists; pass --force to replace it, or choose another -o")
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        raise UserError(f"cannot write '{output}': folder '{out_dir}' is missing or not writable")
    if os.path.abspath(output) in {os.path.abspath(p) for p in paths}:
        raise UserError(f"output '{output}' is one of the inputs; choose another file name")


def usable_device(device: str) -> torch.device:
    """`--device` as a torch.device on which a tensor can be made."""
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as err:
        raise UserError(f"--device {device} is not usable here ({str(err).splitlines()[0]}); use cpu or cuda") from None
    return dev


def fused_info(fusion: FusionConfig, paths) -> dict:
    """What the fused checkpoint records about its making."""
    info = {"stage": "fused", "method": fusion.methods[0], "schedule": fusion.schedule,
            "inputs": [os.path.basename(p) for p in paths]}
    if fusion.dedup:
        info.update(dedup_threshold=fusion.dedup_threshold, dedup_overflow=fusion.dedup_overflow,
                    dedup_criterion=fusion.dedup_criterion)
    return info


def fuse_command(paths, output: str, fusion: FusionConfig, spec: Optional[ModelSpec] = None, device: str = "cpu",
                 inputs: Optional[str] = None, force: bool = False, calibration: Optional[str] = None) -> str:
    """Fuse the checkpoints `paths` as `fusion` says (its one method, schedule and NT options) into `output`.

    `spec` rebuilds plain state dicts (default: the spec in the checkpoints); `inputs` is the
    `--dedup-inputs` file of the activation criterion; `calibration` the `--calibration` inputs NT's
    repair fits on."""
    options = fusion.nt_options()
    if (options.dedup_criterion == "activations") != (inputs is not None):
        raise UserError("fusion.dedup_criterion=activations and --dedup-inputs FILE go together: the activations "
                        "are the units' outputs on those inputs")
    calibrate = read_calibration(calibration, fusion.calibration_samples) if calibration is not None else None
    if fusion.methods[0] == "nt":
        options.repairs(calibrate)      # repair lstsq without --calibration: refused before any work
    check_output(output, paths, force)
    dev = usable_device(device)
    models, spec = load_members(paths, spec)
    models = [m.eval().to(dev) for m in models]
    resized = options.width is not None or options.keep_ratio is not None
    if resized and spec.name != "mlp":
        raise UserError(f"fusion.width and fusion.keep_ratio change the architecture, and a resized {spec.name} "
                        "cannot be rebuilt from its spec; use the Python API fuse(models, width=...) for it")
    examples = example_input(spec) if inputs is None else read_inputs(inputs)
    method = fusion.methods[0]
    start = time.perf_counter()
    extra = dict(calibration=calibrate.to(dev)) if calibrate is not None and method == "nt" else {}
    fused = fuse(models, method, fusion.schedule, options=options, example_inputs=examples.to(dev), **extra)
    synchronize(dev)   # on a GPU the kernels may still run: the time is the work's, not its launch's
    seconds = time.perf_counter() - start
    if resized:
        first = next(m for m in fused.modules() if isinstance(m, torch.nn.Linear))
        spec = ModelSpec(spec.name, dict(spec.kwargs, width=first.out_features))
    save_checkpoint(output, fused.cpu(), spec, info=fused_info(fusion, paths))
    repaired = f", repaired on {len(calibrate)} inputs" if extra and options.repairs(calibrate) else ""
    print(f"fused {len(models)} models with {method} ({fusion.schedule}{repaired}) on {dev} in {seconds:.3f} s "
          f"-> {output}")
    if method == "nt" and calibrate is None and options.repair == "auto" and options.repairs(True):
        print("ntdist fuse: note: NT keeps far more of the ensemble when repaired on a few thousand training "
              "inputs: add --calibration FILE (docs/FUSION.md, 'Repair')", file=sys.stderr)
    return output
