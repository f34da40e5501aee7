"""`ntdist run CONFIG --dry-run --world-size W [--gpus-per-node G]`: a run's layout and costs, without running it.

Prints, for the plan of `dryrun_plan` (the real run's checks passed), who trains which member, the fusion
rounds with the bytes each rank moves (`ntdist.distributed.costs`), the fine-tuning batch and LR, the memory of
each stage per rank and the checkpoint sizes: one labelled section per stage, lines wrapped at WIDTH.
docs/PERFORMANCE.md shows this text verbatim ("Scale"); `tests/unit/test_dryrun.py` keeps the two equal.
"""

import math
import textwrap
from typing import Dict, List, Optional

from ntdist.commands.dryrun_plan import Plan, make_plan
from ntdist.distributed import costs
from ntdist.training.config import scaled_lr
from ntdist.training.teacher import use_sharded

def dry_run_command(config_path: str, overrides: List[str], world_size: int, gpus_per_node: Optional[int]) -> int:
    print(render(make_plan(config_path, overrides, world_size, gpus_per_node), config_path))
    return 0


WIDTH = 110   # the report's lines are wrapped to this width, continued with a deeper indent


def render(plan: Plan, config_path: str) -> str:
    """The dry run's report, one section per stage."""
    lines = _header(plan, config_path) + _layout(plan) + _fusion(plan) + _finetune(plan) + _memory(plan) \
        + _files(plan)
    return "\n".join(part for line in lines for part in textwrap.wrap(
        line, WIDTH, subsequent_indent=" " * 10, break_long_words=False, break_on_hyphens=False))


