"""`ntdist fuse --lazy`: fuse members larger than memory, reading and writing one tensor at a time.

NT never needs the concatenated model: each channel space's choice needs the
rows (and, for group_l2, the columns) that produce (and consume) that space,
and each fused tensor needs only the members' tensors of its name. So the
members stay on disk (`records.tensorfile`); the model is traced on the meta
device (no weights); each space's scores are computed member by member from
the tensors that touch it; and each fused tensor is assembled from the members'
tensors of its name, read one member at a time, and written at once. Peak memory
is about one fused tensor plus two members' tensors of that name (the largest
tensor sets it) plus the largest space's tensors of one member, whatever the
members' total size. The result is bit for bit what `ntdist fuse` writes.

Lazy fusion covers what works tensor by tensor: `avg`, and `nt` with a
magnitude importance (merge_prune, the members' width, no repair, no dedup,
ntdist's pruner, no grouped convolution). Anything else needs the whole models
and is refused with one line. `--lazy` is asked for, never chosen automatically:
the eager path is faster whenever the models fit in memory.
"""

import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Dict, List

import torch

from ntdist.commands import hfdirs
from ntdist.commands.checkpoints import ModelSource, example_input, parse_input_shape
from ntdist.commands.fuse import HINT, check_output, fused_info
from ntdist.errors import UserError
from ntdist.fusion import FusionConfig
from ntdist.fusion.analysis.graph import analyze
from ntdist.fusion.baselines import averaged_tensor
from ntdist.fusion.checks import check_weights, normalized
from ntdist.fusion.pruning.importance import resolve, space_views
from ntdist.fusion.pruning.select import ranked_scores, targets, top
from ntdist.fusion.wide.assemble import Selection, assembled_tensor
from ntdist.models import ModelSpec, hf
from ntdist.models.statedict import META_KEY, first_difference, unwrap
from ntdist.options import is_import_path
from ntdist.records.checkpoint import checkpoint_metadata, file_spec
from ntdist.records.tensorfile import TensorFile, open_files, write_tensors

METHODS = ("nt", "avg")   # the methods that work tensor by tensor
LEAVE = "it needs the whole models in memory; leave out --lazy"   # the end of every refusal


class Member:
    """One member on disk: each of the model's keys -> (its file, its name there)."""

    def __init__(self, path: str, template: torch.nn.Module, target: str):
        self.path = path
        own = template.state_dict()
        if hf.is_hf(path):
            index = open_files(hf.weight_files(hf.folder(path, "checkpoint")))
        elif path.endswith(".safetensors") and os.path.isfile(path):
            index = _checkpoint_keys(path)
        else:
            raise UserError(f"--lazy reads .safetensors files and Hugging Face folders, not '{path}'; convert it "
                            "with safetensors.torch.save_file(torch.load(path), 'member.safetensors')")
        self.stored = unwrap(index, own)                # the tensors the files hold, under the model's keys
        self.index = hf.with_tied(self.stored, template) if hf.is_hf(path) else self.stored
        problem = first_difference({k: tf.meta(name) for k, (tf, name) in self.index.items()}, own)
        if problem is not None:
            raise UserError(f"'{path}' does not fit {target} ({problem}); {HINT}")
        self.dtypes = {k: v.dtype for k, v in own.items()}

    def meta(self, key: str) -> torch.Tensor:
        tf, name = self.index[key]
        return tf.meta(name)

    def load(self, key: str, number: int) -> torch.Tensor:
        """The tensor `key`, read from disk in the model's dtype; a UserError if it holds NaN or inf."""
        tf, name = self.index[key]
        t = tf.read(name).to(self.dtypes[key])
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"model {number} has NaN or inf values in '{key}'; fuse trained, finite models")
        return t


def _checkpoint_keys(path: str) -> dict:
    """The model tensors of a safetensors file: an ntdist checkpoint's (either format, extras left out) or all."""
    tf = TensorFile(path)
    meta = _ntdist_meta(tf)
    names = list(tf.entries)
    if meta is not None:
        if meta.get("format", 1) == 1:
            return {n[len("model."):]: (tf, n) for n in names if n.startswith("model.")}
        names = [n for n in names if n not in set(meta.get("extra") or ())]
    return {n: (tf, n) for n in names}


