"""`ntdist fuse`: fuse member checkpoints into one checkpoint of the same architecture.

How to fuse is given by the `fusion.*` keys of `ntdist run` that make sense for
checkpoints (`KEYS`: the method, the schedule and NT's options), parsed and
checked by the same code as `ntdist run`'s overrides, into a `FusionConfig`
(`fusion_config`); each key also has a flag (`--importance l1` is
`fusion.importance=l1`). The models are rebuilt as `commands.checkpoints` says:
from the specs stored in ntdist's checkpoints, or, for plain state dicts
(safetensors, weights-only torch files, Lightning .ckpt), from `--model NAME
--model-kwargs JSON`. Fusion traces the model on one input whose shape comes from
`--input-shape`, `--data`, the checkpoint, the `--calibration` inputs, or is guessed
(an image batch); a model that does not run on it is refused naming the layer. The
inputs the repair fits on are `--calibration`'s, else those of `--data`
(`commands.calibration` reads and checks them). The output holds the model's
own keys (a strict `load_state_dict` into the user's class works) and ntdist's
metadata in its header, so later commands need no `--model`; it is written only
after fusion succeeded, atomically, so a failure leaves nothing behind. An `-o`
that is a folder (or ends with '/') receives `fused.safetensors`, except for
Hugging Face members, which fuse into a save_pretrained folder (`commands.hfdirs`).
"""

import os
import sys
import time
from dataclasses import replace
from itertools import combinations
from typing import Optional, Tuple

import torch

from ntdist.commands import hfdirs
from ntdist.commands.calibration import data_inputs, read_calibration, read_inputs
from ntdist.commands.checkpoints import ModelSource, example_input, load_checkpoints, usable_device
from ntdist.config import load_keys
from ntdist.distributed.devices import synchronize
from ntdist.errors import UserError
from ntdist.fusion import METHODS, FusionConfig, NTOptions, fuse, reestimate_bn, reestimates_bn
from ntdist.fusion.baselines import batch_norms
from ntdist.models import ModelSpec
from ntdist.models.probe import check_runs
from ntdist.records.checkpoint import save_checkpoint

FUSED_FILE = "fused.safetensors"   # what -o FOLDER/ receives
BN_BATCH = 128                     # inputs per forward pass when BatchNorm statistics are re-estimated
STALE_BN = ("ntdist fuse: warning: the fused model's BatchNorm running statistics are stale (left from the "
            "members); give training inputs with --calibration FILE or --data CONFIG|data.KEY=VALUE to re-estimate "
            "them (fusion.bn_reestimate)")
HINT = "fuse members of one architecture and check --model and --model-kwargs"
# the fusion.* keys that ntdist fuse takes
KEYS = ("methods", "schedule", *NTOptions.names(), "calibration_samples", "bn_reestimate", "ot_mode", "ot_reg")


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


def settle_bn(fused: torch.nn.Module, setting: str, inputs: Optional[torch.Tensor], repaired: bool) -> bool:
    """Re-estimate the BatchNorm statistics of `fused` on `inputs` (None: no data) where `setting`
    (fusion.bn_reestimate) says so; returns whether they were."""
    if inputs is None or not reestimates_bn(setting, fused, repaired):
        return False
    torch.manual_seed(0)   # the passes run in train mode: dropout draws
    device = batch_norms(fused)[0].running_mean.device
    batches = [inputs[i:i + BN_BATCH].to(device) for i in range(0, len(inputs), BN_BATCH)]
    reestimate_bn(fused, batches, len(batches))
    return True


def output_file(output: str) -> str:
    """The file `-o` names: a folder (one that exists, or any path ending with '/') receives FUSED_FILE."""
    if os.path.isdir(output) or output.endswith(("/", os.sep)):
        return os.path.join(output, FUSED_FILE)
    return output


def check_output(output: str, paths, force: bool) -> str:
    """The file to write for `-o output` (`output_file`); UserError unless it is new (or, with `force`,
    replaceable) in a writable folder, or in a folder that -o asks for with a trailing '/' below a writable one."""
    path = output_file(output)
    if os.path.isdir(path):
        raise UserError(f"'{path}' is a folder; choose another -o, or move that folder away")
    if os.path.exists(path) and not force:
        raise UserError(f"'{path}' exists; pass --force to replace it, or choose another -o")
    out_dir = existing = os.path.dirname(os.path.abspath(path))
    if path != output:   # a folder of the user's: created when missing, below its nearest existing parent
        while not os.path.exists(existing) and os.path.dirname(existing) != existing:
            existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise UserError(f"cannot write '{path}': folder '{out_dir}' is missing or not writable")
    if os.path.abspath(path) in {os.path.abspath(p) for p in paths}:
        raise UserError(f"output '{path}' is one of the inputs; choose another file name")
    return path