def size_text(n: float) -> str:
    """Bytes in decimal units with three significant digits: 9.73 kB, 102 MB, 4.08 GB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"
    return f"{int(n)} B"


def count_text(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return str(n)


def _header(plan: Plan, config_path: str) -> List[str]:
    w, g, cfg, size = plan.layout.world_size, plan.gpus_per_node, plan.cfg, plan.size
    nodes = f", {math.ceil(w / g)} node{'s' * (w > g)} of {g}" if g else ""
    resident = [name for name, n in plan.splits.items() if _resident(plan, n)]
    where = (f"resident on the device: {', '.join(resident)}" if resident else "none resident") + \
        f" (data.resident_max_mb={cfg.data.resident_max_mb:g})"
    sweep = [f"sweep of {plan.points} runs, each checked ({plan.checked} distinct setting{'s' * (plan.checked > 1)} "
             "of the checks: runs that differ only in keys no check reads, such as train.lr or the seed, share "
             "one); the first run's plan"] if plan.points > 1 else []
    built = f"on meta: a {size_text(size.state_bytes)} member is not built" if plan.checked_on_meta else \
        "built on the CPU"
    checks = f"checks  passed: the checks ntdist run makes before training (member 0 {built})" \
        + (f"; not checked: {'; '.join(plan.unchecked)}" if plan.unchecked else "")
    return [f"dry run of {config_path} on {w} rank{'s' * (w > 1)}{nodes}: no process group joined, nothing trained",
            *sweep,
            f"model   {plan.spec.name}: {count_text(size.params)} parameters, {size_text(size.state_bytes)} state "
            f"({size.tensors} tensors, {plan.dtype})",
            f"data    {cfg.data.name}: " + ", ".join(f"{count_text(n)} {name}" for name, n in plan.splits.items())
            + f" samples of {list(plan.in_shape)}, {plan.classes} classes, {size_text(plan.sample_bytes)} each; "
            + where, checks]


def _resident(plan: Plan, samples: int) -> bool:
    """The check of `training.batches.resident` for a split of `samples` samples."""
    max_mb = plan.cfg.data.resident_max_mb
    return samples > 0 and max_mb > 0 and samples * plan.sample_bytes <= max_mb * 2 ** 20


def _node(plan: Plan, rank: int) -> Optional[int]:
    return rank // plan.gpus_per_node if plan.gpus_per_node else None


def _ranks_text(ranks: List[int]) -> str:
    return f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"


def _shorten(items: List[str], keep: int = 6) -> List[str]:
    return items if len(items) <= keep else items[:keep - 2] + [f"... ({len(items) - keep + 1} more)", items[-1]]


def _layout(plan: Plan) -> List[str]:
    layout, cfg, b = plan.layout, plan.cfg, plan.cfg.data.batch_size
    k, w, g = layout.num_members, layout.world_size, layout.group_size
    steps = math.ceil(plan.splits["train"] / (g * b))
    if w >= k:
        who = f"a group of {g} ranks trains each member with DDP (SyncBatchNorm on CUDA)" if g > 1 else \
            "one rank per member"
        lines = [f"layout  k={k} members on {w} ranks: {who}"]
        rows = [(f"member {m}: ranks {_ranks_text(layout.group_ranks(m))}, holder {layout.holder(m)}",
                 layout.group_ranks(m)) for m in range(k)]
    else:
        lines = [f"layout  k={k} members on {w} rank{'s' * (w > 1)}: each rank trains its block of members, all at "
                 f"once where train.vectorize={cfg.train.vectorize} allows"]
        rows = [(f"rank {r}: members {_ranks_text(layout.members_of(r))}, holds them", [r]) for r in range(w)]
    if plan.gpus_per_node:
        rows = [(f"{text} (node{'s' * (len(ranks) > 1 and _node(plan, ranks[0]) != _node(plan, ranks[-1]))} "
                 f"{_ranks_text(sorted({_node(plan, r) for r in ranks}))})", ranks) for text, ranks in rows]
        spans = sum(_node(plan, ranks[0]) != _node(plan, ranks[-1]) for _, ranks in rows)
        if spans:
            lines.append(f"        {spans} member groups span nodes: their DDP all-reduce crosses the network")
    rows = [text for text, _ in rows]
    lines += [f"        {row}" for row in _shorten(rows)]
    batch = f"{g} x {b} = {g * b}" if g > 1 else f"{b}"
    lines.append(f"        member training: batch {batch} per member, train.lr {cfg.train.lr:g} "
                 f"(not scaled), {steps} step{'s' * (steps > 1)} per epoch"
                 + (f"; gradient all-reduce of {size_text(plan.size.param_bytes)} per rank per step" if g > 1 else ""))
    return lines


def _fusion(plan: Plan) -> List[str]:
    layout, size, fc = plan.layout, plan.size, plan.cfg.fusion
    lines = []
    for method in fc.methods:
        kind = costs.fusion_kind(method, fc.schedule, fc.gathers(method))
        rounds = costs.ROUNDS[kind](layout, size)
        what = {"tree": "NT-recursive tree", "average": "one all-reduce", "ot": "anchor broadcast + all-reduce",
                "gather": "gathered and fused on rank 0"}[kind]
        lines.append(f"fusion  {method} ({fc.schedule} schedule): {what}"
                     + ("" if rounds else ": one rank, nothing moves"))
        for r in rounds:
            lines.append(f"        {r.name}: " + _round_text(plan, r))
        peaks = costs.fusion_peaks(kind, layout, size, method)
        groups: Dict[int, List[int]] = {}
        for rank, peak in peaks.items():
            groups.setdefault(peak, []).append(rank)
        parts = [f"{size_text(p)} ({p / size.state_bytes:.2f} x member) on {_rank_list(rs)}"
                 for p, rs in sorted(groups.items(), reverse=True)]
        lines.append("        peak memory beyond the held members: " + "; ".join(_shorten(parts, 4)))
    if plan.layout.world_size > 1:
        lines.append("        (bytes are payloads per call; a ring all-reduce sends 2(W-1)/W of its payload per "
                     "rank; fusion memory is on the GPU under NCCL, on the host under gloo)")
    return lines


def _rank_list(ranks: List[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    shown = ", ".join(map(str, ranks[:4])) + (f", ... ({len(ranks)} ranks)" if len(ranks) > 4 else "")
    return f"ranks {shown}"


def _round_text(plan: Plan, r: costs.Round) -> str:
    if not r.sent:
        return "every pair on one rank, nothing moves"
    if r.links:
        pairs = _shorten([f"{src}->{dst}" for src, dst in r.links], 5)
        text = f"{len(r.links)} send{'s' * (len(r.links) > 1)} ({', '.join(pairs)}), " \
               f"{size_text(max(r.sent.values()))} per sending rank"
        if plan.gpus_per_node:
            across = sum(_node(plan, s) != _node(plan, d) for s, d in r.links)
            text += f", {across} between nodes"
        return text
    if len(r.sent) == 1:
        (root, nbytes), = r.sent.items()
        return f"{size_text(nbytes)} from rank {root} to each of {len(r.received)} ranks"
    return f"{size_text(max(r.sent.values()))} per rank"


def _finetune(plan: Plan) -> List[str]:
    cfg, w = plan.cfg, plan.layout.world_size
    ft, b = cfg.finetune, cfg.data.batch_size
    steps = math.ceil(plan.splits["train"] / (w * b))
    lines = [f"finetune global batch {w} x {b} = {w * b}, lr {scaled_lr(ft, w):g} (finetune.lr {ft.lr:g}, "
             f"lr_scaling {ft.lr_scaling}), {steps} step{'s' * (steps > 1)} per epoch, engine {ft.engine}"
             + (f"; gradient all-reduce of {size_text(plan.size.param_bytes)} per rank per step" if w > 1 else "")]
    if w * b > plan.splits["train"]:
        lines.append(f"        note: {w} ranks x {b} exceed the {plan.splits['train']} training samples: each rank "
                     f"sees {math.ceil(plan.splits['train'] / w)} per epoch")
    return lines


def _memory(plan: Plan) -> List[str]:
    cfg, layout, size, w = plan.cfg, plan.layout, plan.size, plan.layout.world_size
    acts, ft = plan.activations or 0, cfg.finetune
    most = max(len(layout.members_of(r)) for r in range(w))
    held = max(len(layout.held_by(r)) for r in range(w)) * size.state_bytes
    resident = sum(n * plan.sample_bytes for n in plan.splits.values() if _resident(plan, n))
    lines = ["memory  per rank (the GPU, or the host for CPU ranks), fp32: "
             "weights + gradients + optimizer state + DDP buckets + activations",
             f"        optimizer state per parameter: member training {_optimizer_text(cfg.train)}; "
             f"fine-tuning {_optimizer_text(ft)}"]
    if plan.activations is None:
        lines.append("        activations not estimated: one forward on meta or on the CPU failed; 0 below")
    else:
        lines.append(f"        activations: the tensors one training forward of {cfg.data.batch_size} inputs saves "
                     f"for backward: {size_text(acts)} (bf16/fp16 autocast: about half)")
    buffers, tune_buffers = len(cfg.train.state_buffers), len(ft.state_buffers)
    train = costs.step_memory(size, acts, buffers=buffers, ddp=layout.group_size > 1)
    if most > 1:
        train.append(("the rank's other members", (most - 1) * size.state_bytes))
    stages = {"member training": train}
    if most > 1 and cfg.train.vectorize != "off" and layout.group_size == 1:
        stages[f"vectorised, {most} members at once"] = costs.step_memory(size, acts, most, buffers, stacked=True)
    tune = costs.deepspeed_memory(size, acts, w, ft.zero_stage, ft.precision, tune_buffers) \
        if ft.engine == "deepspeed" else costs.step_memory(size, acts, buffers=tune_buffers, ddp=w > 1)
    tune.append(("held members", held))
    sharded = use_sharded(ft.teacher_shard, w)
    sample_in = math.prod(plan.in_shape) * 4   # the model's float32 input, what the teacher gathers
    teacher = costs.teacher_costs(layout, size, cfg.data.batch_size, sample_in, plan.classes, sharded)
    if ft.distill:
        tune += [("teacher", teacher["weights"]), ("teacher buffers", teacher["buffers"])]
    stages["fine-tuning"] = tune
    for name, terms in stages.items():
        lines.append(f"        {name}: " + _terms(terms))
    other = costs.teacher_costs(layout, size, cfg.data.batch_size, sample_in, plan.classes, not sharded)
    lines.append(f"        distillation teacher {'on' if ft.distill else 'off (finetune.distill=false; if on)'}, "
                 f"teacher_shard={ft.teacher_shard}: {'sharded' if sharded else 'whole'} "
                 f"{size_text(teacher['weights'])} per rank"
                 + (f", per step {size_text(teacher['inputs'])} of inputs gathered and {size_text(teacher['logits'])}"
                    f" of logits reduce-scattered" if sharded and w > 1 else "")
                 + f"; {'whole' if sharded else 'sharded'}: {size_text(other['weights'])}")
    fusing = max(max(costs.fusion_peaks(costs.fusion_kind(m, cfg.fusion.schedule), layout, size, m).values())
                 for m in cfg.fusion.methods) + held
    peaks = {name: sum(n for _, n in terms) + resident for name, terms in stages.items()}
    peaks["fusion under NCCL"] = fusing + resident
    stage = max(peaks, key=peaks.get)
    lines.append(f"peak    device {size_text(peaks[stage])} per rank ({stage}"
                 + (f", with {size_text(resident)} of resident data)" if resident else ")"))
    lines += _host(plan, fusing)
    return lines


def _optimizer_text(cfg) -> str:
    """`cfg.optimizer` (an OptimConfig) and the buffers it keeps per parameter: "adamw: 2 (exp_avg, exp_avg_sq)"."""
    names = cfg.state_buffers
    what = cfg.optimizer if cfg.optimizer != "sgd" else \
        f"sgd with momentum {cfg.momentum:g}" if cfg.momentum else "sgd without momentum"
    return f"{what}: " + (f"{len(names)} ({', '.join(names)})" if names else "none")


def _host(plan: Plan, fusing: int) -> List[str]:
    """The host's share: the dataset as every rank loads it, fusion under gloo, a checkpoint being written."""
    files = plan.cfg.data.name == "imagefolder"   # read from files batch by batch; everything else is held
    data = sum(n * plan.sample_bytes * ((not files) + _resident(plan, n)) for n in plan.splits.values())
    state = _state_file(plan, plan.cfg.train)
    per_node = f", {size_text(data * plan.gpus_per_node)} per node" if plan.gpus_per_node else ""
    read = "; files read per batch" * files
    return [f"host    dataset {size_text(data)} per rank{per_node} (every rank loads it{read}"
            f"; resident splits keep a host copy); fusion under gloo {size_text(fusing)} (the held members and the "
            f"fusion's peak); writing a state file {size_text(state)} (its tensors cloned once)"]