def _ntdist_meta(tf: TensorFile):
    """ntdist's metadata of a file (a dict), None for a plain file; UserError when it is not readable."""
    raw = tf.metadata.get(META_KEY)
    try:
        meta = None if raw is None else json.loads(raw)
        if meta is not None and not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except ValueError:
        raise UserError(f"'{tf.path}' has corrupt ntdist metadata; the file was not written by this version of "
                        "ntdist") from None
    return meta


class Loaded(Sequence):
    """The members' tensors of one key, each read from disk when asked for (only the last one kept)."""

    def __init__(self, members: List[Member], key: str, first: int = 0):
        self.members, self.key, self.first, self.last = members, key, first, (None, None)

    def __len__(self):
        return len(self.members)

    def __getitem__(self, i):
        if isinstance(i, slice):
            start = range(len(self.members))[i].start if len(self.members) else 0
            return Loaded(self.members[i], self.key, self.first + start)
        i = range(len(self.members))[i]
        if self.last[0] != i:
            self.last = (None, None)   # drop the previous tensor before reading the next
            self.last = (i, self.members[i].load(self.key, self.first + i))
        return self.last[1]


def lazy_spec(paths: Sequence[str], source: ModelSource) -> ModelSpec:
    """The spec that rebuilds the members, read from headers only (no member is loaded)."""
    if source.model is not None or hf.is_hf(paths[0]):
        return source.spec(paths, source.splits("fuse"))
    meta = _ntdist_meta(TensorFile(paths[0])) if paths[0].endswith(".safetensors") else None
    if meta is None:
        raise UserError(f"'{paths[0]}' is a plain state dict without a model spec; pass --model NAME and "
                        "--model-kwargs JSON to rebuild it")
    spec = file_spec(paths[0], meta)
    if is_import_path(spec.name):
        raise UserError(f"'{paths[0]}' names the model '{spec.name}', code that ntdist runs only when you name it "
                        f"yourself: pass --model {spec.name} (and --model-kwargs) if you trust it")
    shape = parse_input_shape(source.input_shape)
    return spec if shape is None else replace(spec, input_shape=shape)


def check_lazy(fusion: FusionConfig, count: int, calibration, inputs) -> None:
    """UserError for every option that lazy fusion cannot honour."""
    method, options = fusion.methods[0], fusion.nt_options()
    if method not in METHODS:
        raise UserError(f"--lazy fuses with {' or '.join(METHODS)}, not {method}: {LEAVE}")
    if count > 2 and fusion.schedule != "flat":
        raise UserError(f"--lazy fuses all {count} members at once: pass --schedule flat (the {fusion.schedule} "
                        "schedule keeps intermediate models in memory)")
    if method == "avg":
        return
    refused = [("--calibration (repair)", calibration is not None or options.repair == "lstsq"),
               ("fusion.dedup", options.dedup or inputs is not None),
               ("fusion.order=prune_merge", options.order != "merge_prune"),
               (f"fusion.pruner={options.pruner}", options.pruner != "ntdist"),
               ("fusion.width / fusion.keep_ratio", options.width is not None or options.keep_ratio is not None)]
    for what, given in refused:
        if given:
            raise UserError(f"--lazy cannot fuse with {what}: {LEAVE} or drop it")


