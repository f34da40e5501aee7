"""NT that merges duplicate units: a near-copy of a kept unit is folded into it instead of taking a slot.

Plain NT keeps the most important units of all members, so when the members are
alike it keeps several copies of the strongest units and drops the rest (fusing
a model with itself loses accuracy). `dedup_fuse` walks the hidden spaces in
creation order and, for each, goes through the units of the concatenated model
in descending importance:

- a unit whose *signature* has cosine similarity above the threshold with a kept
  unit's, part by part, is merged into that unit: its outgoing weights (the
  columns of every layer reading the space, the output layer's included) are
  added to the kept unit's, and it takes no slot. For a true duplicate this is
  exact: both compute the same values, so the consumers see the same sum. The
  kept unit's incoming parameters become the mean over its class, weighted by
  the members' output weights (the same values for true duplicates);
- otherwise it takes a free slot; once the slots are full it is dropped, or, with
  `overflow="merge"`, merged into its most similar kept unit all the same (a
  *forced* merge: approximate, but nothing is thrown away);
- if only duplicates are left while slots are free, the most important of them
  fill those slots, each kept beside its twin with its own outgoing weights.

With `overflow="match"` the walk is replaced by a matching of units of different
members, most similar pair first, until the classes fit the slots
(`ntdist.fusion.dedup.choice`). With `criterion="activations"` the signature is
the units' outputs on example inputs instead (`ntdist.fusion.dedup.activations`).

A unit's signature is everything it owns in its space: the rows of the layers
producing it (for a residual space, of every block writing into it), their
biases, BatchNorm scale, shift and running statistics, depthwise filters and
per-channel parameters. The input dimensions of those rows are summed over the
duplicate classes of their own space, so a copy's row, which reads the copy's
block of the wide model, equals the original's. A residual space is written by
layers that read spaces created after it; those rows are left out of its first
comparison, and at the end every merge is checked against the complete
signatures. A space whose merges fail that check falls back to plain NT and the
walk is repeated, so every merge made is backed by complete signatures. Spaces
with a LayerNorm (it normalises across units, so removing one changes the
statistics) and spaces cut into groups by a grouped convolution use plain NT.

The wide model is built once (block-diagonal, so k^2 times a member's hidden
weights), unlike plain NT, which never builds it. Its spaces are sized as the sums
of the members' (`concat_sizes`): a model that routes channels one by one (a
residual adding a channel concat, a split output) has spaces of one channel each,
which hold k units in the wide model.
"""

from typing import Dict, List, Optional, Sequence, Set

import torch
import torch.nn as nn

from ntdist.fusion.wide.assemble import assemble, tensors_of
from ntdist.fusion.checks import check_finite
from ntdist.fusion.dedup.activations import activation_signatures
from ntdist.fusion.dedup.choice import Choice, choose, first_slots, match, plain
from ntdist.fusion.analysis.plan import Plan, concat_sizes, parts_of
from ntdist.fusion.options import NTOptions
from ntdist.fusion.pruning.select import ranked_scores, scorer, select

_TINY = 1e-30


def eligible_spaces(plan: Plan) -> Set[int]:
    """Hidden spaces where merging is exact for duplicates: no LayerNorm, not cut into groups."""
    skip = {s for spaces, _, _ in plan.coupled for s in spaces}
    for layer in plan.layers.values():
        if layer.kind in ("ln", "lnf") and layer.out:
            skip.update(d.space for d in layer.out)
    return {s for s in plan.order if s not in skip}


def space_names(plan: Plan) -> Dict[int, str]:
    """Each hidden space named by the first Linear/Conv layer producing it (a residual space by its first)."""
    names = {}
    for name, layer in plan.layers.items():
        if layer.kind in ("linear", "conv", "gconv") and layer.out:
            for d in layer.out:
                names.setdefault(d.space, name)
    return names


def _aggregate(t: torch.Tensor, d: int, layout, sizes, classes: Dict[int, Choice]) -> torch.Tensor:
    """`t` with dimension d summed over the duplicate classes of its spaces (dropped units left out)."""
    pieces = []
    for dim, piece in parts_of(t, d, layout, sizes):
        choice = classes[dim.space]
        live = choice.classes >= 0
        onehot = torch.zeros(len(live), choice.count, dtype=t.dtype, device=t.device)
        onehot[live.nonzero().squeeze(1), choice.classes[live]] = 1.0
        piece = piece.movedim(d, -1).unflatten(-1, (-1, dim.factor)).transpose(-1, -2)   # [..., factor, units]
        pieces.append((piece @ onehot).transpose(-1, -2).flatten(-2).movedim(-1, d))
    return torch.cat(pieces, d)


