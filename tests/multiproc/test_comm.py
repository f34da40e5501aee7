"""Models move between ranks in their own dtype, through one small bucket, into templates built on `meta`:
exact copies, and the extra memory of a send or a receive is bounded (peak RSS, reset before each step).
Weight averaging across ranks is one all-reduce that equals averaging all members in one process.

Run: .venv/bin/python -m pytest tests/multiproc/test_comm.py
"""

import os

import torch
import torch.nn as nn

from helpers import spawn

MIB = 2 ** 20


class Mixed(nn.Module):
    """bf16 and float32 weights, an int64 and a bool buffer; tensors smaller and larger than the bucket."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.small = nn.Linear(16, 8)
        self.big = nn.Linear(width, width, bias=False)
        self.half = nn.Linear(8, 4).to(torch.bfloat16)
        self.register_buffer("steps", torch.arange(5))
        self.register_buffer("mask", torch.tensor([True, False, True]))


def _status(key: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS: resident now, VmHWM: peak since the last reset)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _extra_peak(step) -> int:
    """Bytes by which the peak RSS during `step()` exceeded the RSS before it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # resets the peak (VmHWM) to the current RSS
    before = _status("VmRSS")
    step()
    return _status("VmHWM") - before


def _pair(rank, out_dir, width):
    from ntdist.distributed import comm
    from ntdist.distributed.world import DistributedConfig, init_world, shutdown
    world = init_world(DistributedConfig(threads_per_rank=1, timeout_s=60))
    comm.BUCKET_BYTES = MIB
    torch.manual_seed(3)
    if rank == 0:
        model = Mixed(width)
        extra = _extra_peak(lambda: comm.send_model(world, model, 1))
        comm.broadcast_model(world, model, 0)
        torch.save({"model": model.state_dict(), "extra": extra}, os.path.join(out_dir, "sent.pt"))
    else:
        template = comm.meta_template(lambda: Mixed(width))
        assert all(t.is_meta for t in template.state_dict().values())
        got = {}
        extra = _extra_peak(lambda: got.update(model=comm.recv_model(world, template, 0)))
        again = comm.broadcast_model(world, comm.meta_template(lambda: Mixed(width)), 0)
        torch.save({"model": got["model"].state_dict(), "again": again.state_dict(), "extra": extra},
                   os.path.join(out_dir, "received.pt"))
    shutdown(world)


def test_send_receive_broadcast_are_exact_in_every_dtype(tmp_path):
    spawn(_pair, 2, str(tmp_path), 64)
    sent = torch.load(tmp_path / "sent.pt", weights_only=True)["model"]
    received = torch.load(tmp_path / "received.pt", weights_only=True)
    assert sent["half.weight"].dtype == torch.bfloat16 and sent["mask"].dtype == torch.bool
    for state in (received["model"], received["again"]):
        assert state.keys() == sent.keys()
        for key, value in sent.items():
            assert state[key].dtype == value.dtype and torch.equal(state[key], value), key


def test_extra_memory_of_a_send_and_a_receive_is_bounded(tmp_path):
    width = 3072   # one 36 MiB weight: sent straight from the model, received straight into the template
    spawn(_pair, 2, str(tmp_path), width)
    model_bytes = width * width * 4
    sender = torch.load(tmp_path / "sent.pt", weights_only=True)["extra"]
    receiver = torch.load(tmp_path / "received.pt", weights_only=True)["extra"]
    # a flat float32 copy of the model (the old pack) alone would add model_bytes on each side
    assert sender < 0.25 * model_bytes, sender / MIB
    assert receiver < 1.25 * model_bytes, receiver / MIB   # the received model itself, plus at most one bucket


class Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)


def _members(k: int):
    members = []
    for i in range(k):
        torch.manual_seed(i)
        m = Normed()
        with torch.no_grad():
            m.bn.running_mean.normal_()
            m.bn.num_batches_tracked.fill_(10 * i + 1)
        members.append(m)
    return members


def _average(rank, out_dir, k):
    from ntdist.distributed.layout import MemberLayout
    from ntdist.distributed.tree import reduce_average
    from ntdist.distributed.world import DistributedConfig, init_world, shutdown
    world = init_world(DistributedConfig(threads_per_rank=1, timeout_s=60))
    layout = MemberLayout(k, world.size)
    members = _members(k)
    averaged = reduce_average(world, {i: members[i] for i in layout.held_by(rank)}, layout.holders, Normed)
    torch.save(averaged.state_dict(), os.path.join(out_dir, f"avg{rank}.pt"))
    shutdown(world)


def test_averaging_is_one_all_reduce_equal_to_the_average_of_all_members(tmp_path):
    from ntdist.fusion import average
    spawn(_average, 2, str(tmp_path), 3)   # rank 0 holds members 0 and 1, rank 1 member 2
    expected = average(_members(3)).state_dict()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"avg{rank}.pt", weights_only=True)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6)
        assert int(got["bn.num_batches_tracked"]) == 21