def identical(models, paths) -> Optional[Tuple[str, str]]:
    """The first two of `paths` whose models hold exactly the same tensors, or None."""
    states = [m.state_dict() for m in models]
    for i, j in combinations(range(len(states)), 2):
        if states[i].keys() == states[j].keys() and all(torch.equal(t, states[j][key]) for key, t in states[i].items()):
            return paths[i], paths[j]
    return None


def fused_info(fusion: FusionConfig, paths) -> dict:
    """What the fused checkpoint records about its making."""
    info = {"stage": "fused", "method": fusion.methods[0], "schedule": fusion.schedule,
            "inputs": [os.path.basename(p) for p in paths]}
    if fusion.dedup:
        info.update(dedup_threshold=fusion.dedup_threshold, dedup_overflow=fusion.dedup_overflow,
                    dedup_criterion=fusion.dedup_criterion)
    return info


def traced_on(spec: ModelSpec, inputs: Optional[str], calibration: Optional[str], calibrate
              ) -> Tuple[torch.Tensor, ModelSpec, bool]:
    """(the inputs the model is traced on, its spec with the input shape they give, whether that shape is a
    guess): the --dedup-inputs file, else the spec's input, else the --calibration inputs, else an image batch."""
    if inputs is not None:
        return read_inputs(inputs), spec, False
    examples, guessed = example_input(spec)
    if guessed and calibration is not None:     # the inputs given say which input the model takes
        return calibrate[:2], replace(spec, input_shape=tuple(calibrate.shape[1:])), False
    return examples, spec, guessed


def shape_hint(spec: ModelSpec, inputs: Optional[str], calibration: Optional[str], guessed: bool) -> str:
    """How to fix inputs the model does not run on: those of --dedup-inputs, --calibration, or the traced ones."""
    taken = f" (one input of shape {list(spec.input_shape)})" if spec.input_shape else ""
    if inputs is not None or calibration is not None:
        flag = f"--dedup-inputs '{inputs}'" if inputs is not None else f"--calibration '{calibration}'"
        return f"{flag} must hold training inputs of the model's input shape{taken}; check --model and --model-kwargs"
    if guessed:
        return ("the checkpoints do not say which input the model takes, so it was traced on an image batch: "
                "give one input's shape with --input-shape (e.g. 1,40) or the data with --data")
    return "check --model, --model-kwargs and the input shape (--input-shape, --data)"


def unused_because(method: str, options: NTOptions) -> str:
    """Why a fusion by `method` with `options` does not repair on the calibration inputs it was given."""
    if options.repair == "none":
        return "fusion.repair=none"
    if method != "nt":
        return f"{method} is repaired only with fusion.repair=lstsq"
    return "dedup and the torch_pruning pruner select differently from plain NT and are not repaired"


