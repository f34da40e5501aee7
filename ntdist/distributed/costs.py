"""The cost model of a layout: the bytes each rank moves in each round of fusion and the memory of each stage.

Arithmetic on one member's sizes (`MemberSize`, read from a model built on `meta`) and the `MemberLayout`;
nothing here joins a process group or allocates a model. `ntdist run --dry-run` prints it
(`ntdist/commands/dryrun.py`), the scale section of docs/PERFORMANCE.md is that command's output, and
`tests/multiproc/test_dryrun_measured.py` compares it with bytes counted and peak RSS measured on 4 CPU ranks.

Bytes are payloads at the torch.distributed call: what a rank hands to `send` or `recv`, to `broadcast` (the
root sends it, every other rank receives it) and to `all_reduce` (each rank its whole tensor). What crosses the
network for a collective depends on its algorithm: a ring all-reduce sends 2(W-1)/W of its payload per rank.
Memory is counted in whole models where the code allocates whole models; `NT_PAIR_WORK` is the one measured
constant.
"""

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from ntdist.distributed.comm import BUCKET_BYTES
from ntdist.distributed.layout import MemberLayout
from ntdist.fusion.schedule import recursive_plan

HEADER_BYTES_PER_TENSOR = 8   # every model transfer starts with one int64 dtype code per tensor (comm._Wire.header)
NT_PAIR_WORK = 1.75           # NT's memory while fusing a pair, beyond the pair and its result, in the member's
#                               largest tensors (two MLPs on CPU ranks: tests/multiproc/test_dryrun_measured.py and
#                               benchmarks/tree_memory.py; assumed for other networks)
SAFETENSORS_BYTES_PER_TENSOR = 110   # a checkpoint's JSON header entry per tensor (name, dtype, shape, offsets)
CHECKPOINT_METADATA_BYTES = 400      # its spec and metadata, without the history
EPOCH_RECORD_BYTES = 200             # one epoch's record in the history of the metadata
SCALAR_BYTES = 4                     # an optimizer's one-value float32 tensor (AdamW's step count)
RNG_BYTES = 5056                     # torch.get_rng_state(), in every state file (and 16 B per GPU generator)


@dataclass(frozen=True)
class MemberSize:
    """What the cost model needs to know of one member (its state dict, as it travels and is saved)."""

    params: int
    param_bytes: int
    state_bytes: int
    tensors: int
    param_tensors: int
    """the parameters among `tensors`: the optimizer keeps its state per parameter"""
    small_bytes: int
    """bytes of the tensors below comm.BUCKET_BYTES, which travel through the bucket"""
    largest_bytes: int
    widest: int
    """the most output units of any weight: the size of OT's largest cost matrix is widest^2"""

    @classmethod
    def of(cls, model: torch.nn.Module) -> "MemberSize":
        """Read from `model`, which may live on `meta`."""
        state = list(model.state_dict().values())
        nbytes = [t.numel() * t.element_size() for t in state]
        params = list(model.parameters())
        return cls(params=sum(p.numel() for p in params),
                   param_bytes=sum(p.numel() * p.element_size() for p in params),
                   state_bytes=sum(nbytes), tensors=len(state), param_tensors=len(params),
                   small_bytes=sum(n for n in nbytes if n < BUCKET_BYTES), largest_bytes=max(nbytes, default=0),
                   widest=max((p.shape[0] for p in params if p.dim() >= 2), default=1))

    @property
    def wire_bytes(self) -> int:
        """Bytes of one model transfer: the dtype header, then every state tensor once."""
        return self.state_bytes + HEADER_BYTES_PER_TENSOR * self.tensors

    @property
    def bucket_bytes(self) -> int:
        """The part of the transfer bucket a model transfer fills."""
        return min(BUCKET_BYTES, self.small_bytes)


@dataclass(frozen=True)
class Round:
    """One step of a fusion across ranks: which ranks send and receive how many bytes."""

    name: str
    sent: Dict[int, int]
    received: Dict[int, int]
    links: Tuple[Tuple[int, int], ...] = ()
    """(source, destination) of each point-to-point transfer; empty for a collective"""


def tree_rounds(layout: MemberLayout, size: MemberSize) -> List[Round]:
    """NT-recursive across ranks (`tree.tree_fuse`): each round of `recursive_plan(k)`, then the broadcast."""
    rounds = []
    for number, steps in enumerate(recursive_plan(layout.num_members), 1):
        links = tuple((layout.holder(right), layout.holder(left)) for left, right, _, _ in steps
                      if layout.holder(right) != layout.holder(left))
        rounds.append(Round(f"round {number}", _count(links, 0, size), _count(links, 1, size), links))
    return rounds + broadcast_rounds(layout, size, layout.holder(0), "broadcast")


