"""SIGTERM handling for preemption: the signal only sets a flag.

SLURM (and most schedulers) send SIGTERM some time before they kill a job.
Training asks `preempt_requested()` at each epoch boundary, after its state is
on disk, and stops with `Preempted` (exit code 3); `--resume` continues.
"""

import signal

_requested = False


def _on_sigterm(signum, frame):
    global _requested
    _requested = True


def install_sigterm_handler() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)


def request_stop() -> None:
    """Stop at the next epoch boundary as if SIGTERM had arrived (a peer rank was preempted)."""
    global _requested
    _requested = True


def preempt_requested() -> bool:
    return _requested
