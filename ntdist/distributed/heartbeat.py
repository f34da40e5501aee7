"""A background heartbeat that ends the process when a peer rank is lost.

Without it, a rank whose peer died would wait in its next collective until the
timeout, or forever in code that has none.
"""

import datetime
import os
import sys
import threading

import torch
import torch.distributed as dist

from ntdist.errors import EXIT_PEER_LOST
from ntdist.preempt import request_stop


class Heartbeat:
    """A background all-reduce every second on its own gloo group.

    Ranks train members independently for a long time without any collective; this
    notices a dead peer within seconds (gloo reports the closed connection) or
    within the timeout, and ends the process with EXIT_PEER_LOST instead of letting
    the job hang. A rank that stops raises its flag (STOPPED after success or
    preemption, FAILED after an error); all ranks see the maximum in the same round.
    A rank that sees a peer's flag without stopping itself follows it: after
    STOPPED it stops at its next epoch boundary (state saved, exit 3), after FAILED
    it ends with EXIT_PEER_LOST. A peer that vanishes without a flag is lost (exit 4),
    even when SIGTERM arrived too (torchrun's agent sends it to the survivors): a
    rank that stops after success or preemption still needs one round with every
    peer, and peers only leave the loop together, after such a round, so a failed
    last round means a peer vanished and this rank exits 4, not 0 or 3.
    """

    STOPPED, FAILED = 1.0, 2.0

    current = None

    def __init__(self, rank: int, timeout_s: float):
        self.rank = rank
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        self.stopping = threading.Event()
        self.flag = self.STOPPED
        self.thread = threading.Thread(target=self._loop, name="ntdist-heartbeat", daemon=True)

    @classmethod
    def start(cls, rank: int, timeout_s: float) -> None:
        cls.current = cls(rank, timeout_s)
        cls.current.thread.start()

    def _loop(self) -> None:
        flag = torch.zeros(1)
        while True:
            flag[0] = self.flag if self.stopping.is_set() else 0.0
            try:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            except Exception as err:  # noqa: BLE001 - any failure here means a peer is gone
                if self.stopping.is_set() and self.flag >= self.FAILED:
                    return   # this rank failed itself: its own error is the one to report
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                self._exit(f"lost contact with a peer rank ({first})")
            if flag[0] > 0:
                if not self.stopping.is_set():
                    if flag[0] >= self.FAILED:
                        self._exit("a peer rank stopped with an error (see its message)")
                    request_stop()   # a peer was preempted: save the state at the next epoch boundary too
                return
            self.stopping.wait(1.0)

    def _exit(self, why: str) -> None:
        print(f"ntdist: error: rank {self.rank}: {why}; the job stops. "
              "Check the other ranks' logs, then restart with --resume", file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_LOST)

    @classmethod
    def stop(cls, failed: bool = False) -> None:
        """Raise this rank's flag (FAILED after an error) and end the heartbeat."""
        if cls.current is not None:
            cls.current.flag = cls.FAILED if failed else cls.STOPPED
            cls.current.stopping.set()
            cls.current.thread.join()
            cls.current = None
