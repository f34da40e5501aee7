"""The run directory: resolved config, metrics (metrics.jsonl and the other trackers), checkpoints and results.json.

Only rank 0 writes here. Every write of a whole file is atomic (temporary file,
flush, rename), so a kill during a save leaves the previous version intact.
"""

import json
import os
import shutil
from typing import Sequence

import yaml

from ntdist.errors import UserError
from ntdist.records.files import atomic_write_text
from ntdist.records.results import RESULTS_FILE, Results, to_json
from ntdist.records.trackers import LABELS, CsvTracker, JsonlTracker, TensorBoardTracker, open_trackers

CONFIG_FILE = "config.yaml"
METRICS_FILE = JsonlTracker.FILE


class RunDir:
    """Paths and writers for one run; methods are no-ops on ranks other than 0 (`writer=False`)."""

    def __init__(self, path: str, writer: bool = True, trackers: Sequence[str] = ("jsonl",)):
        self.path = path
        self.writer = writer
        self.tracker_names = list(trackers)
        self.trackers: list = []    # opened by prepare(), once the directory exists
        self._logged: set = set()   # keys of metrics records already in metrics.jsonl (kept on resume)

    def file(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def checkpoint(self, name: str) -> str:
        """checkpoints/<name>.safetensors: `member3`, `member3.state`, `finetuned_nt`, `finetune_nt.state`."""
        return self.file("checkpoints", f"{name}.safetensors")

    def check(self, resume: bool, overwrite: bool) -> None:
        """Refuse a non-empty directory unless resuming or overwriting.

        Called on every rank before any rank creates anything (the run directory is on a shared
        file system), so all ranks stop together.
        """
        if os.path.isdir(self.path) and os.listdir(self.path) and not (resume or overwrite):
            raise UserError(f"run directory '{self.path}' is not empty; pass --resume to continue it, "
                            "--overwrite to start again, or set output.dir to a new folder")

    def prepare(self, resume: bool, overwrite: bool) -> None:
        """Create the directory (clearing old results with `overwrite`); rank 0 only."""
        if not self.writer:
            return
        if overwrite and os.path.isdir(self.path):
            for name in (METRICS_FILE, CsvTracker.FILE, RESULTS_FILE):
                if os.path.exists(self.file(name)):
                    os.unlink(self.file(name))
            shutil.rmtree(self.file(TensorBoardTracker.DIR), ignore_errors=True)
            ckpts = self.file("checkpoints")
            for name in os.listdir(ckpts) if os.path.isdir(ckpts) else []:
                if name.endswith(".safetensors"):
                    os.unlink(os.path.join(ckpts, name))
        if resume and os.path.exists(self.file(METRICS_FILE)):
            with open(self.file(METRICS_FILE)) as f:
                self._logged = {_key(json.loads(line)) for line in f if line.strip()}
        try:
            os.makedirs(self.file("checkpoints"), exist_ok=True)
            probe = self.file(".write-test")
            with open(probe, "w") as f:
                f.write("ok")
            os.unlink(probe)
        except OSError as err:
            raise UserError(f"cannot write to run directory '{self.path}' ({err.strerror}); "
                            "choose a writable output.dir") from None
        self.close()
        self.trackers = open_trackers(self.tracker_names, self.path)

    def write_config(self, text: str, resume: bool = False) -> None:
        """Write the resolved config; when resuming, refuse a config that differs from the run's."""
        if not self.writer:
            return
        if resume and os.path.exists(self.file(CONFIG_FILE)):
            with open(self.file(CONFIG_FILE)) as f:
                old = f.read()
            key = _first_difference(_comparable(yaml.safe_load(old)), _comparable(yaml.safe_load(text)))
            if key is not None:
                raise UserError(f"the config differs from the one '{self.path}' was started with (at '{key}'); "
                                "resume with the same config and overrides, or pass --overwrite to start again")
            return
        atomic_write_text(self.file(CONFIG_FILE), text)

    def log(self, record: dict) -> None:
        """Send one record to every tracker (records already logged before a resume are skipped)."""
        if self.writer and _key(record) not in self._logged:
            self._logged.add(_key(record))
            for tracker in self.trackers:
                tracker.log(record)

    def close(self) -> None:
        """Flush and close the trackers (TensorBoard buffers its events)."""
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []

    def write_results(self, results: Results) -> None:
        if self.writer:
            atomic_write_text(self.file(RESULTS_FILE), to_json(results))


def _key(record: dict) -> tuple:
    return tuple(record.get(k) for k in LABELS)


def _comparable(cfg: dict) -> dict:
    """The parts of a config that decide the results: a moved run directory or a new port may resume."""
    cfg = dict(cfg)
    cfg.pop("distributed", None)
    cfg["output"] = {k: v for k, v in cfg.get("output", {}).items() if k != "dir"}
    return cfg


def _first_difference(old, new, prefix: str = ""):
    """The dotted key of the first difference, or None when equal."""
    if old == new:
        return None
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
    return prefix.rstrip(".") or "<top>"
