"""Moving whole models between ranks as flat tensors (never pickled objects).

A model's state dict is packed into one float tensor and one int64 tensor; the
receiver unpacks into a module of the same architecture that it builds itself.
"""

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ntdist.distributed.world import World, guarded


def pack(model: torch.nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """(all floating tensors concatenated as float32, all integer tensors as int64)."""
    floats, ints = [], []
    for value in model.state_dict().values():
        (floats if value.is_floating_point() else ints).append(value.detach().reshape(-1))
    flat_f = torch.cat([v.float() for v in floats]) if floats else torch.zeros(0)
    flat_i = torch.cat([v.long() for v in ints]) if ints else torch.zeros(0, dtype=torch.long)
    return flat_f, flat_i


def unpack(model: torch.nn.Module, flat_f: torch.Tensor, flat_i: torch.Tensor) -> torch.nn.Module:
    """Load tensors produced by `pack` into `model` (same architecture) in place."""
    state = model.state_dict()
    fo = io = 0
    new: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        n = value.numel()
        if value.is_floating_point():
            new[key] = flat_f[fo:fo + n].view_as(value).to(value.dtype)
            fo += n
        else:
            new[key] = flat_i[io:io + n].view_as(value).to(value.dtype)
            io += n
    assert fo == flat_f.numel() and io == flat_i.numel(), "packed model does not match the receiving architecture"
    model.load_state_dict(new, strict=True)
    return model


def _buffers_like(model: torch.nn.Module, device) -> Tuple[torch.Tensor, torch.Tensor]:
    flat_f, flat_i = pack(model)
    return torch.empty_like(flat_f, device=device), torch.empty_like(flat_i, device=device)


def send_model(world: World, model: torch.nn.Module, dst: int) -> None:
    for t in pack(model):
        guarded(dist.send, t.to(world.device).contiguous(), dst)


def recv_model(world: World, template: torch.nn.Module, src: int) -> torch.nn.Module:
    """Receive into `template` (a module of the right architecture, overwritten)."""
    flat_f, flat_i = _buffers_like(template, world.device)
    guarded(dist.recv, flat_f, src)
    guarded(dist.recv, flat_i, src)
    return unpack(template, flat_f.cpu(), flat_i.cpu())


def broadcast_model(world: World, model: torch.nn.Module, src: int) -> torch.nn.Module:
    """After the call every rank's `model` holds the weights of rank `src`'s."""
    if world.size == 1:
        return model
    flat_f, flat_i = pack(model)
    flat_f, flat_i = flat_f.to(world.device), flat_i.to(world.device)
    guarded(dist.broadcast, flat_f, src)
    guarded(dist.broadcast, flat_i, src)
    return unpack(model, flat_f.cpu(), flat_i.cpu())


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
            model = held[member] if world.rank == holder else make_template()
            out[member] = broadcast_model(world, model, holder)
        elif holder == root:
            if world.rank == root:
                out[member] = held[member]
        elif world.rank == holder:
            send_model(world, held[member], root)
        elif world.rank == root:
            out[member] = recv_model(world, make_template(), holder)
    return out


def new_groups(world: World, rank_lists: List[List[int]]) -> Dict[int, object]:
    """One process group per rank list, created by every rank in the same order (index -> group)."""
    if world.size == 1:
        return {}
    return {i: dist.new_group(ranks) for i, ranks in enumerate(rank_lists)}


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
