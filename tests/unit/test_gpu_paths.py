"""The GPU code paths, checked on a CPU: fake GPU counts and launcher variables, patched `torch.cuda` functions,
the `meta` device standing in for a GPU, and collectives replaced by recorders.

Run: .venv/bin/python -m pytest tests/unit/test_gpu_paths.py
"""

import contextlib
import datetime
import gc
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import ntdist.commands.bench_train as bench_train
import ntdist.commands.fuse as fuse_module
import ntdist.distributed.comm as comm
import ntdist.distributed.devices as devices
import ntdist.distributed.tree as tree
import ntdist.distributed.world as world_module
import ntdist.pipeline as pipeline
import ntdist.stages.evaluate as evaluate
import ntdist.stages.members as members
import ntdist.stages.sync as sync
import ntdist.stages.vectorized as vectorized
import ntdist.training.loop as loop
import ntdist.training.state as state
from helpers import make_run
from ntdist.cli import main
from ntdist.distributed.launchers import detect, free_port
from ntdist.distributed.layout import MemberLayout
from ntdist.distributed.world import World, ensure_process_group, export_engine_variables
from ntdist.errors import UserError
from ntdist.fusion import reestimate_bn
from ntdist.fusion.diversity import summarize
from ntdist.images import Augment, ImageTensors
from ntdist.models import ModelSpec
from ntdist.models.weights import build_member
from ntdist.records.checkpoint import save_checkpoint
from ntdist.training.batches import LoaderBatches, eval_batches, loader_workers, train_batches
from ntdist.training.engines import _stage0_masters, restore_dtypes
from ntdist.training.optim import make_optimizer, make_scheduler
from ntdist.training.loop import labels_of, predict
from ntdist.training.teacher import ShardedTeacher

GPU0 = torch.device("cuda:0")
FUSE_SPEC = ModelSpec("mlp", {"input_dim": 16, "num_classes": 3, "width": 8})


def fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def srun_task(rank: int, tasks: int) -> dict:
    return {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_STEP_ID": "0",
            "SLURM_STEP_NUM_TASKS": str(tasks), "SLURM_STEP_TASKS_PER_NODE": str(tasks),
            "SLURM_STEP_NODELIST": "gpu01", "SLURM_JOB_ID": "9"}


# --- which device: the engines get ntdist's, no two ranks share one ---

@pytest.mark.parametrize("visible, device", [(1, 0), (2, 1)])
def test_the_engines_get_the_gpu_ntdist_chose_as_local_rank(monkeypatch, visible, device):
    """srun --gpus-per-task=1 shows each task one GPU: rank 1 trains on its cuda:0, and accelerate and DeepSpeed,
    which call set_device(LOCAL_RANK), must not ask for cuda:1 ("invalid device ordinal")."""
    fake_gpus(monkeypatch, visible)
    launcher, rank, size, local_rank, local_size, addr, port = detect(srun_task(1, 2))
    chosen = devices.training_device(local_rank)
    assert chosen == torch.device(f"cuda:{device}")
    world = World(rank=rank, local_rank=local_rank, size=size, local_size=local_size, device=chosen,
                  backend="nccl", launcher=launcher, master_addr=addr, master_port=port)
    environ = {}
    export_engine_variables(world, environ)
    assert environ["LOCAL_RANK"] == str(device) and environ["RANK"] == "1"
    under_torchrun = {"LOCAL_RANK": "1"}   # torchrun's own value is replaced, not refused
    export_engine_variables(world, under_torchrun)
    assert under_torchrun["LOCAL_RANK"] == str(device)
    with pytest.raises(UserError, match="LOCAL_RANK=5 in the environment"):
        export_engine_variables(world, {"LOCAL_RANK": "5"})


def test_ranks_sharing_a_gpu_are_refused_before_nccl_starts():
    store = dist.HashStore()
    store.set_timeout(datetime.timedelta(seconds=5))   # the check waits until every rank has published its GPU
    store.set("gpu/0", "gpu01 GPU-aaaa")
    store.set("gpu/1", "gpu01 GPU-bbbb")
    devices.check_own_gpu(store, 2, 3, "gpu02 GPU-aaaa")   # another host: another GPU
    devices.check_own_gpu(store, 1, 2, "gpu01 GPU-bbbb")   # another GPU of the node
    with pytest.raises(UserError, match="ranks 3 and 0 share GPU GPU-aaaa on gpu01 .2 ranks on it.*GPU of its own"):
        devices.check_own_gpu(store, 3, 4, "gpu01 GPU-aaaa")


