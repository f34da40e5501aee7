"""Two ranks, SIGTERM inside an epoch: the ranks stop at the next checkpoint step, and resuming gives the
uninterrupted run's weights and metrics bit for bit. Member training (one member per rank, SIGTERM on both, as
a scheduler signals every task), then data-parallel fine-tuning (SIGTERM on rank 1 only: rank 0 learns it
from the one all-reduce at the checkpoint step and stops at the same batch).

Run: .venv/bin/python -m pytest tests/multiproc/test_step_resume_ranks.py
"""

import json
import os
import re
import signal

import torch

from helpers import make_run, spawn

ARGS = ["model.kwargs.width=16", "fusion.k=2", "train.epochs=2", "finetune.epochs=2", "data.batch_size=8",
        "data.train_fraction=0.2", "train.checkpoint_every_steps=3", "finetune.checkpoint_every_steps=3"]
TIMING = ("samples_per_s", "peak_device_mib")


def _arm(model, calls: list, at: int):
    """SIGTERM this process at the model's `at`-th forward pass."""
    def hook(module, inputs):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signal.SIGTERM)
    model.register_forward_pre_hook(hook)
    return model


def _job(rank, out_dir, resume, sigterm_in):
    """Member r trained on rank r, then a fresh model fine-tuned on both ranks; SIGTERM at the 4th forward pass
    of stage `sigterm_in` (none when None): in "member" on both ranks, in "finetune" on rank 1."""
    import ntdist.stages.members as members
    from ntdist.distributed.world import DistributedConfig, init_world, shutdown
    from ntdist.errors import Preempted
    from ntdist.pipeline import train_stage
    from ntdist.preempt import install_sigterm_handler
    from ntdist.stages.finetune import finetune

    world = init_world(DistributedConfig(threads_per_rank=1, timeout_s=60))
    install_sigterm_handler()
    run = make_run(out_dir, *ARGS, world=world, resume=resume)
    if sigterm_in == "member":
        build = members.build_member
        members.build_member = lambda *a, **kw: _arm(build(*a, **kw), [], 4)
    try:
        held = train_stage(run)
        model = members.build_member(run.spec, 7)
        if rank == 1 and sigterm_in == "finetune":
            _arm(model, [], 4)
        history = finetune(run, model, "t", 3)
    except Preempted as err:
        with open(os.path.join(out_dir, f"preempted{rank}.txt"), "w") as f:
            f.write(str(err))
        shutdown(world, clean=False)
        return
    if rank == 0:
        torch.save({"member": held[0].state_dict(), "finetuned": model.state_dict()}, os.path.join(out_dir, "w.pt"))
    if rank == 1:
        torch.save(held[1].state_dict(), os.path.join(out_dir, "member1.pt"))
        with open(os.path.join(out_dir, "finetune.json"), "w") as f:
            json.dump(history, f)
    shutdown(world)


def _metrics(out_dir):
    with open(os.path.join(out_dir, "finetune.json")) as f:
        finetuned = json.load(f)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in logged + finetuned]


def _preempted(out_dir, stages, batch):
    for rank, stage in enumerate(stages):
        path = os.path.join(out_dir, f"preempted{rank}.txt")
        with open(path) as f:
            message = f.read()
        os.remove(path)
        assert f"during {stage}" in message and re.search(f"at batch {batch} of epoch 1", message), message


def test_sigterm_on_one_rank_mid_epoch_then_resume_is_bit_identical(tmp_path):
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    spawn(_job, 2, whole, False, None)
    spawn(_job, 2, cut, False, "member")
    # a rank may stop at batch 3 already: its heartbeat tells it that the other rank stopped
    _preempted(cut, ["training of member 0", "training of member 1"], "[36]")
    spawn(_job, 2, cut, True, "finetune")     # the members finish from batch 6, fine-tuning is cut
    _preempted(cut, ["fine-tuning (t)"] * 2, "6")
    spawn(_job, 2, cut, True, None)
    a, b = (torch.load(os.path.join(d, "w.pt"), weights_only=True) for d in (whole, cut))
    for part in ("member", "finetuned"):
        assert a[part].keys() == b[part].keys()
        assert [k for k in a[part] if not torch.equal(a[part][k], b[part][k])] == [], part
    a, b = (torch.load(os.path.join(d, "member1.pt"), weights_only=True) for d in (whole, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(whole) == _metrics(cut) and len(_metrics(whole)) == 6
