"""SIGTERM handling for preemption: the signal only sets a flag.

SLURM (and most schedulers) send SIGTERM some time before they kill a job.
Training asks `preempt_requested()` at each epoch boundary, after its state is
on disk, and with `checkpoint_every_steps` also at those batches inside an epoch,
and stops with `Preempted` (exit code 3); `--resume` continues.
"""

import os
import signal
import sys

from ntdist.errors import EXIT_PREEMPTED

_requested = False


def _on_sigterm(signum, frame):
    global _requested
    _requested = True


def _exit_now(signum, frame):
    sys.stderr.write("ntdist: error: preempted (SIGTERM) while starting, before anything was written; "
                     "rerun the same command\n")
    os._exit(EXIT_PREEMPTED)


def exit_on_sigterm() -> None:
    """While ntdist starts (imports, config, joining the world) SIGTERM exits 3 at once: nothing is written yet."""
    signal.signal(signal.SIGTERM, _exit_now)


def default_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def install_sigterm_handler() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)


def request_stop() -> None:
    """Stop at the next epoch boundary as if SIGTERM had arrived (a peer rank was preempted)."""
    global _requested
    _requested = True


def preempt_requested() -> bool:
    return _requested