def broadcast_rounds(layout: MemberLayout, size: MemberSize, root: int, name: str) -> List[Round]:
    if layout.world_size == 1:
        return []
    others = {r: size.wire_bytes for r in range(layout.world_size) if r != root}
    return [Round(name, {root: size.wire_bytes}, others)]


def average_rounds(layout: MemberLayout, size: MemberSize) -> List[Round]:
    """Weight averaging (`tree.reduce_average`): one all-reduce of every state tensor, no header."""
    if layout.world_size == 1:
        return []
    everyone = {r: size.state_bytes for r in range(layout.world_size)}
    return [Round("all-reduce", everyone, dict(everyone))]


def ot_rounds(layout: MemberLayout, size: MemberSize) -> List[Round]:
    """OT (`tree.ot_reduce`): member 0 broadcast as the anchor, then the all-reduce of the aligned members."""
    return broadcast_rounds(layout, size, layout.holder(0), "anchor broadcast") + average_rounds(layout, size)


def gather_rounds(layout: MemberLayout, size: MemberSize) -> List[Round]:
    """Every other method (`tree.gather_fuse`): the members sent to rank 0, fused there, broadcast."""
    links = tuple((layout.holder(m), 0) for m in range(layout.num_members) if layout.holder(m) != 0)
    gather = [Round("gather on rank 0", _count(links, 0, size), _count(links, 1, size), links)] if links else []
    return gather + broadcast_rounds(layout, size, 0, "broadcast")


def _count(links, side: int, size: MemberSize) -> Dict[int, int]:
    out: Dict[int, int] = {}
    for link in links:
        out[link[side]] = out.get(link[side], 0) + size.wire_bytes
    return out


def fusion_kind(method: str, schedule: str, repaired: bool = False) -> str:
    """Which of the four cross-rank fusions `pipeline.fuse_stage` uses for `method` with `schedule` (`repaired`:
    avg or ot with their repair, which fits on all members at once)."""
    if method == "nt" and schedule == "recursive":
        return "tree"
    if method in ("avg", "ot") and schedule == "flat" and not repaired:
        return "average" if method == "avg" else "ot"
    return "gather"


ROUNDS = {"tree": tree_rounds, "average": average_rounds, "ot": ot_rounds, "gather": gather_rounds}


def tree_peaks(layout: MemberLayout, size: MemberSize, work: float = NT_PAIR_WORK) -> Dict[int, int]:
    """Each rank's peak memory during `tree_fuse` beyond the members it holds, in bytes.

    Follows the models `tree_fuse` keeps alive: a received model lives in its loop variable until the next one
    replaces it, a pair's result replaces the left model, a sent result is freed, and every rank but the root
    receives the fused model at the end.
    """
    peaks = {}
    for rank in range(layout.world_size):
        models = {m: False for m in layout.held_by(rank)}   # member -> whether it is an extra model (a result)
        other, live, peak = False, 0, 0                     # `other` is extra; extra models alive; their peak
        for steps in recursive_plan(layout.num_members):
            for left, right, _, _ in steps:
                src, dst = layout.holder(right), layout.holder(left)
                if rank == src and src != dst:
                    peak = max(peak, live * size.state_bytes + size.bucket_bytes)
                    live -= models.pop(right)
                if rank == dst:
                    if src == dst:
                        incoming = models.pop(right)
                    else:
                        live, incoming = live + 1, True
                        peak = max(peak, live * size.state_bytes + size.bucket_bytes)
                    live, other = live - other, incoming
                    peak = max(peak, (live + 1) * size.state_bytes + round(work * size.largest_bytes))
                    live, models[left] = live + 1 - models[left], True
        if rank != layout.holder(0) and layout.world_size > 1:
            peak = max(peak, (live + 1) * size.state_bytes + size.bucket_bytes)
        peaks[rank] = peak
    return peaks


