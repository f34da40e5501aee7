"""The run directory: resolved config, metrics (metrics.jsonl and the other trackers), checkpoints and results.json.

Only rank 0 writes here. Every write of a whole file is atomic (temporary file,
flush, rename), so a kill during a save leaves the previous version intact;
metrics.jsonl is appended, and a torn last line is dropped on resume. While a
run is active rank 0 holds the directory's lock (`records.lock`); the manifest
(`records.manifest`) lists what ntdist wrote, the only files --overwrite removes.
The names of the checkpoints and state files are defined here, once
(`member_name`, `member_state_name`, `finetuned_name`, `finetune_state_name`):
`RunDir`'s paths, the manifest and `--overwrite`'s checks all derive from them.
"""

import hashlib
import json
import os
import re
import sys
from typing import List, Sequence

import yaml

from ntdist.errors import UserError
from ntdist.records.files import atomic_write_text
from ntdist.records.lock import RunLock, check_free
from ntdist.records.manifest import (MANIFEST_FILE, OWNED_SINCE, PROBE_FILE, add_to_manifest, all_files,
                                     describe_foreign, manifest_format, only_leftovers, read_manifest,
                                     remove_temporaries, remove_written)
from ntdist.records.results import RESULTS_FILE, Results, to_json
from ntdist.records.trackers import (LABELS, CsvTracker, JsonlTracker, TensorBoardTracker, check_tracker_paths,
                                     open_trackers)

CONFIG_FILE = "config.yaml"
METRICS_FILE = JsonlTracker.FILE
REPORT_NAMES = re.compile(r"report\.md|sweep\.json|(curves|paired)_\d+\.png|accuracy_vs_\w+\.png")   # written after a run
CHECKPOINT_DIR = "checkpoints"


def member_name(index: int) -> str:
    """The final checkpoint of member `index`."""
    return f"member{index}"


def member_state_name(index: int) -> str:
    """The state file of member `index`'s training (for --resume; deleted once its checkpoint is written)."""
    return f"{member_name(index)}.state"


def finetuned_name(label: str) -> str:
    """The fine-tuned model of `label`: a fusion method, or the control (the best member given the same epochs)."""
    return f"finetuned_{label}"


def finetune_state_name(label: str) -> str:
    """The state file of the fine-tuning of `label`."""
    return f"finetune_{label}.state"


def checkpoint_file(name: str) -> str:
    """checkpoints/<name>.safetensors, relative to the run directory."""
    return os.path.join(CHECKPOINT_DIR, f"{name}.safetensors")


def checkpoint_names(members: int, labels: Sequence[str]) -> List[str]:
    """Every checkpoint and state file of a run of `members` members whose fine-tuned models are `labels`."""
    names = [name for i in range(members) for name in (member_name(i), member_state_name(i))]
    for label in labels:
        names += [finetuned_name(label), finetune_state_name(label)]
    return names