def test_nccls_duplicate_gpu_error_is_not_reported_as_a_port_in_use(monkeypatch):
    def refuse(*args, **kwargs):
        raise dist.DistBackendError("NCCL error: invalid usage, Duplicate GPU detected : rank 1 and rank 0 both on "
                                    "CUDA device 1a000")
    monkeypatch.setattr(world_module.dist, "init_process_group", refuse)
    world = World(rank=0, size=2, backend="gloo", master_addr="127.0.0.1", master_port=free_port())
    with pytest.raises(UserError, match="Duplicate GPU detected.*GPU of its own") as err:
        world_module._join(world_module.DistributedConfig(rendezvous_timeout_s=5), {}, world)
    assert "port" not in str(err.value)


def test_one_process_deepspeed_on_a_gpu_gets_an_nccl_group(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)
    calls = []
    monkeypatch.setattr(world_module.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(world_module.dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    ensure_process_group(World(device=GPU0))
    ensure_process_group(World())
    assert [(b, kw["device_id"]) for b, kw in calls] == [("nccl", GPU0), ("gloo", None)]


# --- which device the collectives use ---

def test_comm_device_is_the_gpu_under_nccl_and_the_cpu_under_gloo():
    assert devices.comm_device(World(size=2, device=GPU0, backend="nccl")) == GPU0
    assert devices.comm_device(World(size=2, device=GPU0, backend="gloo")) == torch.device("cpu")
    assert devices.comm_device(World(size=2, backend="gloo")) == torch.device("cpu")


def _record(calls):
    def collective(tensor, *args, **kwargs):
        calls.append((tensor.device.type, tensor.dtype))
    return collective


class WithInt16(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.register_buffer("codes", torch.arange(4, dtype=torch.int16))


@pytest.mark.parametrize("backend, device, wire", [("gloo", GPU0, "cpu"), ("nccl", torch.device("meta"), "meta")])
def test_models_travel_on_the_comm_device_as_bytes(monkeypatch, backend, device, wire):
    """gloo sends only CPU tensors, also on a GPU machine; under NCCL (here `meta` plays the GPU) the wire is the
    training device. Tensors travel as bytes after an int64 header, so NCCL never sees int16, which it lacks."""
    calls = []
    monkeypatch.setattr(comm.dist, "send", lambda tensor, dst: calls.append((tensor.device.type, tensor.dtype)))
    monkeypatch.setattr(comm.dist, "recv", lambda tensor, src: None)
    world = World(rank=0, size=2, device=device, backend=backend)
    comm.send_model(world, WithInt16(), 1)
    assert {t for t, _ in calls} == {wire}
    assert {d for _, d in calls} == {torch.int64, torch.uint8}
    # a received model is materialised where fusion runs (the comm device), not on the CPU first
    dtypes = [t.dtype for t in WithInt16().state_dict().values()]
    monkeypatch.setattr(comm._Wire, "header", lambda self, tensors, count: dtypes)   # meta holds no header values
    received = comm.recv_model(world, comm.meta_template(WithInt16), 1)
    assert {t.device.type for t in received.state_dict().values()} == {wire}
    assert received.codes.dtype == torch.int16


def test_reductions_and_averaging_run_on_the_comm_device(monkeypatch):
    calls = []
    monkeypatch.setattr(world_module.dist, "all_reduce", _record(calls))
    world = World(size=2, device=GPU0, backend="gloo")
    world.reduce_sum(torch.zeros(3))
    world.any(True)
    assert [t for t, _ in calls] == ["cpu", "cpu"]
    average = tree.reduce_average(world, {0: FUSE_SPEC.build()}, [0, 1], FUSE_SPEC.build)
    assert {t for t, _ in calls} == {"cpu"} and tree.fusion_device(world) == torch.device("cpu")
    assert {t.device.type for t in average.state_dict().values()} == {"cpu"}


@pytest.mark.parametrize("backend, device", [("gloo", torch.device("cpu")), ("nccl", torch.device("meta"))])
def test_the_sharded_teachers_collectives_get_comm_device_tensors(monkeypatch, backend, device):
    calls = []
    monkeypatch.setattr(dist, "all_gather_single", _record(calls))
    monkeypatch.setattr(dist, "reduce_scatter_single", _record(calls))
    world = World(rank=1, size=2, device=GPU0 if backend == "gloo" else device, backend=backend)
    layout = MemberLayout(2, 2)
    teacher = ShardedTeacher(world, layout, {1: nn.Linear(3, 4).to(device)}, capacity=5)
    assert teacher.chunks == slice(0, 2, 1)   # a slice, not a list: no index copied to the GPU per batch
    out = teacher(torch.randn(3, 3, device=device))
    assert out.shape == (3, 4) and out.device.type == device.type
    assert [t for t, _ in calls] == [devices.comm_device(world).type] * 2


# --- waits and timings wait for the GPU ---

def test_wait_for_waits_for_the_gpu_before_the_barrier(monkeypatch):
    order = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: order.append(("synchronize", device)))
    monkeypatch.setattr(world_module.dist, "barrier", lambda group=None: order.append(("barrier", group)))
    World(size=2, device=GPU0, backend="nccl", waits="the wait group").wait_for("a step")
    assert order == [("synchronize", GPU0), ("barrier", "the wait group")]
    order.clear()
    World(size=2, backend="gloo", waits="the wait group").wait_for("a step")
    assert order == [("barrier", "the wait group")]


def test_fuse_stage_gives_the_example_inputs_on_the_fusion_device_and_times_after_a_sync(tmp_path, monkeypatch):
    """`meta` plays the GPU the members are fused on: the traces (capture, torch_pruning) get inputs there."""
    run = make_run(tmp_path, "fusion.k=2", "fusion.methods=[nt,ot,avg]", "fusion.schedule=recursive")
    seen = []

    def fake(world, held, holders, make_template, *args, **options):
        inputs = options.get("example_inputs", args[0] if args else None)
        seen.append(inputs.device.type)
        return make_template()
    for name in ("tree_fuse", "ot_reduce", "gather_fuse"):
        monkeypatch.setattr(pipeline, name, fake)
    monkeypatch.setattr(pipeline, "fusion_device", lambda world: torch.device("meta"))
    synced = []
    monkeypatch.setattr(pipeline, "synchronize", synced.append)
    for method in ("nt", "ot"):
        pipeline.fuse_stage(run, {}, method)
    assert seen == ["meta", "meta"] and synced == [torch.device("meta")] * 2
    run.rundir.release()


def test_ntdist_fuse_reads_its_timing_after_a_device_sync(tmp_path, monkeypatch):
    paths = []
    for seed in range(2):
        torch.manual_seed(seed)
        paths.append(str(tmp_path / f"m{seed}.safetensors"))
        save_checkpoint(paths[-1], FUSE_SPEC.build(), FUSE_SPEC)
    synced = []
    monkeypatch.setattr(fuse_module, "synchronize", synced.append)
    assert main(["fuse", *paths, "-o", str(tmp_path / "fused.safetensors")]) == 0
    assert synced == [torch.device("cpu")]


# --- data reaches the model's device ---

def test_bn_reestimation_moves_dataloader_batches_to_the_model():
    """A DataLoader's CPU batches reach a CUDA model: the batch (a stand-in that records where it is sent) goes
    to the device of the model's statistics first."""
    sent = []

    class Batch:
        def to(self, device):
            sent.append(torch.device(device))
            return torch.randn(5, 3)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    reestimate_bn(model, [(Batch(), None)] * 3, 2)
    assert sent == [torch.device("cpu")] * 2 and int(model[1].num_batches_tracked) == 2


def test_loader_workers_default_to_some_with_cuda_and_none_on_a_cpu():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert loader_workers(None, "cuda:0") == 2 and loader_workers(None, "cpu") == 0
        torch.set_num_threads(16)
        assert loader_workers(None, "cuda:0") == 4 and loader_workers(3, "cuda:0") == 3 and loader_workers(0, "cuda") == 0
    finally:
        torch.set_num_threads(threads)


def test_dataloader_images_are_augmented_on_the_training_device():
    images = ImageTensors(torch.randint(0, 255, (10, 3, 8, 8), dtype=torch.uint8), torch.arange(10) % 2,
                          (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), Augment(padding=2, flip=True))
    on_cpu = LoaderBatches(images, 4, seed=0)
    on_meta = LoaderBatches(images, 4, seed=0, device="meta")
    for loader in (on_cpu, on_meta):
        loader.set_epoch(1)
    cpu_batches, meta_batches = list(on_cpu), list(on_meta)
    assert [x.device.type for x, _ in meta_batches] == ["meta"] * 3
    assert [x.shape for x, _ in meta_batches] == [x.shape for x, _ in cpu_batches]


# --- the vectorised members' memory check ---

def test_a_probe_step_that_runs_out_of_memory_falls_back_to_one_after_another(tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path, "fusion.k=4", "train.epochs=1", "train.vectorize=auto", "data.batch_size=16")
    probed = []

    def out_of_memory(base):
        def forward(params, buffers, x):
            probed.append((x.shape, {p.device.type for p in base.parameters()}))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward
    monkeypatch.setattr(vectorized, "stacked_forward", out_of_memory)
    built, build = [], members.build_member

    def build_member(*args, **kwargs):
        model = build(*args, **kwargs)
        built.append(weakref.ref(model))
        return model
    monkeypatch.setattr(members, "build_member", build_member)
    freed, train_one = [], members.train_member

    def train_member(*args, **kwargs):
        gc.collect()
        freed.append(all(ref() is None for ref in built[:4]))   # the vectorised attempt's 4 models are gone
        return train_one(*args, **kwargs)
    monkeypatch.setattr(members, "train_member", train_member)
    trained = members.train_members(run, [0, 1, 2, 3], {})
    assert sorted(trained) == [0, 1, 2, 3] and freed == [True] * 4
    assert probed == [(torch.Size([4, 16, 1, 8, 8]), {"meta"})]   # a whole batch per member; the base on meta
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ntdist:")]
    assert lines == ["ntdist: training members [0, 1, 2, 3] one after another: one vectorised step of 4 members on a "
                     "batch of 16 does not fit (CUDA out of memory. Tried to allocate 2.00 GiB)"]
    run.rundir.release()


# --- sync mode ---

def test_sync_merges_the_replicas_where_they_train_and_reads_the_loss_once_per_epoch(tmp_path, monkeypatch):
    run = make_run(tmp_path, "mode=sync", "fusion.k=2", "sync.methods=[nt]", "sync.every=1", "sync.unit=epoch",
                   "train.epochs=2", "data.batch_size=64")
    handed = []

    def tree_fuse(world, held, holders, make_template, options, example_inputs=None, **more):
        handed.append({t.device for m in held.values() for t in m.state_dict().values()} | {example_inputs.device})
        return held[0]
    monkeypatch.setattr(sync, "tree_fuse", tree_fuse)
    reads, item = [], torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(1) or item(self))
    history = sync.train_synced(run, "nt", {})
    assert len(history) == 2 and handed == [{sync.fusion_device(run.world)}] * 2
    steps = 2 * -(-len(run.splits.train) // 64)
    assert len(reads) < steps   # was: one per replica and step
    run.rundir.release()


# --- resume on several GPUs ---

def test_each_rank_saves_and_restores_its_own_gpus_generator(tmp_path, monkeypatch):
    fake_gpus(monkeypatch, 8)
    generators = {d: torch.full((16,), d, dtype=torch.uint8) for d in range(8)}
    restored = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": generators[device].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda new, device="cuda": restored.append((new.tolist(), device)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's generator was read"))
    model = nn.Linear(2, 2)
    optimizer = make_optimizer(model, make_run(tmp_path / "cfg").cfg.train)
    scheduler = make_scheduler(optimizer, make_run(tmp_path / "cfg2").cfg.train)
    path = str(tmp_path / "s.safetensors")
    state.save_state(path, model, make_run(tmp_path / "cfg3").spec, optimizer, scheduler, 0, [])
    fake_gpus(monkeypatch, 2)                       # resumed where the process sees another number of GPUs
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    state.load_state(path, model, optimizer, scheduler, 5)
    assert restored == [([3] * 16, 1)]              # the writer's own generator, into this rank's GPU


