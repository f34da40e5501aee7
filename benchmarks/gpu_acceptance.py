"""The checks of `benchmarks/gpu_acceptance.sh` (one GPU, or `--cpu-smoke`: the same checks on the CPU, tiny).

    .venv/bin/python benchmarks/gpu_acceptance.py [--cpu-smoke] [--out DIR]

Runs `ntdist run` in this process (one CUDA start-up for all), the multi-rank checks under torchrun with hard
timeouts, and prints one table: a PASS, FAIL or SKIP row per check with its figures; exits 1 on any FAIL.
Synthetic data only. Every tolerance is stated in the check that uses it.
"""

import argparse
import contextlib
import copy
import dataclasses
import glob
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback

import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Setup:
    """Sizes and tolerances of one mode."""

    gpu: bool
    out: str
    data: list          # dotted overrides of the data and the model
    model: list
    threads: int
    timeout: int        # seconds for a torchrun check
    vector_tol: float   # vectorised against one after another: max relative difference of an MLP member's tensors
    fusion_tol: float   # the same fusion on the GPU and on the CPU


def setup(gpu: bool, out: str) -> Setup:
    if gpu:
        return Setup(True, out, ["data.name=synthetic", "data.synthetic_shape=[3,32,32]", "data.synthetic_samples=2048",
                                 "data.batch_size=64", "train.epochs=2", "finetune.epochs=1"],
                     ["model.name=resnet18", "model.kwargs.width=16"], 8, 300, 1e-4, 1e-3)
    return Setup(False, out, ["data.name=synthetic", "data.synthetic_shape=[3,8,8]", "data.synthetic_samples=512",
                              "data.batch_size=32", "train.epochs=1", "finetune.epochs=1"],
                 ["model.name=resnet18", "model.kwargs.width=4"], 1, 180, 1e-5, 1e-6)


ROWS = []


def row(name, status, figures=""):
    ROWS.append((name, status, figures))
    print(f"{status:4s} {name}: {figures}", flush=True)


def check(fn):
    """Run one check; any exception is a FAIL with its first line (the log names the rest)."""
    def run(s: Setup):
        start = time.perf_counter()
        try:
            fn(s)
        except Exception as err:  # noqa: BLE001 - one failed check must not stop the others
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            row(fn.__name__, "FAIL", f"{type(err).__name__}: {first}")
            with open(os.path.join(s.out, f"{fn.__name__}.log"), "a") as f:
                f.write(traceback.format_exc())
        finally:
            print(f"     ({fn.__name__}: {time.perf_counter() - start:.1f} s)", flush=True)
    run.__name__ = fn.__name__
    return run


def ntdist(s: Setup, name: str, *args) -> int:
    """`ntdist ARGS` in this process, its output in OUT/NAME.log; returns its exit code."""
    from ntdist import preempt
    from ntdist.cli import main
    with open(os.path.join(s.out, f"{name}.log"), "a") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        code = main([str(a) for a in args])
    preempt._requested = False   # a SIGTERM of this run is not the next run's
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return code


def run(s: Setup, name: str, *overrides, model=None, expect=0) -> str:
    """`ntdist run` of the mode's data and model with `overrides` into OUT/NAME; returns the run directory."""
    out = os.path.join(s.out, name)
    base = os.path.join(s.out, "base.yaml")
    code = ntdist(s, name, "run", base, *s.data, *(model or s.model), "finetune.control=false",
                  "output.diversity=false", f"distributed.threads_per_rank={s.threads}", f"output.dir={out}",
                  "--overwrite", *overrides)
    if code != expect:
        raise AssertionError(f"exit {code}, expected {expect} (log {out}.log)")
    return out


def results(out: str) -> dict:
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def example(s: Setup) -> torch.Tensor:
    """Two random inputs of the mode's synthetic shape: what fusion traces the model with."""
    shape = next(o for o in s.data if o.startswith("data.synthetic_shape=")).split("=")[1]
    return torch.randn(2, *json.loads(shape))


def finite_accuracies(out: str, s: Setup) -> dict:
    r = results(out)
    device = (r.get("world") or {}).get("device", "?")
    if s.gpu and not device.startswith("cuda"):
        raise AssertionError(f"ran on {device}, not on the GPU")
    accs = {"best member": r["best_member"], **{m: v["post_fusion"] for m, v in r["fusion"].items()}}
    accs.update({f"{m} tuned": v["finetune"][-1] for m, v in r["fusion"].items() if v["finetune"]})
    if not all(math.isfinite(a) for a in accs.values()):
        raise AssertionError(f"accuracies not finite: {accs}")
    return accs