class RunDir:
    """Paths and writers for one run; methods are no-ops on ranks other than 0 (`writer=False`)."""

    def __init__(self, path: str, writer: bool = True, trackers: Sequence[str] = ("jsonl",)):
        self.path = path
        self.writer = writer
        self.tracker_names = list(trackers)
        self.trackers: list = []    # opened by prepare(), once the directory exists
        self._logged: set = set()   # keys of metrics records already in metrics.jsonl (kept on resume)
        self.lock = RunLock(path)

    def file(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def member_checkpoint(self, index: int) -> str:
        return self.file(checkpoint_file(member_name(index)))

    def member_state(self, index: int) -> str:
        return self.file(checkpoint_file(member_state_name(index)))

    def finetuned_checkpoint(self, label: str) -> str:
        return self.file(checkpoint_file(finetuned_name(label)))

    def finetune_state(self, label: str) -> str:
        return self.file(checkpoint_file(finetune_state_name(label)))

    def owners_recorded(self) -> bool:
        """Whether the finished checkpoints here record their owner: the manifest says this ntdist wrote the
        directory (an older one's, format 1, are resumed unchecked)."""
        return (manifest_format(self.path) or OWNED_SINCE) >= OWNED_SINCE

    def check(self, resume: bool, overwrite: bool) -> None:
        """Refuse what would lose files or mix runs, before any rank creates anything.

        A non-empty directory needs --resume or --overwrite; --resume needs a directory ntdist
        wrote (its manifest and config.yaml); a directory locked by a live run is refused. One that
        holds only ntdist's bookkeeping and temporaries (a run killed in its first write) counts as empty.
        Called on every rank (the run directory is on a shared file system), so all ranks stop together.
        """
        if resume and overwrite:
            raise UserError("--resume and --overwrite contradict each other; pass --resume to continue the run "
                            "or --overwrite to start it again")
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise UserError(f"output.dir '{self.path}' is a file, not a folder; choose a folder for the run")
        if not (os.path.isdir(self.path) and os.listdir(self.path)):
            return
        check_free(self.path)
        if only_leftovers(self.path):   # a run killed during its first write: ntdist's, and as good as empty
            return
        if not (resume or overwrite):
            raise UserError(f"run directory '{self.path}' is not empty; pass --resume to continue it, "
                            "--overwrite to start again, or set output.dir to a new folder")
        if resume and read_manifest(self.path) is None:
            raise UserError(f"'{self.path}' was not written by ntdist (it has no {MANIFEST_FILE}), so there is no "
                            "run to resume; set output.dir to the run's folder or to a new one")
        if resume and not os.path.isfile(self.file(CONFIG_FILE)):
            raise UserError(f"'{self.path}' has no {CONFIG_FILE}, so the config cannot be checked against the "
                            "run's; restore the file, or pass --overwrite to start again")
        check_tracker_paths(self.tracker_names, self.path)   # ntdist never writes these the other way round

    def prepare(self, resume: bool, overwrite: bool, members: int = 0, labels: Sequence[str] = ()) -> None:
        """Create and lock the directory (clearing ntdist's old files with `overwrite`); rank 0 only.

        The checkpoints of `members` members and of the fine-tuned models `labels` go into the
        manifest (`checkpoint_names`) before any rank writes one.
        """
        if not self.writer:
            return
        try:
            os.makedirs(self.file(CHECKPOINT_DIR), exist_ok=True)
            probe = self.file(PROBE_FILE)
            with open(probe, "w") as f:
                f.write("ok")
            os.unlink(probe)
        except OSError as err:
            raise UserError(f"cannot write to run directory '{self.path}' ({err.strerror}); "
                            "choose a writable output.dir") from None
        self.lock.acquire()
        if self.lock.took_over:
            print(f"ntdist: note: took over the stale lock of pid {self.lock.took_over.get('pid')} on host "
                  f"{self.lock.took_over.get('host')} (that run has ended)", file=sys.stderr)
        planned = [CONFIG_FILE, METRICS_FILE, CsvTracker.FILE, RESULTS_FILE] + \
            [checkpoint_file(name) for name in checkpoint_names(members, labels)]
        if overwrite:
            listed = read_manifest(self.path) or set()
            clash = [name for name in all_files(self.path) if name not in listed and
                     (name in planned or REPORT_NAMES.fullmatch(name))]
            if clash:
                raise UserError(f"--overwrite would replace {', '.join(clash[:3])} in '{self.path}', which ntdist did "
                                "not write; move those files away, or choose another output.dir")
            foreign = remove_written(self.path, planned)
            if foreign:
                print(describe_foreign(self.path, foreign), file=sys.stderr)
            os.makedirs(self.file(CHECKPOINT_DIR), exist_ok=True)
        # of a kill during an earlier write, also of planned files not listed yet; never this run's: it holds the lock
        remove_temporaries(self.path, planned)
        if resume and os.path.exists(self.file(METRICS_FILE)):
            self._logged = {_key(record) for record in self._read_metrics()}
        add_to_manifest(self.path, planned)
        self.close()
        self.trackers = open_trackers(self.tracker_names, self.path)

    def release(self) -> None:
        """Drop the lock (rank 0, at the end of the run however it ends)."""
        self.lock.release()

    def _read_metrics(self) -> list:
        """The records in metrics.jsonl; a torn last line (a kill during an append) is dropped with a warning."""
        path = self.file(METRICS_FILE)
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().split("\n")
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
                if not isinstance(records[-1], dict):
                    records.pop()
                    raise ValueError("not a JSON object")
            except ValueError:
                if any(rest.strip() for rest in lines[number:]):
                    raise UserError(f"{path} line {number} is not JSON; fix or delete that line, "
                                    "or pass --overwrite to start again") from None
                print(f"ntdist: warning: dropped a partial last line of {path} (a write was interrupted)",
                      file=sys.stderr)
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
        return records

    def write_config(self, text: str, resume: bool = False) -> None:
        """Write the resolved config; when resuming, refuse a config that differs from the run's."""
        if not self.writer:
            return
        if resume and os.path.exists(self.file(CONFIG_FILE)):
            with open(self.file(CONFIG_FILE), encoding="utf-8", errors="replace") as f:
                old = f.read()
            try:
                old_cfg = yaml.safe_load(old)
            except yaml.YAMLError as err:
                old_cfg = f"unreadable ({str(err).splitlines()[0]})"
            if not isinstance(old_cfg, dict) or not isinstance(old_cfg.get("output", {}), dict):
                raise UserError(f"{self.file(CONFIG_FILE)} is damaged, so the config cannot be checked against the "
                                "run's; restore it, or pass --overwrite to start again")
            key = _first_difference(_comparable(old_cfg), _comparable(yaml.safe_load(text)))
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
        """Flush and close the trackers (TensorBoard buffers its events); list TensorBoard's files in the manifest."""
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
        events = self.file(TensorBoardTracker.DIR)
        if self.writer and os.path.isdir(events):
            add_to_manifest(self.path, [os.path.join(TensorBoardTracker.DIR, n) for n in os.listdir(events)])

    def write_results(self, results: Results) -> None:
        if self.writer:
            atomic_write_text(self.file(RESULTS_FILE), to_json(results))


def _key(record: dict) -> tuple:
    return tuple(record.get(k) for k in LABELS)


def config_digest(text: str) -> str:
    """A short digest of the resolved config YAML `text`, over the keys a resume must keep (`_comparable`):
    the run a state file records as its owner."""
    canonical = json.dumps(_comparable(yaml.safe_load(text)), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


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
