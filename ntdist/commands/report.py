"""`ntdist report RUN_DIR [RUN_DIR ...]`: report.md and plots for finished runs (see `records.report`)."""

from typing import Optional

from ntdist.errors import UserError
from ntdist.records.groups import find_run_dirs
from ntdist.records.report import write_report


def report_command(run_dirs, out: Optional[str] = None) -> str:
    """`ntdist report RUN_DIR [RUN_DIR ...]`: find every finished run below the arguments and report them."""
    if isinstance(run_dirs, str):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise UserError("no run directories given; usage: ntdist report RUN_DIR [RUN_DIR ...]")
    return write_report(find_run_dirs(list(run_dirs)), out or run_dirs[0])