def max_rel_diff(a: dict, b: dict) -> float:
    """The largest difference of two state dicts' float tensors, relative to each tensor's largest value (at least
    1e-3, so that a tensor near zero, a fresh BatchNorm bias, does not make noise look large)."""
    assert a.keys() == b.keys(), "different tensors"
    worst = 0.0
    for key, value in a.items():
        if value.is_floating_point():
            scale = b[key].double().abs().max().clamp_min(1e-3)
            worst = max(worst, ((value.double() - b[key].double()).abs().max() / scale).item())
        elif not torch.equal(value, b[key]):
            worst = math.inf
    return worst


def checkpoints(out: str) -> dict:
    files = sorted(glob.glob(os.path.join(out, "checkpoints", "*.safetensors")))
    return {os.path.basename(p): load_file(p) for p in files}


@check
def every_stage(s: Setup):
    """nt, avg and ot, each repaired, the diversity check, distillation, BN re-estimation on resident data, then
    NT's repair and BN re-estimation on DataLoader batches (data.resident_max_mb=0)."""
    out = run(s, "every_stage", "fusion.methods=[nt,avg,ot]", "output.diversity=true", "finetune.distill=true",
              "fusion.bn_reestimate=true", "fusion.repair=lstsq")
    accs = finite_accuracies(out, s)
    loader = run(s, "loader", "fusion.methods=[nt]", "fusion.bn_reestimate=true", "fusion.repair=lstsq",
                 "data.resident_max_mb=0")
    finite_accuracies(loader, s)
    r = results(out)
    row("every_stage", "PASS", f"train {r['train_seconds']:.1f} s, fuse "
        + ", ".join(f"{m} {v['fuse_seconds']:.2f} s" for m, v in r["fusion"].items())
        + f"; accuracy {', '.join(f'{k} {v:.3f}' for k, v in accs.items())}")


@check
def resident_vs_loader(s: Setup):
    """Resident tensors and a DataLoader give the same members (train.deterministic; max relative difference 1e-6)."""
    a = run(s, "resident_det", "fusion.methods=[avg]", "finetune.epochs=0", "train.deterministic=true",
            "train.vectorize=off")
    b = run(s, "loader_det", "fusion.methods=[avg]", "finetune.epochs=0", "train.deterministic=true",
            "train.vectorize=off", "data.resident_max_mb=0")
    worst = max(max_rel_diff(checkpoints(a)[f"member{i}.safetensors"], checkpoints(b)[f"member{i}.safetensors"])
                for i in range(2))
    row("resident_vs_loader", "PASS" if worst <= 1e-6 else "FAIL", f"members' max relative difference {worst:.1e} "
        "(tolerance 1e-6)")


VECTOR_MODEL = ["model.name=mlp", "model.kwargs.width=64"]
LOSS_TOL = 2e-2   # BatchNorm nets: a member's last training loss, at once against one after another (relative)


def member_losses(out: str) -> dict:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["member"]: r["loss"] for r in records if r.get("stage") == "member"}


@check
def vectorised(s: Setup):
    """k=4 members trained at once against one after another for one epoch (TF32 off, LR 0.01): an MLP's weights
    within `vector_tol`; a BatchNorm ResNet-18's last losses within LOSS_TOL (float32 drift grows through
    BatchNorm over small spatial sizes, so its weights are not compared)."""
    common = ["fusion.k=4", "fusion.methods=[avg]", "finetune.epochs=0", "train.tf32=false", "train.lr=0.01",
              "train.epochs=1"]
    worst, loss_gap, times = 0.0, 0.0, []
    for name, model in (("mlp", VECTOR_MODEL), ("bn", None)):
        on = run(s, f"vector_{name}_on", *common, "train.vectorize=on", model=model)
        off = run(s, f"vector_{name}_off", *common, "train.vectorize=off", model=model)
        with open(os.path.join(s.out, f"vector_{name}_on.log")) as f:
            if "one after another" in f.read():
                raise AssertionError(f"train.vectorize=on fell back to one after another (log vector_{name}_on.log)")
        if name == "mlp":
            a, b = checkpoints(on), checkpoints(off)
            worst = max(max_rel_diff(a[f"member{i}.safetensors"], b[f"member{i}.safetensors"]) for i in range(4))
        else:
            la, lb = member_losses(on), member_losses(off)
            loss_gap = max(abs(la[i] - lb[i]) / abs(lb[i]) for i in range(4))
            times = [results(on)["train_seconds"], results(off)["train_seconds"]]
    row("vectorised", "PASS" if worst <= s.vector_tol and loss_gap <= LOSS_TOL else "FAIL",
        f"MLP weights: max relative difference {worst:.1e} (tolerance {s.vector_tol:g}); BatchNorm ResNet-18 losses: "
        f"{loss_gap:.1e} (tolerance {LOSS_TOL:g}); train {times[0]:.1f} s at once, {times[1]:.1f} s one after another")