# --- member evaluation without [k, N, classes] logits ---

def test_member_evaluation_equals_the_old_computation_over_all_logits(tmp_path):
    run = make_run(tmp_path, "fusion.k=9", "output.diversity=true")
    held = {i: build_member(run.spec, 100 + i) for i in range(9)}   # 9: torch's mean over k rows is no plain loop
    got = evaluate.evaluate_members(run, held)
    batch, splits = run.cfg.data.eval_batch_size, run.splits
    val, test = eval_batches(splits.val, batch), eval_batches(splits.test, batch)
    # the computation before: every member's float64 logits, [k, N, classes]
    val_logits = torch.stack([predict(held[i], val, "cpu").double() for i in range(9)])
    test_logits = torch.stack([predict(held[i], test, "cpu").double() for i in range(9)])
    val_y, test_y = labels_of(val), labels_of(test)
    members_val = (val_logits.argmax(2) == val_y).double().mean(1)
    assert got.members == (test_logits.argmax(2) == test_y).double().mean(1).tolist()
    assert got.members_val == members_val.tolist() and got.best_member_index == int(torch.argmax(members_val))
    assert got.ensemble == (test_logits.mean(0).argmax(1) == test_y).double().mean().item()
    assert got.ensemble_val == (val_logits.mean(0).argmax(1) == val_y).double().mean().item()
    summed, _ = evaluate.member_outputs(held, test, (9, len(splits.test), splits.num_classes), "cpu")
    assert torch.equal(summed / 9, test_logits.mean(0))   # bit for bit, not only the same argmax
    old = summarize(list(test_logits), got.diversity["duplicate_fraction"], got.diversity["threshold"])
    assert got.diversity == old
    run.rundir.release()