def _signature(ts, plan: Plan, space: int, sizes, classes: Dict[int, Choice]):
    """The parts ([units, n] each) of every unit's signature, and whether none had to be left out."""
    rows, scalars, complete = [], [], True
    for name, spec in plan.tensors.items():
        if spec.role not in ("layer", "output"):
            continue
        for d, lay in enumerate(spec.dims):
            if lay is None or all(p.space != space for p in lay) or (spec.part == "weight" and d == 1):
                continue     # a weight's dimension 1 is the outgoing side: merged, not compared
            others = [(e, other) for e, other in enumerate(spec.dims) if other is not None and e != d]
            if any(p.space not in classes for _, other in others for p in other):
                complete = False
                continue
            t = ts[name].float()
            for e, other in others:
                t = _aggregate(t, e, other, sizes, classes)
            for dim, piece in parts_of(t, d, lay, sizes):
                if dim.space == space:
                    piece = piece.movedim(d, 0).reshape(sizes[space], -1)
                    (scalars if piece.shape[1] == 1 else rows).append(piece)
    if scalars:
        rows.append(torch.cat(scalars, 1))
    return rows, complete


def _similarity(parts: List[torch.Tensor]) -> Optional[torch.Tensor]:
    """[units, units]: the smallest cosine similarity over the parts (two all-zero parts count as equal)."""
    sim = None
    for part in parts:
        norms = part.norm(dim=1)
        unit = part / norms.clamp_min(_TINY)[:, None]
        zero = norms <= _TINY
        one = torch.ones((), dtype=part.dtype, device=part.device)
        cos = torch.where(zero[:, None] & zero[None, :], one, unit @ unit.T)
        sim = cos if sim is None else torch.minimum(sim, cos)
    return sim

def _walk(ts, plan, sizes, scores, want, options: NTOptions, base, dedup: Set[int], acts, owners):
    """Every space's choice, and the spaces whose signatures were incomplete (to be checked at the end).

    `acts`, when given, holds the activation signatures (complete from the start); else weights are compared.
    Outputs of one member's units are often correlated (deeper layers of a ReLU net above all), so with
    activations only units of different members (`owners`) are compared: a copy is in another member.
    """
    classes, partial = {}, set()
    for s in plan.order:
        if s not in dedup:
            classes[s] = plain(base.get(s), sizes[s], next(iter(ts.values())).device)
            continue
        parts, complete = (acts.get(s, []), True) if acts is not None else _signature(ts, plan, s, sizes, classes)
        sim = _similarity(parts)
        if sim is not None and acts is not None:
            sim = sim.masked_fill(owners[s][:, None] == owners[s][None, :], -2.0)
        threshold = options.dedup_threshold
        classes[s] = (match(sim, scores[s], want[s], threshold, owners[s]) if options.dedup_overflow == "match"
                      else choose(sim, scores[s], want[s], threshold, merge=options.dedup_overflow == "merge"))
        if not complete:
            partial.add(s)
    return classes, partial


def _failing(ts, plan, sizes, classes: Dict[int, Choice], threshold: float, partial: Set[int]) -> Set[int]:
    """Spaces where a unit merged as a duplicate does not duplicate its kept unit by its complete signature."""
    bad = set()
    for s in partial:
        rep = classes[s].rep
        twins = ((rep >= 0) & (rep != torch.arange(len(rep), device=rep.device)) & ~classes[s].forced).nonzero().squeeze(1)
        if len(twins) == 0:
            continue
        sim = _similarity(_signature(ts, plan, s, sizes, classes)[0])
        if sim is None or not bool((sim[twins, rep[twins]] > threshold).all()):
            bad.add(s)
    return bad


def _fold(ts, plan: Plan, sizes, classes: Dict[int, Choice]) -> None:
    """Add every merged unit's outgoing weights (columns of its consumers) to those of the unit it joins."""
    for name, spec in plan.tensors.items():
        if spec.part != "weight" or len(spec.dims) < 2 or spec.dims[1] is None:
            continue
        offset = 0
        for dim in spec.dims[1]:
            length = sizes[dim.space] * dim.factor
            choice = classes.get(dim.space)
            if choice is not None:
                into = choice.into
                moved = ((into >= 0) & (into != torch.arange(len(into), device=into.device))).nonzero().squeeze(1)
                if len(moved):
                    cols = ts[name].narrow(1, offset, length).unflatten(1, (sizes[dim.space], dim.factor))
                    cols.index_add_(1, choice.into[moved], cols.index_select(1, moved))
            offset += length