@check
def precisions(s: Setup):
    """bf16 and fp16 autocast (fp16 with its grad scaler) in member training and fine-tuning."""
    figures = []
    for p in ("bf16", "fp16"):
        out = run(s, p, f"train.precision={p}", f"finetune.precision={p}", "fusion.methods=[nt]")
        accs = finite_accuracies(out, s)
        figures.append(f"{p}: nt tuned {accs.get('nt tuned', float('nan')):.3f}, "
                       f"train {results(out)['train_seconds']:.1f} s")
    row("precisions", "PASS", "; ".join(figures))


@check
def compiled(s: Setup):
    """torch.compile for member training and fine-tuning."""
    if not s.gpu:
        return row("compiled", "SKIP", "inductor compiles C++ for minutes on a CPU (tests/multiproc/test_compile.py)")
    out = run(s, "compile", "train.compile=true", "finetune.compile=true", "fusion.methods=[nt]",
              model=["model.name=lenet"])
    accs = finite_accuracies(out, s)
    row("compiled", "PASS", f"train {results(out)['train_seconds']:.1f} s, nt tuned {accs['nt tuned']:.3f}")


@check
def sigterm_resume(s: Setup):
    """SIGTERM at the 7th training batch stops at batch 8 (exit 3); --resume gives every checkpoint bit for bit
    as an uninterrupted run (train.deterministic)."""
    import ntdist.stages.members as members
    common = ["train.checkpoint_every_steps=4", "train.deterministic=true", "train.vectorize=off",
              "fusion.methods=[avg]", "finetune.checkpoint_every_steps=4"]
    reference = run(s, "uninterrupted", *common)
    build, calls = members.build_member, []

    def armed(*args, **kwargs):
        model = build(*args, **kwargs)

        def hook(module, inputs):
            calls.append(1)
            if len(calls) == 7:
                os.kill(os.getpid(), signal.SIGTERM)
        model.register_forward_pre_hook(hook)
        return model
    members.build_member = armed
    try:
        killed = run(s, "resumed", *common, expect=3)
    finally:
        members.build_member = build
    from ntdist.records.checkpoint import read_checkpoint
    out = os.path.join(s.out, "resumed")
    state = read_checkpoint(os.path.join(out, "checkpoints", "member0.state.safetensors"))[0]["info"]
    stopped = state.get("position", {}).get("step")
    assert stopped == 8, f"the state after SIGTERM holds step {stopped} of epoch 1, not 8"
    code = ntdist(s, "resumed", "run", os.path.join(s.out, "base.yaml"), *s.data, *s.model, "finetune.control=false",
                  "output.diversity=false", f"distributed.threads_per_rank={s.threads}", f"output.dir={out}",
                  "--resume", *common)
    assert code == 0 and killed == out, f"--resume exited {code} (log {out}.log)"
    a, b = checkpoints(reference), checkpoints(out)
    differ = [f"{f}:{k}" for f in a for k in a[f] if not torch.equal(a[f][k], b[f][k])]
    row("sigterm_resume", "FAIL" if differ or a.keys() != b.keys() else "PASS",
        f"stopped at batch {stopped} of epoch 1 (exit 3); {len(a)} checkpoints compared bit for bit after --resume; "
        f"differing tensors: {', '.join(differ[:3]) or 'none'}")


def _fuse_models(k: int, device: str, s: Setup):
    from ntdist.models import ModelSpec
    spec = ModelSpec("torchvision:resnet50", {"num_classes": 10}) if s.gpu else \
        ModelSpec("resnet18", {"width": 8, "num_classes": 10})
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(spec.build().eval().to(device))
    return spec, models