def lazy_keep(members: List[Member], plan, importance, want: Dict[int, int], w, sizes) -> dict:
    """NT's choice of units per space (what `fusion.pruning.select` returns), one space and member at a time."""
    totals = {s: sum(sz[s] for sz in sizes) for s in plan.sizes}
    if all(want[s] >= totals[s] for s in plan.sizes):
        return {}
    fn, keep = resolve(importance), {}
    probes = {name for name, _, _ in plan.probe.values()}
    for s in plan.order:
        if want[s] >= totals[s]:
            keep[s] = None
            continue
        names = [n for n, spec in plan.tensors.items() if spec.role in ("layer", "output") and spec.dims and
                 any(lay is not None and any(d.space == s for d in lay) for lay in spec.dims[:2])]
        sub = replace(plan, tensors={n: plan.tensors[n] for n in names})
        scores = []
        for m, member in enumerate(members):
            tensors = {n: member.meta(n) for n in probes}   # their shapes give the spaces' sizes
            tensors.update((n, member.load(n, m)) for n in names)
            score = fn(space_views(tensors, sub, w[m])[s]).reshape(-1)
            if score.shape[0] != sizes[m][s]:
                raise UserError(f"importance returned {score.shape[0]} scores for a layer of {sizes[m][s]} units")
            scores.append(score.double())
            del tensors
        keep[s] = top(ranked_scores(scores, []), want[s])
    return keep


def lazy_fuse(paths, output: str, fusion: FusionConfig, source: ModelSource = ModelSource(), force: bool = False,
              inputs=None, calibration=None) -> str:
    """Fuse the checkpoints `paths` into `output` tensor by tensor (see the module's docstring); returns the
    path written."""
    check_lazy(fusion, len(paths), calibration, inputs)
    folder = hfdirs.writes_folder(output, paths, source.model)
    output = hfdirs.check_folder(output, paths, force) if folder else check_output(output, paths, force)
    spec = lazy_spec(paths, source)
    with torch.device("meta"):
        template = spec.build()
    members = [Member(p, template, f"{spec.name} {spec.kwargs}") for p in paths]
    method, options = fusion.methods[0], fusion.nt_options()
    w = normalized(check_weights(None, len(members)))
    start = time.perf_counter()
    keys = list(members[0].stored)
    shapes = {k: tuple(members[0].meta(k).shape) for k in keys}
    if method == "avg":
        def produce(key):
            return averaged_tensor(key, Loaded(members, key), w)
    else:
        plan = analyze(template, example_input(spec)[0].to("meta"))
        if plan.coupled:
            raise UserError(f"--lazy cannot fuse grouped convolutions (layer '{plan.coupled[0][2]}'): {LEAVE}")
        missing = [k for k in keys if k not in plan.tensors]
        if missing:
            raise UserError(f"--lazy: the channel analysis does not cover '{missing[0]}': {LEAVE}")
        sizes = [plan.space_sizes({n: m.meta(n) for n, _, _ in plan.probe.values()}) for m in members]
        want = targets(plan, sizes[0], 1.0)
        with torch.no_grad():
            keep = lazy_keep(members, plan, options.importance, want, w, sizes)
        sel = Selection(sizes, keep, torch.device("cpu"))
        for k in keys:   # a widened dimension has the size of the kept units
            dims = plan.tensors[k].dims
            shapes[k] = tuple(n if d >= len(dims) or dims[d] is None else sel.length(dims[d])
                              for d, n in enumerate(shapes[k]))

        def produce(key):
            return assembled_tensor(plan.tensors[key], Loaded(members, key), sel, w)
    entries = [(k, members[0].dtypes[k], shapes[k]) for k in keys]
    with torch.no_grad():
        if folder:
            staged = hfdirs.staging(output)
            try:
                hf.load_config(hf.folder(spec.name), spec.kwargs).save_pretrained(staged)
                write_tensors(os.path.join(staged, hf.WEIGHTS_FILE), entries, produce, {"format": "pt"})
                hfdirs.install_folder(staged, output)
            finally:
                if os.path.isdir(staged):
                    shutil.rmtree(staged)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
            write_tensors(output, entries, produce, checkpoint_metadata(spec, dict(fused_info(fusion, paths),
                                                                                  lazy=True)))
    print(f"fused {len(members)} models with {method} lazily, tensor by tensor, in "
          f"{time.perf_counter() - start:.3f} s -> {output}")
    if method == "nt" and options.repairs(True) and options.repair == "auto":
        print("ntdist fuse: note: --lazy fuses without repair (it needs the whole models)", file=sys.stderr)
    return output
