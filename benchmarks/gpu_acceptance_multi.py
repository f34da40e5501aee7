"""The checks of `benchmarks/gpu_acceptance_multi.sh` (a node with 4+ GPUs, or `--cpu-smoke`: 4 gloo CPU ranks).

    .venv/bin/python benchmarks/gpu_acceptance_multi.py [--cpu-smoke] [--out DIR]

Each check is a torchrun (or srun) job with a hard timeout, judged from its run directory against the same
fusion in one process; the tree check also counts the bytes every rank moves and its peak memory, against
`ntdist run --dry-run`'s model. Prints one table like `gpu_acceptance.py` and exits 1 on any FAIL.
"""

import argparse
import json
import os
import shutil
import sys
import time

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_acceptance as one  # noqa: E402 - the table, the run helpers and the tolerances of the one-GPU script

RANKS = 4
# The fusion alone, for the checks against one process: the repair and BatchNorm re-estimation read each rank's
# own calibration share (tests/multiproc/test_distributed_repair.py checks those sums across ranks).
EXACT = ("fusion.repair=none", "fusion.bn_reestimate=false")


def torchrun(s, name: str, *overrides, nproc: int = RANKS, model=None):
    """A 4-rank `ntdist run` of the mode's data and model; returns the run directory (exit 0 required)."""
    out = os.path.join(s.out, name)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "ntdist", "run", os.path.join(s.out, "base.yaml"), *s.data, *(model or s.model), "finetune.control=false",
           "output.diversity=false", f"distributed.threads_per_rank={s.threads}", f"output.dir={out}",
           "--overwrite", *overrides]
    start = time.perf_counter()
    code = one.run_command(cmd, f"{out}.log", s.timeout)
    if code != 0:
        raise AssertionError(f"exit {code} after {time.perf_counter() - start:.0f} s (log {out}.log)")
    return out


def members_of(out: str, k: int):
    from ntdist.records.checkpoint import load_model
    return [load_model(os.path.join(out, "checkpoints", f"member{i}.safetensors"))[0] for i in range(k)]


def tuned(out: str, label: str) -> dict:
    return load_file(os.path.join(out, "checkpoints", f"finetuned_{label}.safetensors"))


@one.check
def nccl_tree(s):
    """NT-recursive over 4 ranks (k=4, finetune.epochs=0: the fine-tuned file is the fused model) against
    single-process `fuse(..., schedule="recursive")` of the same members on the CPU (tolerance `fusion_tol`)."""
    from ntdist.fusion import fuse
    out = torchrun(s, "tree", "fusion.k=4", "fusion.methods=[nt]", "finetune.epochs=0", *EXACT)
    members = members_of(out, 4)
    x = one.example(s)
    worst = one.max_rel_diff(tuned(out, "nt"), fuse(members, schedule="recursive", example_inputs=x).state_dict())
    one.row("nccl_tree", "PASS" if worst <= s.fusion_tol else "FAIL",
            f"4 ranks against one process: max relative difference {worst:.1e} (tolerance {s.fusion_tol:g})")


@one.check
def nccl_all_reduce(s):
    """Averaging (one all-reduce) and OT (anchor broadcast + all-reduce) over 4 ranks, flat schedule, against
    `average` and `fuse(method="ot")` of the same members in one process (1e-5; OT `fusion_tol` + 1e-4)."""
    from ntdist.fusion import average, fuse
    out = torchrun(s, "flat", "fusion.k=4", "fusion.methods=[avg,ot]", "fusion.schedule=flat", "finetune.epochs=0",
                   EXACT[1])
    members = members_of(out, 4)
    x = one.example(s)
    avg = one.max_rel_diff(tuned(out, "avg"), average(members).state_dict())
    ot = one.max_rel_diff(tuned(out, "ot"), fuse(members, method="ot", schedule="flat", example_inputs=x).state_dict())
    one.row("nccl_all_reduce", "PASS" if avg <= 1e-5 and ot <= s.fusion_tol + 1e-4 else "FAIL",
            f"avg {avg:.1e} (tolerance 1e-5), ot {ot:.1e} (tolerance {s.fusion_tol + 1e-4:g})")