def fusion_peaks(kind: str, layout: MemberLayout, size: MemberSize, method: str = "nt") -> Dict[int, int]:
    """Each rank's peak memory while fusing beyond the members it holds, in bytes, for a `fusion_kind` of
    `method`."""
    ranks, s = range(layout.world_size), size.state_bytes
    if kind == "tree":
        return tree_peaks(layout, size)
    if kind == "average":   # the result, built once on every rank
        return {r: s for r in ranks}
    if kind == "ot":        # the anchor where not held, each held member's aligned copy, the result; cost and plan
        matrices = 2 * size.widest ** 2 * 8   # float64 units x units, for the widest space, on the host
        return {r: s * ((layout.holder(0) != r) + len(layout.held_by(r)) - (layout.holder(0) == r) + 1)
                + (matrices if set(layout.held_by(r)) - {0} else 0) for r in ranks}
    own = len(layout.held_by(0))   # gather: rank 0 receives the others' members and fuses all k at once
    work = round(NT_PAIR_WORK * size.largest_bytes * layout.num_members / 2) if method == "nt" else 0
    return {r: s * (layout.num_members - own + 1) + work if r == 0 else s for r in ranks}


def step_memory(size: MemberSize, activations: int, models: int = 1, buffers: int = 1, ddp: bool = False,
                stacked: bool = False) -> List[Tuple[str, int]]:
    """The terms of one rank's memory for an optimizer step of `models` members at once, in bytes.

    weights + gradients + the optimizer's `buffers` per parameter (`OptimConfig.state_buffers`: AdamW 2, SGD
    with momentum 1, without 0) + DDP's gradient buckets (a second copy of the gradients) + activations, and
    for vectorised members the stacked copy of their weights.
    """
    terms = [("weights", models * size.state_bytes), ("gradients", models * size.param_bytes)]
    if buffers:
        terms.append(("optimizer state", models * buffers * size.param_bytes))
    if ddp:
        terms.append(("DDP buckets", models * size.param_bytes))
    if stacked:
        terms.append(("stacked weights", models * size.state_bytes))
    return terms + [("activations", models * activations)]


def deepspeed_memory(size: MemberSize, activations: int, ranks: int, stage: int, precision: str,
                     buffers: int = 1) -> List[Tuple[str, int]]:
    """The same for DeepSpeed: weights and gradients in `precision`, fp32 master weights (mixed precision
    only) and the optimizer's `buffers` per parameter divided over the ranks from ZeRO stage 1, gradients
    from stage 2."""
    half = precision != "fp32"
    weights = size.param_bytes // 2 if half else size.param_bytes
    terms = [("weights", weights + size.state_bytes - size.param_bytes),
             ("gradients", weights // ranks if stage >= 2 else weights)]
    if half:
        terms.append(("fp32 master weights", size.param_bytes // ranks if stage >= 1 else size.param_bytes))
    if buffers:
        state = buffers * size.param_bytes
        terms.append(("optimizer state", state // ranks if stage >= 1 else state))
    return terms + [("activations", activations)]


def checkpoint_bytes(size: MemberSize, epochs: int = 0) -> int:
    """A checkpoint of one model: its tensors, a header entry per tensor, the metadata and `epochs` records."""
    header = SAFETENSORS_BYTES_PER_TENSOR * size.tensors + CHECKPOINT_METADATA_BYTES + EPOCH_RECORD_BYTES * epochs
    return size.state_bytes + header


def state_file_bytes(size: MemberSize, buffers: int, scalars: int, epochs: int, gpus: int = 0) -> int:
    """A state file for `--resume` at an epoch end: the model, the optimizer's `buffers` (`OptimConfig.state_buffers`)
    and one-value `scalars` (`OptimConfig.state_scalars`: AdamW's step count) per parameter, the RNG states."""
    state = buffers * (size.param_bytes + SAFETENSORS_BYTES_PER_TENSOR * size.param_tensors) \
        + scalars * (SCALAR_BYTES + SAFETENSORS_BYTES_PER_TENSOR) * size.param_tensors
    return checkpoint_bytes(size, epochs) + state + RNG_BYTES + 16 * gpus


def teacher_costs(layout: MemberLayout, size: MemberSize, batch: int, sample_bytes: int, classes: int,
                  sharded: bool) -> Dict[str, int]:
    """Per rank: the distillation teacher's weights, and what the sharded one gathers, reduce-scatters and holds
    per step for batches of `batch` inputs of `sample_bytes` each (`training.teacher`)."""
    w, k = layout.world_size, layout.num_members
    if not sharded:
        return {"weights": k * size.state_bytes, "inputs": 0, "logits": 0, "buffers": 0}
    most = max(len(layout.members_of(r)) for r in range(w))
    return {"weights": most * size.state_bytes, "inputs": (w - 1) * batch * sample_bytes,
            "logits": (w - 1) * batch * classes * 4, "buffers": w * batch * (sample_bytes + classes * 4)}