@check
def fusion_on_device(s: Setup):
    """ResNet-50 (CPU smoke: a width-8 ResNet-18) fused by NT at k=2 and 4 on the GPU, against a plain copy of
    the members and against the same fusion on the CPU (max relative difference `fusion_tol`); peak device
    memory beside the dry run's model of it."""
    from ntdist.distributed import costs
    from ntdist.distributed.layout import MemberLayout
    from ntdist.fusion import fuse
    device = "cuda" if s.gpu else "cpu"
    figures, worst = [], 0.0
    for k in (2, 4):
        spec, models = _fuse_models(k, device, s)
        x = torch.randn(2, 3, 32, 32, device=device)
        sync = torch.cuda.synchronize if s.gpu else (lambda: None)

        def timed(fn):
            fn()   # warm-up
            sync()
            start = time.perf_counter()
            result = fn()
            sync()
            return result, time.perf_counter() - start
        _, copy_s = timed(lambda: [copy.deepcopy(m) for m in models])
        if s.gpu:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        fused, nt_s = timed(lambda: fuse(models, schedule="recursive", example_inputs=x))
        size = costs.MemberSize.of(models[0])
        predicted = costs.tree_peaks(MemberLayout(k, 1), size)[0] / size.state_bytes
        peak = (torch.cuda.max_memory_allocated() - base) / size.state_bytes if s.gpu else None
        cpu_models = [m.cpu() for m in models]
        on_cpu = fuse(cpu_models, schedule="recursive", example_inputs=x.cpu())
        worst = max(worst, max_rel_diff({k_: v.cpu() for k_, v in fused.state_dict().items()}, on_cpu.state_dict()))
        measured = f"{peak:.2f} x member" if s.gpu else "needs CUDA"
        figures.append(f"k={k}: copy {copy_s:.3f} s, nt {nt_s:.3f} s ({nt_s / max(copy_s, 1e-9):.1f} x copy), "
                       f"peak {measured} (dry run {predicted:.2f} x)")
    row("fusion_on_device", "PASS" if worst <= s.fusion_tol else "FAIL",
        "; ".join(figures) + f"; device against CPU: max relative difference {worst:.1e} (tolerance {s.fusion_tol:g})")


@check
def fuse_command(s: Setup):
    """`ntdist fuse --device cuda` of two members of the every_stage run, against `--device cpu`."""
    members = [os.path.join(s.out, "every_stage", "checkpoints", f"member{i}.safetensors") for i in range(2)]
    device = "cuda" if s.gpu else "cpu"
    a, b = os.path.join(s.out, "fused_device.safetensors"), os.path.join(s.out, "fused_cpu.safetensors")
    for target, dev in ((a, device), (b, "cpu")):
        code = ntdist(s, "fuse_command", "fuse", "--device", dev, "--force", "-o", target, *members)
        assert code == 0, f"ntdist fuse --device {dev} exited {code} (log fuse_command.log)"
    worst = max_rel_diff(load_file(a), load_file(b))
    row("fuse_command", "PASS" if worst <= s.fusion_tol else "FAIL",
        f"--device {device} against --device cpu: max relative difference {worst:.1e} (tolerance {s.fusion_tol:g})")


def run_command(cmd, log_path: str, timeout: float):
    """`cmd` in its own process group with its output in `log_path`; its exit code, or None when it ran past
    `timeout` seconds: then the group gets SIGTERM (torchrun stops its ranks) and, 30 s later, SIGKILL."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return None


def torchrun(s: Setup, name: str, nproc: int, *overrides, timeout=None):
    """`torchrun --standalone --nproc_per_node=N -m ntdist run ...`: (exit code or None on timeout, seconds)."""
    out = os.path.join(s.out, name)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "ntdist", "run", os.path.join(s.out, "base.yaml"), *s.data, *s.model, "finetune.control=false",
           "output.diversity=false", f"distributed.threads_per_rank={s.threads}", f"output.dir={out}",
           "--overwrite", *overrides]
    start = time.perf_counter()
    code = run_command(cmd, f"{out}.log", timeout or s.timeout)
    return code, time.perf_counter() - start


@check
def ranks_on_one_device(s: Setup):
    """Two ranks with gloo on one GPU (CPU smoke: on the CPU) through the tree, OT and the sharded teacher."""
    code, seconds = torchrun(s, "gloo2", 2, "distributed.backend=gloo", "fusion.methods=[nt,ot]",
                             "finetune.distill=true")
    assert code == 0, f"exit {code} after {seconds:.0f} s (log gloo2.log)"
    accs = finite_accuracies(os.path.join(s.out, "gloo2"), s)
    row("ranks_on_one_device", "PASS", f"2 gloo ranks, {seconds:.0f} s; nt tuned {accs['nt tuned']:.3f}")


@check
def nccl_two_ranks_one_gpu(s: Setup):
    """NCCL with two ranks on one GPU cannot work: it must end within 120 s with one `ntdist: error` line."""
    if not s.gpu:
        return row("nccl_two_ranks_one_gpu", "SKIP", "needs CUDA")
    code, seconds = torchrun(s, "nccl2", 2, "distributed.backend=nccl", "distributed.rendezvous_timeout_s=60",
                             "distributed.timeout_s=60", timeout=120)
    with open(os.path.join(s.out, "nccl2.log")) as f:
        lines = [line.strip() for line in f if line.startswith("ntdist: ")]
    ok = code not in (None, 0) and lines
    row("nccl_two_ranks_one_gpu", "PASS" if ok else "FAIL",
        f"exit {code} after {seconds:.0f} s; " + (lines[0][:140] if lines else "no ntdist: line (log nccl2.log)"))


@check
def bench_train(s: Setup):
    """`ntdist bench train` against the tight loop; on the GPU ntdist's epoch loop must reach 0.8 of the floor."""
    from ntdist.commands.bench_train import bench_train as bench
    csv = os.path.join(s.out, "bench_train.csv")
    with open(os.path.join(s.out, "bench_train.log"), "w") as log, contextlib.redirect_stdout(log):
        rows = bench(["lenet-synthetic32"], [1, 4], [256], 2, 3, csv) if s.gpu else \
            bench(["mlp-digits"], [1], [64], 1, 1, csv)
    first = rows[0]
    figures = "; ".join(f"k={r['k']}: floor {r['floor samples/s']} samples/s, ntdist / floor {r['ntdist / floor']}, "
                        f"epoch loop / floor {r['epoch loop / floor']}" for r in rows)
    passed = not s.gpu or first["epoch loop / floor"] >= 0.8
    row("bench_train", "PASS" if passed else "FAIL", figures + ("" if s.gpu else " (CPU smoke: not judged)"))