@one.check
def sync_batchnorm(s):
    """k=2 on 4 ranks: each member trained by 2 ranks at batch B against one process at batch 2B, the same samples in
    every step (whole batches: 1/4 of the samples for testing, half the rest for validation). On GPUs the BatchNorm
    ResNet with SyncBatchNorm, the same statistics: last losses within LOSS_TOL. On CPU ranks, where torch cannot
    synchronise BatchNorm, the MLP: the data-parallel part alone, member weights within `vector_tol`."""
    batch = int(next(o for o in s.data if o.startswith("data.batch_size=")).split("=")[1])
    model = None if s.gpu else one.VECTOR_MODEL
    common = ["fusion.k=2", "fusion.methods=[avg]", "finetune.epochs=0", "train.tf32=false", "train.lr=0.01",
              "train.epochs=1", "data.test_fraction=0.25", "data.val_fraction=0.5"]
    ddp = torchrun(s, "syncbn", *common, model=model)
    alone = one.run(s, "syncbn_alone", *common, f"data.batch_size={2 * batch}", "train.vectorize=off", model=model)
    shape = f"2 ranks x {batch} against 1 x {2 * batch}"
    if s.gpu:
        a, b = one.member_losses(ddp), one.member_losses(alone)
        gap = max(abs(a[i] - b[i]) / abs(b[i]) for i in range(2))
        return one.row("sync_batchnorm", "PASS" if gap <= one.LOSS_TOL else "FAIL",
                       f"SyncBatchNorm ResNet, {shape}: last losses {gap:.1e} (tolerance {one.LOSS_TOL:g})")
    worst = max(one.max_rel_diff(*(load_file(os.path.join(out, "checkpoints", f"member{i}.safetensors"))
                                   for out in (ddp, alone))) for i in range(2))
    one.row("sync_batchnorm", "PASS" if worst <= s.vector_tol else "FAIL",
            f"CPU, an MLP (no BatchNorm): {shape}: member weights {worst:.1e} (tolerance {s.vector_tol:g})")


@one.check
def sharded_teacher(s):
    """Distillation on 4 ranks with k=2 (two ranks per member): teacher_shard on against off, fine-tuned weights
    within 1e-4."""
    common = ["fusion.k=2", "fusion.methods=[nt]", "finetune.distill=true", "train.epochs=1"]
    on = torchrun(s, "teacher_on", *common, "finetune.teacher_shard=on")
    off = torchrun(s, "teacher_off", *common, "finetune.teacher_shard=off")
    worst = one.max_rel_diff(tuned(on, "nt"), tuned(off, "nt"))
    one.row("sharded_teacher", "PASS" if worst <= 1e-4 else "FAIL",
            f"sharded against whole: max relative difference {worst:.1e} (tolerance 1e-4)")


@one.check
def deepspeed(s):
    """Fine-tuning with DeepSpeed ZeRO on 4 ranks: stage 2 bf16 on GPUs with the BatchNorm ResNet; stage 1 bf16 on
    CPU ranks with an MLP (on a CPU, DeepSpeed's bf16 module fails in F.batch_norm: "expected scalar type
    BFloat16 but found Float")."""
    import importlib.util
    if importlib.util.find_spec("deepspeed") is None:
        return one.row("deepspeed", "SKIP", "deepspeed is not installed (pip install 'ntdist[deepspeed]')")
    out = torchrun(s, "deepspeed", "fusion.methods=[nt]", "finetune.engine=deepspeed", "finetune.precision=bf16",
                   f"finetune.zero_stage={2 if s.gpu else 1}", model=None if s.gpu else one.VECTOR_MODEL)
    accs = one.finite_accuracies(out, s)
    one.row("deepspeed", "PASS", f"ZeRO {2 if s.gpu else 1}, bf16: nt tuned {accs['nt tuned']:.3f}")


@one.check
def srun_one_gpu_per_task(s):
    """Inside a SLURM allocation: `srun --ntasks=4 --gpus-per-task=1` (CPU: --ntasks=4) runs the quickstart."""
    if not shutil.which("srun") or "SLURM_JOB_ID" not in os.environ:
        return one.row("srun_one_gpu_per_task", "SKIP", "not inside a SLURM allocation (salloc, then rerun)")
    out = os.path.join(s.out, "srun")
    cmd = ["srun", f"--ntasks={RANKS}", *(["--gpus-per-task=1"] if s.gpu else []), sys.executable, "-m", "ntdist",
           "run", os.path.join(s.out, "base.yaml"), *s.data, *s.model, "finetune.control=false", f"output.dir={out}",
           "--overwrite"]
    code = one.run_command(cmd, f"{out}.log", s.timeout)
    assert code == 0, f"srun exited {code} (log {out}.log)"
    one.finite_accuracies(out, s)
    one.row("srun_one_gpu_per_task", "PASS", f"{RANKS} tasks")


