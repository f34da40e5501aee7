"""SIGTERM handling for preemption: the signal only sets a flag.

SLURM (and most schedulers) send SIGTERM some time before they kill a job.
Training asks `preempt_requested()` at each epoch boundary, after its state is
on disk, and with `checkpoint_every_steps` also at those batches inside an epoch,
and stops with `Preempted` (exit code 3); `--resume` continues. Once a run's
exit code is decided, SIGTERM is ignored (`keep_exit_code`), so that the code the
rank chose (3, 4, ...) is the one its launcher sees.
"""

import os
import signal
import sys
import threading

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


def keep_exit_code() -> None:
    """Ignore SIGTERM from now on: the process has decided its exit code and is about to end with it.

    torchrun's agent SIGTERMs the remaining workers as soon as one exits, and Python's shutdown puts the
    default action (death by the signal, exit -15) back in place of a handler of its own; a SIGTERM that
    lands there would replace a survivor's 4 (lost peer) or 3 (preempted). An ignored signal stays ignored."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def preempt_requested() -> bool:
    return _requested
