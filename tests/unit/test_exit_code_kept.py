"""A rank that has decided its exit code keeps it when the launcher's SIGTERM arrives afterwards.

torchrun's agent SIGTERMs the remaining workers as soon as one exits. Python's shutdown puts the default
action back in place of a handler of its own, so a SIGTERM landing there used to end a survivor with -15
instead of its 4 (lost peer) or 3 (preempted). The subprocess below receives its SIGTERM at that point:
from an object destroyed during shutdown, after the exit code is decided.
Run: .venv/bin/python -m pytest tests/unit/test_exit_code_kept.py
"""

import signal
import subprocess
import sys

import pytest

import ntdist.commands.run as run_command
import ntdist.preempt as preempt
from helpers import ROOT
from ntdist.distributed.world import World
from ntdist.errors import PeerLostError

DECIDES_4 = """
import os, signal, sys, time
from ntdist.preempt import install_sigterm_handler, keep_exit_code

class SigtermDuringShutdown:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)

install_sigterm_handler()        # as ntdist run does
late = SigtermDuringShutdown()   # a module global: destroyed after Python has put back the default actions
if sys.argv[1] == "keep":
    keep_exit_code()
sys.exit(4)
"""


def test_an_exit_code_decided_before_a_sigterm_in_shutdown_is_kept():
    def exit_code(mode):
        return subprocess.run([sys.executable, "-c", DECIDES_4, mode], cwd=ROOT, timeout=60).returncode
    assert exit_code("plain") == -signal.SIGTERM   # what a survivor under torchrun used to end with
    assert exit_code("keep") == 4


def test_a_run_of_several_ranks_keeps_its_exit_code_once_decided(monkeypatch):
    def peer_lost(*args, **kwargs):
        raise PeerLostError("rank 0: lost contact with a peer rank")

    def sigterm_after_run(size):
        monkeypatch.setattr(run_command, "init_world", lambda *args, **kwargs: World(size=size))
        try:
            with pytest.raises(PeerLostError):
                run_command.run_command(f"{ROOT}/configs/quickstart.yaml", [])
            return signal.getsignal(signal.SIGTERM)
        finally:
            preempt.default_sigterm()
    monkeypatch.setattr(run_command, "check_engine", lambda *args: None)
    monkeypatch.setattr(run_command, "run", peer_lost)
    monkeypatch.setattr(run_command, "shutdown", lambda *args, **kwargs: None)
    assert sigterm_after_run(2) == signal.SIG_IGN
    assert sigterm_after_run(1) not in (signal.SIG_IGN, signal.SIG_DFL)   # one process (or a test) keeps its handler
