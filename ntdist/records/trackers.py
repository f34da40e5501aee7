"""Experiment trackers: where rank 0 sends each metrics record (`output.trackers`).

A record is one flat dict: `stage` (member, fusion, finetune, sync), `member`
or `method`, `epoch`, for step-level records `step`, and numbers (loss,
accuracies, lr, samples_per_s, peak_device_mib). Every tracker gets every record:

- `jsonl`: metrics.jsonl, one JSON object per line (what `--resume` reads to log nothing twice; always on);
- `csv`: metrics.csv, the same records as rows (the header grows when a record brings a new key);
- `tensorboard`: event files under tensorboard/, scalars tagged `<member0|finetune/nt|...>/<epoch|step>/<key>`
  (needs the `tensorboard` package: `pip install 'ntdist[tensorboard]'`).

Every tracker has a record on disk once `log` returns (TensorBoard's writer is flushed
each time, about 15 us), so a kill -9 loses no event that metrics.jsonl holds, and
none logged before the last state write.
"""

import csv
import io
import json
import os
from typing import Dict, List

from ntdist.errors import UserError
from ntdist.records.files import atomic_write_text, full_disk_is_user_error

LABELS = ("stage", "member", "method", "epoch", "step")   # what a record is about; everything else is a metric


class JsonlTracker:
    FILE = "metrics.jsonl"

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, self.FILE)

    def log(self, record: dict) -> None:
        with full_disk_is_user_error(self.path), open(self.path, "a") as f:   # a torn line is dropped on resume
            f.write(json.dumps(record) + "\n")
            f.flush()

    def close(self) -> None:
        pass


class CsvTracker:
    FILE = "metrics.csv"

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, self.FILE)
        self.columns: List[str] = []
        if os.path.exists(self.path):   # a resumed run appends to its file
            with open(self.path, newline="") as f:
                self.columns = next(csv.reader(f), [])

    def log(self, record: dict) -> None:
        new = [k for k in record if k not in self.columns]
        if new:   # rewrite once with the wider header; earlier rows get empty cells
            rows = read_csv(self.path) if os.path.exists(self.path) else []
            self.columns += new
            atomic_write_text(self.path, _csv_text(self.columns, rows, header=True))
        with full_disk_is_user_error(self.path), open(self.path, "a", newline="") as f:
            f.write(_csv_text(self.columns, [record], header=False))

    def close(self) -> None:
        pass


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, (list, dict, bool)) else str(value)


def _csv_text(columns: List[str], rows: List[dict], header: bool) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    if header:
        writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return out.getvalue()


def read_csv(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class TensorBoardTracker:
    DIR = "tensorboard"

    def __init__(self, run_dir: str):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(os.path.join(run_dir, self.DIR), flush_secs=10)

    def log(self, record: dict) -> None:
        who = f"member{record['member']}" if record.get("member") is not None else \
            f"{record['stage']}/{record['method']}" if record.get("method") is not None else record["stage"]
        kind, step = ("step", record["step"]) if "step" in record else ("epoch", record.get("epoch", 0))
        for key, value in record.items():
            if key not in LABELS and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{who}/{kind}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


TRACKERS = {"jsonl": JsonlTracker, "csv": CsvTracker, "tensorboard": TensorBoardTracker}


def check_trackers(names) -> None:
    """UserError unless `names` are known trackers, include jsonl, and the ones that need a package have it."""
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"unknown tracker '{name}' in output.trackers; choose from {list(TRACKERS)}")
    if "jsonl" not in names:
        raise UserError("output.trackers must include jsonl: metrics.jsonl is the run's own record, which "
                        "--resume reads so that nothing is logged twice")
    if "tensorboard" in names:
        import importlib.util
        if importlib.util.find_spec("tensorboard") is None:
            raise UserError("output.trackers lists tensorboard, which needs the tensorboard package: "
                            "pip install 'ntdist[tensorboard]' (or pip install tensorboard)")


def check_tracker_paths(names, run_dir: str) -> None:
    """UserError if a tracker's file in `run_dir` is a folder, or TensorBoard's folder is a file (checked before
    a run starts: opening them later would fail half-way)."""
    for name in names:
        tracker = TRACKERS[name]
        if hasattr(tracker, "FILE"):
            path, wrong, what = os.path.join(run_dir, tracker.FILE), os.path.isdir, "a directory, not a file"
        else:
            path, wrong, what = os.path.join(run_dir, tracker.DIR), os.path.isfile, "a file, not a folder"
        if os.path.lexists(path) and (wrong(path) or not os.path.exists(path)):
            what = "a broken symbolic link" if not os.path.exists(path) else what
            raise UserError(f"'{os.path.basename(path)}' is {what} in '{run_dir}', where the {name} tracker "
                            "writes; move it away, or set output.dir to a new folder")


def open_trackers(names, run_dir: str) -> list:
    return [TRACKERS[name](run_dir) for name in names]
