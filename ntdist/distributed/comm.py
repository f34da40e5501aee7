"""Moving whole models between ranks as tensors in their own dtype (never pickled objects).

Sender and receiver hold models of the same architecture, so the state dict's order and shapes are
known on both sides; a header of one dtype code per tensor comes first (a bf16 model travels as bf16),
then the tensors as raw bytes (so dtypes that NCCL has no type for, int16, travel too).
Small tensors travel together through one reused bucket (`BUCKET_BYTES`), and a tensor at least that
large goes as it is, straight from and into the model's own memory. A send therefore needs at most
one bucket of extra memory (plus one tensor's copy when the model is not on the communication
device, e.g. a CPU model under NCCL), where a flat float32 copy of the whole model took 2-4x the
model before (docs/PERFORMANCE.md, "Memory of the fusion tree"). A receiver builds its template on
the `meta` device (`meta_template`: no initialisation, no memory) and allocates it once, uninitialised,
on the communication device (`devices.comm_device`: the GPU under NCCL, where fusion runs, else the CPU)
before the weights arrive.
"""

from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from ntdist.distributed.devices import comm_device
from ntdist.distributed.world import World, guarded

BUCKET_BYTES = 16 * 2 ** 20   # small tensors are sent in groups of up to this size; larger ones alone
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool)   # the dtype codes of the header