def _state_file(plan: Plan, optim) -> int:
    """A state file of the stage that `optim` (`cfg.train`, `cfg.finetune`) configures, at its last epoch end."""
    return costs.state_file_bytes(plan.size, len(optim.state_buffers), len(optim.state_scalars), optim.epochs)


def _terms(terms) -> str:
    return " + ".join(f"{name} {size_text(n)}" for name, n in terms) + f" = {size_text(sum(n for _, n in terms))}"


def _files(plan: Plan) -> List[str]:
    cfg, size, k = plan.cfg, plan.size, plan.layout.num_members
    member = costs.checkpoint_bytes(size, cfg.train.epochs)
    state = _state_file(plan, cfg.train)
    tuned = costs.checkpoint_bytes(size, cfg.finetune.epochs)
    labels = len(cfg.fusion.methods) + (cfg.finetune.control and cfg.finetune.epochs > 0)
    order = 8 * plan.splits["train"]
    tuning_state = _state_file(plan, cfg.finetune)
    return [f"files   member checkpoint {size_text(member)} each, {size_text(k * member)} for all {k}; member state "
            f"file {size_text(state)} (weights, optimizer state, RNG; + {size_text(order)} data order inside an epoch)",
            f"        fine-tuned checkpoints {size_text(tuned)} each, {labels} of them (fusion.methods + control); "
            f"fine-tuning state {size_text(tuning_state)}"]
