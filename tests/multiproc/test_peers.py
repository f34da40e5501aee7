"""Lost, stopped and misplaced peers end a job quickly with the right exit code, never a hang.

Run: .venv/bin/python -m pytest tests/multiproc/test_peers.py
"""

import datetime
import os
import signal
import socket
import subprocess
import sys
import time

import torch.distributed as dist

from helpers import QUICK, ROOT, free_port, ntdist, wait_for


def test_a_rank_whose_port_is_held_by_another_program_exits_2_within_its_timeout(tmp_path):
    blocker = socket.socket()          # accepts connections, never answers like a TCPStore would
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(blocker.getsockname()[1])}
    start = time.time()
    try:
        proc = ntdist("run", *QUICK, "distributed.rendezvous_timeout_s=2", f"output.dir={tmp_path / 'run'}", env=env,
                      timeout=90)
    finally:
        blocker.close()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "could not join the process group" in proc.stderr and "distributed.rendezvous_timeout_s=2" in proc.stderr
    assert time.time() - start < 60
    assert not (tmp_path / "run").exists()


def test_sigterm_to_one_rank_stops_its_peer_at_the_next_epoch_with_exit_3(tmp_path):
    out, port = tmp_path / "run", free_port()
    cmd = [sys.executable, "-m", "ntdist", "run", *QUICK, "train.epochs=3000", "fusion.methods=[nt]",
           "distributed.timeout_s=15", f"output.dir={out}"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))) for r in (0, 1)]
    try:
        for name in ("member0.state.safetensors", "member1.state.safetensors"):
            wait_for(out / "checkpoints" / name, procs[0])
        procs[1].send_signal(signal.SIGTERM)           # only rank 1 is told to stop
        start = time.time()
        errs = [p.communicate(timeout=60)[1] for p in procs]
        assert [p.returncode for p in procs] == [3, 3], [e[-1500:] for e in errs]
        assert time.time() - start < 15                 # not the 3000 epochs, not the 15 s timeout on top
        assert all("preempted" in e for e in errs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_rank_that_reaches_another_jobs_store_is_refused(tmp_path):
    port = free_port()
    other = dist.TCPStore("127.0.0.1", port, 4, is_master=True, timeout=datetime.timedelta(seconds=30),
                          wait_for_workers=False)
    other.set("ntdist/job0", '{"job": "", "size": 4}')      # what rank 0 of a 4-rank job leaves there
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    proc = ntdist("run", *QUICK, "distributed.timeout_s=20", f"output.dir={tmp_path / 'run'}", env=env, timeout=90)
    assert proc.returncode == 2 and "belongs to another job" in proc.stderr, proc.stderr[-2000:]
    del other