@check
def dry_run_memory(s: Setup):
    """The dry run's member-training memory (weights + gradients + optimizer state + activations) against
    torch.cuda.max_memory_allocated over three steps; within 0.75-1.5 x."""
    import torch.nn.functional as F
    from ntdist.commands.dryrun_plan import make_plan
    from ntdist.distributed import costs
    from ntdist.training.optim import make_optimizer
    plan = make_plan(os.path.join(s.out, "base.yaml"), [*s.data, *s.model], 1)
    predicted = sum(n for _, n in costs.step_memory(plan.size, plan.activations or 0,
                                                    buffers=len(plan.cfg.train.state_buffers)))
    if not s.gpu:
        return row("dry_run_memory", "SKIP", f"dry run {predicted / 1e6:.1f} MB; the measurement needs CUDA")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = plan.spec.build().cuda()
    optimizer = make_optimizer(model, plan.cfg.train)
    x = torch.randn(plan.cfg.data.batch_size, *plan.in_shape, device="cuda")
    y = torch.randint(0, plan.classes, (plan.cfg.data.batch_size,), device="cuda")
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    measured = torch.cuda.max_memory_allocated() - base
    ratio = measured / predicted
    row("dry_run_memory", "PASS" if 0.75 <= ratio <= 1.5 else "FAIL",
        f"measured {measured / 1e6:.1f} MB, dry run {predicted / 1e6:.1f} MB ({ratio:.2f} x)")


CHECKS = [every_stage, resident_vs_loader, vectorised, precisions, compiled, sigterm_resume, fusion_on_device,
          fuse_command, ranks_on_one_device, nccl_two_ranks_one_gpu, bench_train, dry_run_memory]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="every check that runs on a CPU, tiny")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu_acceptance"))
    parser.add_argument("--only", nargs="*", default=None, help="run only these checks")
    args = parser.parse_args()
    gpu = not args.cpu_smoke
    if gpu and not torch.cuda.is_available():
        print("FAIL cuda: torch.cuda.is_available() is False (use --cpu-smoke on a machine without a GPU)")
        return 1
    s = setup(gpu, os.path.abspath(args.out))
    shutil.rmtree(s.out, ignore_errors=True)
    os.makedirs(s.out)
    with open(os.path.join(s.out, "base.yaml"), "w") as f:
        f.write("mode: fuse\n")
    torch.set_num_threads(s.threads)
    device = torch.cuda.get_device_name(0) if gpu else "CPU smoke (tiny sizes)"
    print(f"ntdist acceptance on {device}, torch {torch.__version__}, logs in {s.out}", flush=True)
    for fn in CHECKS:
        if args.only is None or fn.__name__ in args.only:
            fn(s)
    return print_table()


def print_table() -> int:
    """The table of every row so far (markdown, for docs/PERFORMANCE.md), then the verdict; 1 on any FAIL."""
    width = max((len(name) for name, _, _ in ROWS), default=5)
    print("\n| check | result | figures |\n| --- | --- | --- |")
    for name, status, figures in ROWS:
        print(f"| {name:{width}s} | {status} | {re.sub(r'[|]', '/', figures)} |")
    failed = [name for name, status, _ in ROWS if status == "FAIL"]
    print(f"\noverall: {'FAIL (' + ', '.join(failed) + ')' if failed else 'PASS'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
