"""`ntdist eval`: accuracy and loss of checkpoints on a split of the data, and of their ensemble.

Each file is rebuilt as `commands.checkpoints` says (its stored spec, or `--model`
and `--model-kwargs` for a plain state dict), on the data `--data` names (a YAML
config and/or data.key=value overrides, as `ntdist run` reads them); checkpoints
inside a run directory's checkpoints/ default to that run's config.yaml. The
ensemble is the output average of all the files (the mean of their logits, as
`ntdist run` forms it). The result prints as a table, or as JSON with `--json`.
"""

import json
import os
import sys
from dataclasses import replace
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from ntdist.commands.checkpoints import ModelSource, load_checkpoints, usable_device
from ntdist.data import load_splits
from ntdist.errors import UserError
from ntdist.models.probe import check_runs
from ntdist.records.files import atomic_write_text
from ntdist.records.rundir import CHECKPOINT_DIR, CONFIG_FILE
from ntdist.training.batches import eval_batches
from ntdist.training.loop import labels_of, predict

SPLITS = ("test", "val", "train")
HINT = "check --model and --model-kwargs, and that --data is the data the model was trained on"


def run_config(paths: Sequence[str]) -> Optional[str]:
    """The config.yaml of the run directory whose checkpoints/ holds every file of `paths`, or None."""
    folders = {os.path.dirname(os.path.abspath(p)) for p in paths}
    if len(folders) != 1 or os.path.basename(next(iter(folders))) != CHECKPOINT_DIR:
        return None
    config = os.path.join(os.path.dirname(next(iter(folders))), CONFIG_FILE)
    return config if os.path.isfile(config) else None


def scores(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy (a fraction) and mean cross-entropy loss of `logits` against `labels`."""
    logits = logits.double()
    return {"accuracy": (logits.argmax(1) == labels).double().mean().item(),
            "loss": F.cross_entropy(logits, labels).item()}


def table(report: dict) -> str:
    """The report as aligned text: one row per file, then the ensemble."""
    rows = [(m["file"], m["accuracy"], m["loss"]) for m in report["models"]]
    if report.get("ensemble"):
        rows.append((f"ensemble of {len(report['models'])}", report["ensemble"]["accuracy"], report["ensemble"]["loss"]))
    width = max(len(name) for name, _, _ in rows + [("file", 0, 0)])
    lines = [f"{report['split']} split of {report['data']}: {report['samples']} samples",
             f"{'file':{width}s}  {'accuracy':>9s}  {'loss':>8s}"]
    lines += [f"{name:{width}s}  {acc * 100:8.2f}%  {loss:8.4f}" for name, acc, loss in rows]
    return "\n".join(lines)


def eval_command(paths: List[str], source: ModelSource = ModelSource(), split: str = "test",
                 json_out: Optional[str] = None, device: str = "cpu") -> dict:
    """Evaluate every checkpoint of `paths` and their output average on `split`; print and return the report."""
    if split not in SPLITS:
        raise UserError(f"--split must be one of {list(SPLITS)}, got '{split}'")
    if not paths:
        raise UserError("ntdist eval needs at least one checkpoint")
    if not source.data:
        config = run_config(paths)
        if config is None:
            raise UserError("ntdist eval needs the data the models are evaluated on: --data CONFIG.yaml (a run's "
                            "config.yaml does) and/or data.key=value overrides, e.g. --data data.name=mnist1d")
        print(f"ntdist eval: data of {config}", file=sys.stderr)
        source = replace(source, data=(config,))
    if json_out not in (None, "-"):
        folder = os.path.dirname(os.path.abspath(json_out))
        if os.path.isdir(json_out) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise UserError(f"cannot write --json '{json_out}' (a folder, or its folder is missing or not "
                            "writable); give a file name, or - for stdout")
    cfg = source.data_config("eval")
    splits = load_splits(cfg)
    dev = usable_device(device)
    data = getattr(splits, split)
    batches = eval_batches(data, cfg.eval_batch_size, device=dev, **{"max_mb": cfg.resident_max_mb,
                                                                     "workers": cfg.loader_workers})
    labels = labels_of(batches)
    report = {"split": split, "samples": len(labels), "data": cfg.name, "models": []}
    all_logits = []
    for path in paths:
        spec = source.spec([path], splits)
        model = load_checkpoints([path], spec, HINT)[0].to(dev)
        check_runs(model, torch.stack([data[i][0] for i in range(min(2, len(data)))]).to(dev),
                   f"'{path}' ({spec.name})", HINT)
        logits = predict(model, batches, dev)
        if logits.shape[1] != splits.num_classes:
            raise UserError(f"'{path}' gives {logits.shape[1]} outputs, the data have {splits.num_classes} classes; "
                            f"{HINT}")
        all_logits.append(logits)
        report["models"].append({"file": path, "model": spec.name, **scores(logits, labels)})
    if len(paths) > 1:
        report["ensemble"] = {"files": list(paths), **scores(torch.stack(all_logits).mean(0), labels)}
    text = json.dumps(report, indent=2)
    if json_out == "-":
        print(text)
    else:
        print(table(report))
        if json_out is not None:
            atomic_write_text(json_out, text + "\n")
    return report
