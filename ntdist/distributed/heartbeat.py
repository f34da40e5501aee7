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
from ntdist.preempt import preempt_requested


class Heartbeat:
    """A background all-reduce every second on its own gloo group.

    Ranks train members independently for a long time without any collective; this
    notices a dead peer within seconds (gloo reports the closed connection) or
    within the timeout, and ends the process with EXIT_PEER_LOST instead of letting
    the job hang. A rank that wants to stop raises its flag; all ranks see the
    maximum in the same round and stop together.
    """

    current = None

    def __init__(self, rank: int, timeout_s: float):
        self.rank = rank
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="ntdist-heartbeat", daemon=True)

    @classmethod
    def start(cls, rank: int, timeout_s: float) -> None:
        cls.current = cls(rank, timeout_s)
        cls.current.thread.start()

    def _loop(self) -> None:
        flag = torch.zeros(1)
        while True:
            flag[0] = 1.0 if self.stopping.is_set() else 0.0
            try:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            except Exception as err:  # noqa: BLE001 - any failure here means a peer is gone
                if preempt_requested() or self.stopping.is_set():
                    return   # peers are shutting down too; the main thread writes its state and exits
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                print(f"ntdist: error: rank {self.rank}: lost contact with a peer rank ({first}); the job stops. "
                      "Check the other ranks' logs, then restart with --resume", file=sys.stderr, flush=True)
                os._exit(EXIT_PEER_LOST)
            if flag[0] > 0:
                return
            self.stopping.wait(1.0)

    @classmethod
    def stop(cls) -> None:
        if cls.current is not None:
            cls.current.stopping.set()
            cls.current.thread.join()
            cls.current = None