def fuse_command(paths, output: str, fusion: FusionConfig, source: ModelSource = ModelSource(), device: str = "cpu",
                 inputs: Optional[str] = None, force: bool = False, calibration: Optional[str] = None) -> str:
    """Fuse the checkpoints `paths` as `fusion` says (its one method, schedule and NT options) into `output`
    (a file, or a folder that receives FUSED_FILE); returns the file written.

    `source` rebuilds the models (--model, --model-kwargs, --data, --input-shape; default: the spec in the
    checkpoints); `inputs` is the `--dedup-inputs` file of the activation criterion; `calibration` the
    `--calibration` inputs the repair fits on (NT's; avg's and ot's with fusion.repair=lstsq); without it, those
    of `--data` (`fusion.calibration_samples` of its training split) are, and they are also what the BatchNorm
    statistics are re-estimated on and, when nothing else says, which input the model is traced on."""
    options = fusion.nt_options()
    if (options.dedup_criterion == "activations") != (inputs is not None):
        raise UserError("fusion.dedup_criterion=activations and --dedup-inputs FILE go together: the activations "
                        "are the units' outputs on those inputs")
    calibrate = read_calibration(calibration, fusion.calibration_samples) if calibration is not None else None
    given = calibrate is not None or bool(source.data)       # --data: its training inputs calibrate too
    options.repairs(given or None, fusion.methods[0])      # repair lstsq without inputs: refused before any work
    if fusion.ot_mode == "activations" and not given:
        raise UserError("fusion.ot_mode=activations compares units' outputs on inputs: give a few hundred training "
                        "inputs with --calibration FILE or --data CONFIG|data.KEY=VALUE")
    folder = hfdirs.writes_folder(output, paths, source.model)
    output = hfdirs.check_folder(output, paths, force) if folder else check_output(output, paths, force)
    dev = usable_device(device)
    splits = source.splits("fuse")
    spec = source.spec(paths, splits)
    models = [m.eval().to(dev) for m in load_checkpoints(paths, spec, HINT)]
    if calibrate is None and splits is not None:
        calibrate = data_inputs(splits, fusion.calibration_samples)
    if fusion.bn_reestimate == "on" and calibrate is None and batch_norms(models[0]):
        raise UserError("fusion.bn_reestimate=on needs training inputs: give --calibration FILE or --data "
                        "CONFIG|data.KEY=VALUE, or set fusion.bn_reestimate auto or off")
    resized = options.width is not None or options.keep_ratio is not None
    if resized and spec.name != "mlp":
        raise UserError(f"fusion.width and fusion.keep_ratio change the architecture, and a resized {spec.name} "
                        "cannot be rebuilt from its spec; use the Python API fuse(models, width=...) for it")
    examples, traced, guessed = traced_on(spec, inputs, calibration, calibrate)
    check_runs(models[0], examples[:2].to(dev), spec.name, shape_hint(spec, inputs, calibration, guessed))
    if calibration is not None:
        check_runs(models[0], calibrate[:2].to(dev), spec.name, shape_hint(spec, None, calibration, False))
    spec = traced     # with the input shape the calibration inputs gave, where nothing else said
    method = fusion.methods[0]
    twins = identical(models, paths)
    if twins and method == "nt" and not fusion.dedup:
        print(f"ntdist fuse: warning: '{twins[0]}' and '{twins[1]}' are identical members (the same weights); NT "
              "keeps each of their units twice instead of the ensemble's: fuse members trained apart, or add "
              "--dedup to merge the copies", file=sys.stderr)
    start = time.perf_counter()
    notes = []      # the layers the repair left as they were, printed below
    repairs = calibrate is not None and options.repairs(calibrate, method)
    extra = dict(calibration=calibrate.to(dev), notes=notes) if repairs else {}
    if method == "ot":
        extra.update(ot_mode=fusion.ot_mode, ot_reg=fusion.ot_reg)
        examples = calibrate if fusion.ot_mode == "activations" else examples
    fused = fuse(models, method, fusion.schedule, options=options, example_inputs=examples.to(dev), **extra)
    synchronize(dev)   # on a GPU the kernels may still run: the time is the work's, not its launch's
    seconds = time.perf_counter() - start
    renormed = settle_bn(fused, fusion.bn_reestimate, calibrate, repairs)
    if resized:
        first = next(m for m in fused.modules() if isinstance(m, torch.nn.Linear))
        spec = ModelSpec(spec.name, dict(spec.kwargs, width=first.out_features), spec.input_shape)
    if guessed:
        spec = replace(spec, input_shape=None)   # a guess that ran is no fact to store
    if folder:
        hfdirs.save_folder(fused.cpu(), output)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)   # -o a new folder: now that it worked
        save_checkpoint(output, fused.cpu(), spec, info=fused_info(fusion, paths))
    repaired = f", repaired on {len(calibrate)} inputs" if repairs else ""
    repaired += f", BatchNorm statistics re-estimated on {len(calibrate)} inputs" if renormed else ""
    print(f"fused {len(models)} models with {method} ({fusion.schedule}{repaired}) on {dev} in {seconds:.3f} s "
          f"-> {output}")
    for note in notes:
        print(f"ntdist fuse: note: {note}", file=sys.stderr)
    if calibrate is None and batch_norms(fused) and fusion.bn_reestimate != "off":
        print(STALE_BN, file=sys.stderr)
    elif method == "nt" and calibrate is None and options.repair == "auto" and options.repairs(True):
        print("ntdist fuse: note: NT keeps far more of the ensemble when repaired on a few thousand training "
              "inputs: add --calibration FILE or --data (docs/FUSION.md, 'Repair')", file=sys.stderr)
    elif calibration is not None and not (repairs or renormed or fusion.ot_mode == "activations"):
        print(f"ntdist fuse: note: the --calibration inputs were not used for a repair: {unused_because(method, options)}",
              file=sys.stderr)
    return output