def meta_template(make_template: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """`make_template()` built on the meta device (no weights initialised or allocated); built normally when
    the model's code needs real tensors to construct itself or it holds buffers that a state dict leaves out."""
    try:
        with torch.device("meta"):
            model = make_template()
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return make_template()
    state = model.state_dict()
    if any(name not in state for name, _ in model.named_buffers()):   # non-persistent buffers are never sent
        return make_template()
    return model


def _tensors(model: torch.nn.Module) -> List[torch.Tensor]:
    """The model's state tensors, in state-dict order, as the module's own storage (no copies)."""
    return [t.detach() for t in model.state_dict().values()]


def _materialise(model: torch.nn.Module, dtypes: List[torch.dtype], device: torch.device) -> List[torch.Tensor]:
    """Give a meta template real (uninitialised) memory on `device` in the sender's dtypes; returns its state
    tensors. A template built with real weights keeps its device."""
    if any(t.is_meta for t in _tensors(model)):
        model.to_empty(device=device)
    names = list(model.state_dict().keys())
    for name, tensor, dtype in zip(names, _tensors(model), dtypes):
        if tensor.dtype != dtype:   # e.g. a bf16 member received into a template built in float32
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            getattr(module, attr).data = torch.empty(tensor.shape, dtype=dtype, device=tensor.device)
    return _tensors(model)


def _buckets(tensors: List[torch.Tensor], limit: int) -> List[List[int]]:
    """Consecutive tensors of one dtype grouped up to `limit` bytes; a tensor of `limit` bytes or more alone."""
    groups: List[List[int]] = []
    size = 0
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        fits = groups and tensors[groups[-1][0]].dtype == t.dtype and size + nbytes <= limit and nbytes < limit
        if fits:
            groups[-1].append(i)
            size += nbytes
        else:
            groups.append([i])
            size = nbytes
    return groups


class _Wire:
    """One rank's side of moving a model: the header, then every group through `move(tensor)` (send, recv or
    broadcast), small ones through a bucket allocated once on the communication device."""

    def __init__(self, world: World, move: Callable[[torch.Tensor], None], bucket_bytes: int = BUCKET_BYTES):
        self.device, self.move, self.bucket_bytes = comm_device(world), move, bucket_bytes
        self.bucket: Optional[torch.Tensor] = None

    def header(self, tensors: Optional[List[torch.Tensor]], count: int) -> List[torch.dtype]:
        codes = torch.tensor([DTYPES.index(t.dtype) for t in tensors] if tensors is not None else [0] * count,
                             dtype=torch.int64, device=self.device)
        self.move(codes)
        return [t.dtype for t in tensors] if tensors is not None else [DTYPES[c] for c in codes.tolist()]

    def tensors(self, tensors: List[torch.Tensor], sending: bool) -> None:
        for group in _buckets(tensors, self.bucket_bytes):
            if len(group) == 1 and tensors[group[0]].numel() * tensors[group[0]].element_size() >= self.bucket_bytes:
                self._direct(tensors[group[0]], sending)
            else:
                self._bucketed([tensors[i] for i in group], sending)

    def _direct(self, tensor: torch.Tensor, sending: bool) -> None:
        here = tensor.device == self.device and tensor.is_contiguous()
        wire = tensor if here else tensor.to(self.device).contiguous()
        self.move(wire.reshape(-1).view(torch.uint8))
        if not sending and not here:
            tensor.copy_(wire)

    def _bucketed(self, group: List[torch.Tensor], sending: bool) -> None:
        if self.bucket is None:
            self.bucket = torch.empty(self.bucket_bytes, dtype=torch.uint8, device=self.device)
        dtype, sizes = group[0].dtype, [t.numel() for t in group]
        raw = self.bucket[:sum(sizes) * group[0].element_size()]
        parts = raw.view(dtype).split(sizes)
        if sending:
            for part, t in zip(parts, group):
                part.copy_(t.reshape(-1))
        self.move(raw)
        if not sending:
            for part, t in zip(parts, group):
                t.copy_(part.view_as(t))


def send_model(world: World, model: torch.nn.Module, dst: int) -> None:
    wire, tensors = _Wire(world, lambda t: guarded(dist.send, t, dst)), _tensors(model)
    wire.header(tensors, len(tensors))
    wire.tensors(tensors, sending=True)


def recv_model(world: World, template: torch.nn.Module, src: int) -> torch.nn.Module:
    """Receive into `template` (a module of the right architecture, on `meta` or real; overwritten)."""
    wire = _Wire(world, lambda t: guarded(dist.recv, t, src))
    dtypes = wire.header(None, len(template.state_dict()))
    wire.tensors(_materialise(template, dtypes, wire.device), sending=False)
    return template


def broadcast_model(world: World, model: torch.nn.Module, src: int) -> torch.nn.Module:
    """After the call every rank's `model` (on the other ranks a template, on `meta` or real) holds rank `src`'s
    weights."""
    if world.size == 1:
        return model
    wire = _Wire(world, lambda t: guarded(dist.broadcast, t, src))
    mine = world.rank == src
    dtypes = wire.header(_tensors(model) if mine else None, len(model.state_dict()))
    wire.tensors(_tensors(model) if mine else _materialise(model, dtypes, wire.device), sending=mine)
    return model


def gather_models(world: World, held: Dict[int, torch.nn.Module], holders: List[int], make_template,
                  root: Optional[int] = 0) -> Dict[int, torch.nn.Module]:
    """Collect every member on `root` (or on every rank when root is None).

    `holders[i]` is the rank holding member i; `make_template()` builds an empty model.
    """
    if world.size == 1:
        return dict(held)
    out: Dict[int, torch.nn.Module] = {}
    for member, holder in enumerate(holders):
        if root is None:
            model = held[member] if world.rank == holder else meta_template(make_template)
            out[member] = broadcast_model(world, model, holder)
        elif holder == root:
            if world.rank == root:
                out[member] = held[member]
        elif world.rank == holder:
            send_model(world, held[member], root)
        elif world.rank == root:
            out[member] = recv_model(world, meta_template(make_template), holder)
    return out


def new_groups(world: World, rank_lists: List[List[int]]) -> Dict[int, object]:
    """One process group per rank list, created by every rank in the same order (index -> group).

    Every rank calls `dist.new_group` for every list, also for lists it is not in: torch requires
    it, and the groups' internal names come from that shared order. Destroy them with `destroy_groups`.
    """
    if world.size == 1:
        return {}
    return {i: dist.new_group(ranks) for i, ranks in enumerate(rank_lists)}


def destroy_groups(groups: Dict[int, object]) -> None:
    """Destroy the groups of `new_groups` that this rank belongs to (a sweep would otherwise keep one
    set per point, each with its sockets or NCCL communicators)."""
    for group in groups.values():
        if group is not None and group != dist.GroupMember.NON_GROUP_MEMBER:
            dist.destroy_process_group(group)


def sum_counts(world: World, counts: Dict[str, int]) -> Dict[str, int]:
    """Per-key sums of every rank's counts (e.g. units merged by the fusions each rank ran), on every rank."""
    total: Dict[str, int] = {}
    for part in all_gather_records(world, [counts]):
        for key, value in part.items():
            total[key] = total.get(key, 0) + value
    return total


def all_gather_records(world: World, records: list) -> list:
    """Gather small JSON-able records (metrics, host names) from every rank, flattened in rank order."""
    if world.size == 1:
        return list(records)
    out = [None] * world.size
    guarded(dist.all_gather_object, out, records)
    return [x for part in out for x in part]