# --- host syncs ---

def test_a_progress_bar_reads_the_loss_at_most_once_a_second(tmp_path, monkeypatch):
    run = make_run(tmp_path, "data.batch_size=16")
    monkeypatch.setattr(loop.sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(loop, "BAR_LOSS_EVERY_S", 3600.0)
    model = build_member(run.spec, 0)
    batches = train_batches(run.splits.train, 16, 0, max_mb=1e9)
    batches.set_epoch(1)
    reads, item = [], torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(1) or item(self))
    loop.train_epoch(model, batches, make_optimizer(model, run.cfg.train), "cpu")
    assert len(batches) > 10 and len(reads) == 2   # the bar's first loss and the epoch's mean; was one per step
    run.rundir.release()


def test_every_side_of_bench_train_runs_with_the_same_tf32_setting(tmp_path, monkeypatch):
    entered = []

    @contextlib.contextmanager
    def tf32(enabled, device):
        entered.append(enabled)
        yield
    monkeypatch.setattr(bench_train, "tf32", tf32)
    monkeypatch.setattr(members, "tf32", tf32)
    bench_train.bench_train(["mlp-digits"], ks=[1], batches=[256], epochs=1, repeats=1,
                            out_csv=str(tmp_path / "bench.csv"))
    assert entered == [True] * 10   # floor, epoch loop, ntdist, one by one, DataLoader: warm-up and timed