def tree_worker(out: str, width: int) -> None:
    """One rank of `tree_bytes_and_memory` (under torchrun): count what it moves, measure its peak, write both."""
    import threading

    import torch.distributed as dist
    from ntdist.distributed.layout import MemberLayout
    from ntdist.distributed.tree import tree_fuse
    from ntdist.distributed.world import DistributedConfig, World, init_world, shutdown
    from ntdist.fusion.options import NTOptions
    from ntdist.models import ModelSpec
    world = init_world(DistributedConfig(timeout_s=300))
    sent, received, rounds = {}, {}, [0]
    for name in ("send", "recv", "broadcast"):
        original = getattr(dist, name)

        def call(tensor, *args, _name=name, _original=original, **kwargs):
            if threading.current_thread() is threading.main_thread():
                side = sent if _name == "send" or (_name == "broadcast" and world.rank == args[0]) else received
                side[rounds[0]] = side.get(rounds[0], 0) + tensor.numel() * tensor.element_size()
            return _original(tensor, *args, **kwargs)
        setattr(dist, name, call)
    wait = World.wait_for
    World.wait_for = lambda self, what: (wait(self, what), rounds.__setitem__(0, rounds[0] + 1))[0]
    layout = MemberLayout(RANKS, world.size)
    spec = ModelSpec("mlp", {"input_dim": 3072, "num_classes": 10, "width": width, "depth": 2})
    torch.manual_seed(world.rank)
    held = {m: spec.build().to(world.device) for m in layout.held_by(world.rank)}
    cuda = world.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    tree_fuse(world, held, layout.holders, spec.build, NTOptions(), example_inputs=torch.randn(2, 3072))
    peak = torch.cuda.max_memory_allocated() - base if cuda else None
    with open(os.path.join(out, f"tree_rank{world.rank}.json"), "w") as f:
        json.dump({"sent": sent, "received": received, "peak": peak, "backend": world.backend}, f)
    shutdown(world)


@one.check
def tree_bytes_and_memory(s):
    """NT's tree over 4 ranks (NCCL on GPUs): each rank's bytes per round equal the dry run's exactly; on GPUs its
    peak device memory lies within 0.5 member of the dry run's model."""
    from ntdist.distributed import costs
    from ntdist.distributed.layout import MemberLayout
    from ntdist.models import ModelSpec
    width = 3072 if s.gpu else 64
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}",
           os.path.abspath(__file__), "--tree-worker", s.out, str(width)]
    code = one.run_command(cmd, os.path.join(s.out, "tree_bytes.log"), s.timeout)
    assert code == 0, f"exit {code} (log tree_bytes.log)"
    with torch.device("meta"):
        size = costs.MemberSize.of(ModelSpec("mlp", {"input_dim": 3072, "num_classes": 10, "width": width,
                                                     "depth": 2}).build())
    layout = MemberLayout(RANKS, RANKS)
    rounds = costs.tree_rounds(layout, size)
    peaks = costs.tree_peaks(layout, size)
    wrong, gaps = [], []
    for rank in range(RANKS):
        with open(os.path.join(s.out, f"tree_rank{rank}.json")) as f:
            got = json.load(f)
        for i, rd in enumerate(rounds):
            have = (got["sent"].get(str(i), 0), got["received"].get(str(i), 0))
            if have != (rd.sent.get(rank, 0), rd.received.get(rank, 0)):
                wrong.append(f"rank {rank} {rd.name}: {have}")
        if got["peak"] is not None:
            gaps.append(abs(got["peak"] - peaks[rank]) / size.state_bytes)
    backend = got["backend"]
    memory = f"; peak device memory within {max(gaps):.2f} member of the dry run (tolerance 0.5)" if gaps else ""
    ok = not wrong and (not gaps or max(gaps) <= 0.5)
    one.row("tree_bytes_and_memory", "PASS" if ok else "FAIL",
            f"{backend}: bytes per rank and round " + ("as the dry run's" if not wrong else "; ".join(wrong[:3]))
            + memory)


CHECKS = [nccl_tree, nccl_all_reduce, sync_batchnorm, sharded_teacher, deepspeed, srun_one_gpu_per_task,
          tree_bytes_and_memory]


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--tree-worker":
        tree_worker(sys.argv[2], int(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="the same checks on 4 gloo CPU ranks, tiny")
    parser.add_argument("--out", default=os.path.join(one.ROOT, "runs", "gpu_acceptance_multi"))
    parser.add_argument("--only", nargs="*", default=None, help="run only these checks")
    args = parser.parse_args()
    gpu = not args.cpu_smoke
    if gpu and torch.cuda.device_count() < RANKS:
        print(f"FAIL gpus: this node has {torch.cuda.device_count()} GPUs, the checks need {RANKS} (or --cpu-smoke)")
        return 1
    s = one.setup(gpu, os.path.abspath(args.out))
    shutil.rmtree(s.out, ignore_errors=True)
    os.makedirs(s.out)
    with open(os.path.join(s.out, "base.yaml"), "w") as f:
        f.write("mode: fuse\n")
    where = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if gpu else "CPU smoke (4 gloo ranks)"
    print(f"ntdist multi-GPU acceptance on {where}, torch {torch.__version__}, logs in {s.out}", flush=True)
    for fn in CHECKS:
        if args.only is None or fn.__name__ in args.only:
            fn(s)
    return one.print_table()


if __name__ == "__main__":
    sys.exit(main())