def _average_incoming(ts, plan: Plan, sizes, classes: Dict[int, Choice], unit_weights) -> None:
    """Give every kept unit the weighted mean of its own and its merged units' incoming parameters.

    Identical for exact duplicates; for near-duplicates the mean (over aligned units, as
    weight averaging does) represents the class better than any single member's unit.
    """
    for name, spec in plan.tensors.items():
        if spec.role not in ("layer", "output"):
            continue
        for d, lay in enumerate(spec.dims):
            if lay is None or (spec.part == "weight" and d == 1):
                continue
            offset = 0
            for dim in lay:
                length = sizes[dim.space] * dim.factor
                choice = classes.get(dim.space)
                if choice is not None and dim.space in unit_weights:
                    into, w = choice.into, unit_weights[dim.space]
                    live = (into >= 0).nonzero().squeeze(1)
                    kept = (into == torch.arange(len(into), device=into.device)).nonzero().squeeze(1)
                    if len(live) > len(kept):
                        target = ts[name].narrow(d, offset, length)
                        rows = target.movedim(d, 0).unflatten(0, (-1, dim.factor)).clone()
                        scale = w.to(rows.dtype).reshape((-1,) + (1,) * (rows.dim() - 1))
                        total = torch.zeros_like(rows).index_add_(0, into[live], rows[live] * scale[live])
                        norm = torch.zeros_like(w).index_add_(0, into[live], w[live])
                        rows[kept] = total[kept] / norm[kept].to(rows.dtype).reshape(scale[kept].shape)
                        target.copy_(rows.flatten(0, 1).movedim(0, d))
                offset += length


def dedup_fuse(models: Sequence[nn.Module], plan: Plan, weights: Sequence[float], want: Dict[int, int],
               options: NTOptions, merged: Optional[Dict[str, int]] = None, inputs=None) -> nn.Module:
    """NT of `models` (output weights `weights`, summing to one) keeping `want[s]` units per space, with merging.

    `options` gives the importance and the dedup options: `dedup_threshold`, `dedup_overflow`
    (what becomes of a unit that is no duplicate once the slots are full: "drop" it as plain
    NT does, "merge" it into its most similar kept unit, or "match" units of different members)
    and `dedup_criterion` ("activations" compares the units' outputs on `inputs` instead of
    their parameters, `ntdist.fusion.dedup.activations`).
    `merged`, when given, receives per space (named by its first producing layer)
    the number of units merged into a kept one, added to what it already holds.
    """
    check_finite(models)
    base = select(models, plan, options.importance, want, weights)
    unit_scores = scorer(models, plan, options.importance, weights)
    dedup = eligible = eligible_spaces(plan)
    scores = {s: ranked_scores(unit_scores(s), models) for s in dedup}
    acts = activation_signatures(models, plan, inputs) if options.dedup_criterion == "activations" else None
    member_sizes = [plan.space_sizes(tensors_of(m)) for m in models]
    where = next(iter(tensors_of(models[0]).values())).device
    owners = {s: torch.cat([torch.full((sz[s],), m, device=where) for m, sz in enumerate(member_sizes)])
              for s in plan.order}
    with torch.no_grad():
        wide = assemble(models, plan, weights)
        ts = tensors_of(wide)
        sizes, device = concat_sizes(member_sizes), next(iter(ts.values())).device
        while True:
            classes, partial = _walk(ts, plan, sizes, scores, want, options, base, dedup, acts, owners)
            bad = _failing(ts, plan, sizes, classes, options.dedup_threshold, partial)
            if not bad:
                break
            dedup = dedup - bad
        classes = {s: first_slots(c) for s, c in classes.items()}
        _fold(ts, plan, sizes, classes)
        unit_weights = {s: torch.cat([torch.full((sz[s],), float(w), dtype=torch.float64, device=device)
                                      for sz, w in zip(member_sizes, weights)]) for s in dedup}
        _average_incoming(ts, plan, sizes, classes, unit_weights)
    keep = {}
    for s, choice in classes.items():
        kept = (choice.into == torch.arange(len(choice.into), device=choice.into.device)).nonzero().squeeze(1)
        keep[s] = None if len(kept) == len(choice.into) else kept
    if merged is not None:
        names = space_names(plan)
        for s in sorted(eligible):       # a space that fell back to plain NT counts 0
            into = classes[s].into
            count = int(((into >= 0) & (into != torch.arange(len(into), device=into.device))).sum())
            merged[names.get(s, str(s))] = merged.get(names.get(s, str(s)), 0) + count
    return assemble([wide], plan, [1.0], keep, sizes=[sizes])