# --- DeepSpeed's half-precision module, saved ---

def test_a_half_precision_module_gets_its_masters_and_dtypes_back():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    dtypes = {name: t.dtype for name, t in model.state_dict().items()}
    masters = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    model.bfloat16()   # what DeepSpeed does with bf16 on
    by_id = {id(p): masters[name] for name, p in model.named_parameters()}
    restore_dtypes(model, dtypes, lambda p: by_id.get(id(p)) if p.shape != (4,) else None)
    assert {name: t.dtype for name, t in model.state_dict().items()} == dtypes
    assert torch.equal(model[0].weight, masters["0.weight"])                          # the fp32 master itself
    assert torch.equal(model[1].weight, model[1].weight.bfloat16().float())           # no master: cast up
    assert "running_mean" in dict(model[1].named_buffers()) and model(torch.randn(2, 3)).dtype == torch.float32


def test_deepspeeds_stage0_masters_are_found_per_parameter_and_in_flat_groups():
    low = [nn.Parameter(torch.zeros(2, 3, dtype=torch.bfloat16)), nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))]
    high = [torch.randn(2, 3), torch.randn(4)]

    class Unfused:
        fp16_groups, fp32_groups = [low], [high]

    class Fused:
        fp16_groups, fp32_groups_flat = [low], [torch.cat([t.reshape(-1) for t in high])]
    for optimizer in (Unfused(), Fused()):
        found = _stage0_masters(optimizer)
        assert all(torch.equal(found[id(p)], q) for p, q in zip(low, high))
    assert _stage0_masters(torch.optim.SGD(low, lr=0.1)) == {}
