"""The run directory: resolved config, metrics.jsonl, checkpoints and results.json.

Only rank 0 writes here. Every write of a whole file is atomic (temporary file,
flush, rename), so a kill during a save leaves the previous version intact.
"""

import json
import os
from typing import Optional

from ntdist.checkpoint import atomic_write_text
from ntdist.errors import UserError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"


class RunDir:
    """Paths and writers for one run; methods are no-ops on ranks other than 0 (`writer=False`)."""

    def __init__(self, path: str, writer: bool = True):
        self.path = path
        self.writer = writer

    def file(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def prepare(self, resume: bool, overwrite: bool) -> None:
        """Create the directory; refuse a non-empty one unless resuming or overwriting."""
        if not self.writer:
            return
        if os.path.isdir(self.path) and os.listdir(self.path) and not (resume or overwrite):
            raise UserError(f"run directory '{self.path}' is not empty; pass --resume to continue it, "
                            "--overwrite to start again, or set output.dir to a new folder")
        if overwrite and os.path.isdir(self.path):
            for name in (METRICS_FILE, RESULTS_FILE):
                if os.path.exists(self.file(name)):
                    os.unlink(self.file(name))
        try:
            os.makedirs(self.file("checkpoints"), exist_ok=True)
            probe = self.file(".write-test")
            with open(probe, "w") as f:
                f.write("ok")
            os.unlink(probe)
        except OSError as err:
            raise UserError(f"cannot write to run directory '{self.path}' ({err.strerror}); "
                            "choose a writable output.dir") from None

    def write_config(self, text: str) -> None:
        if self.writer:
            atomic_write_text(self.file(CONFIG_FILE), text)

    def log(self, record: dict) -> None:
        """Append one JSON object to metrics.jsonl."""
        if self.writer:
            with open(self.file(METRICS_FILE), "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()

    def write_results(self, results: dict) -> None:
        if self.writer:
            atomic_write_text(self.file(RESULTS_FILE), json.dumps(results, indent=2) + "\n")

    def read_results(self) -> Optional[dict]:
        try:
            with open(self.file(RESULTS_FILE)) as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return None
