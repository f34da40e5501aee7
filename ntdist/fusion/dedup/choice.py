"""How NT dedup decides, space by space, which units are kept, merged into a kept unit, or dropped.

Every function here takes the similarity matrix of a space's units (or None when
there is nothing to compare) and their importance, and returns a `Choice`:

- `choose`: in descending importance, a unit above the threshold with a kept unit
  joins it, any other takes a free slot; once the slots are full it is dropped
  (overflow "drop") or joins its most similar kept unit ("merge");
- `match` (overflow "match"): units of different members are joined into
  classes, the most similar pair first, until every pair above the threshold is
  joined and the classes fit the slots; a class holds at most one unit per
  member, so aligned replicas (periodic sync) join unit for unit, as averaging does;
- `first_slots` moves each class to its first unit in member order, `plain` is plain NT's choice.
"""

from typing import NamedTuple, Optional

import torch

OVERFLOWS = ("drop", "merge", "match")   # what becomes of a unit that is no duplicate once the slots are full


class Choice(NamedTuple):
    """One space's decision: for every unit of the wide space, its class representative and its destination."""

    rep: torch.Tensor    # the kept unit it duplicates (itself if kept on its own merit), -1 if dropped
    into: torch.Tensor   # the unit its outgoing weights go to: itself if kept, rep if merged, -1 if dropped
    classes: torch.Tensor  # compact class id per unit (what consumers' rows are summed over), -1 if dropped
    count: int           # number of classes
    forced: torch.Tensor  # merged below the threshold (overflows "merge" and "match"): not a duplicate


def choose(sim: Optional[torch.Tensor], scores: torch.Tensor, want: int, threshold: float,
           merge: bool = False) -> Choice:
    """Overflows "drop" and "merge" (`merge`): the walk in descending importance (module docstring).

    The walk reads a value per unit, which on a GPU would wait for the device each time; it runs on the
    host instead, after one copy of the similarities, and only its result goes back to the device."""
    n = scores.shape[0]
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    dev, host = scores.device, torch.device("cpu")
    sim = None if sim is None else sim.to(host)
    rep = torch.full((n,), -1, dtype=torch.long, device=host)
    best = torch.full((n,), -float("inf"), device=host)
    best_of = torch.full((n,), -1, dtype=torch.long, device=host)
    kept, twins = 0, []
    for c in order:
        if sim is not None and best[c] > threshold:
            rep[c] = best_of[c]
            twins.append(c)
        elif kept < want:
            rep[c] = c
            kept += 1
            if sim is not None:
                closer = sim[:, c] > best
                best = torch.where(closer, sim[:, c], best)
                best_of[closer] = c
    forced = torch.zeros(n, dtype=torch.bool, device=host)
    if merge and sim is not None:
        # a unit is only dropped once every slot is taken, so best_of already covers all kept units
        forced = (rep < 0) & (best_of >= 0)
        rep[forced] = best_of[forced]
    into = rep.clone()
    for c in twins[:max(0, want - kept)]:      # slots left with only duplicates: keep the best beside their twins
        into[c] = c
    return classes_of(rep.to(dev), into.to(dev), forced.to(dev))


def match(sim: Optional[torch.Tensor], scores: torch.Tensor, want: int, threshold: float,
          owner: torch.Tensor) -> Choice:
    """Overflow "match": join units of different members into classes, most similar pair first, until the
    classes fit the slots (and every pair above the threshold is joined); a class holds one unit per member."""
    n = scores.shape[0]
    if sim is None:
        return choose(sim, scores, want, threshold)
    dev = scores.device
    pairs = (torch.triu(torch.ones(n, n, dtype=torch.bool, device=dev), 1) & (owner[:, None] != owner[None, :])).nonzero()
    values = sim[pairs[:, 0], pairs[:, 1]]
    root, held = list(range(n)), [{int(o)} for o in owner.tolist()]
    forced = torch.zeros(n, dtype=torch.bool, device="cpu")   # set pair by pair below: on the host
    count = n

    def find(c):
        while root[c] != c:
            root[c] = root[root[c]]
            c = root[c]
        return c

    order = torch.sort(values, descending=True, stable=True).indices
    for (i, j), value in zip(pairs[order].tolist(), values[order].tolist()):   # lists: a Python loop over tensors crawls
        if value <= threshold and count <= want:
            break
        a, b = find(i), find(j)
        if a == b or held[a] & held[b]:
            continue
        root[b] = a
        held[a] |= held[b]
        count -= 1
        if value <= threshold:
            forced[[i, j]] = True
    roots_of = [find(c) for c in range(n)]
    group = torch.tensor(roots_of, device=dev)
    best = torch.full((n,), -float("inf"), dtype=scores.dtype, device=dev).scatter_reduce(0, group, scores, "amax")
    by_score = torch.sort(scores, descending=True, stable=True).indices.tolist()
    first = {}
    for c in by_score:       # a class is represented by its most important unit
        first.setdefault(roots_of[c], c)
    rep_of = torch.full((n,), -1, dtype=torch.long, device=dev)
    rep_of[list(first)] = torch.tensor(list(first.values()), device=dev)
    roots = group.unique()
    kept = roots[torch.sort(best[roots], descending=True, stable=True).indices[:want]]
    rep = torch.full((n,), -1, dtype=torch.long, device=dev)
    live = torch.isin(group, kept)
    rep[live] = rep_of[group[live]]
    into = rep.clone()
    twins = [c for c in by_score if rep[c] >= 0 and rep[c] != c]
    for c in twins[:max(0, want - len(kept))]:      # slots left: keep the best twins beside their class
        into[c] = c
    return classes_of(rep, into, forced.to(dev) & live)


def classes_of(rep: torch.Tensor, into: torch.Tensor, forced: Optional[torch.Tensor] = None) -> Choice:
    live = rep >= 0
    reps = rep[live].unique()
    lookup = torch.full_like(rep, -1)
    lookup[reps] = torch.arange(len(reps), device=rep.device)
    classes = torch.where(live, lookup[rep.clamp_min(0)], rep)
    forced = torch.zeros(len(rep), dtype=torch.bool, device=rep.device) if forced is None else forced
    return Choice(rep, into, classes, len(reps), forced)


def first_slots(choice: Choice) -> Choice:
    """The same classes, each kept in the slot of its first unit in member order instead of its most important.

    The function is the same (a class's incoming parameters become its mean, its outgoing
    weights the sum), but the fused units keep member 0's order wherever member 0 has a unit in
    the class: merging aligned replicas (periodic sync) then leaves every unit where it was, so
    an optimizer's per-unit state (momentum) still belongs to it.
    """
    n = len(choice.into)
    live = (choice.into >= 0).nonzero().squeeze(1)
    first = torch.full((n,), n, dtype=torch.long, device=live.device).scatter_reduce(0, choice.into[live], live, "amin")
    into, rep = choice.into.clone(), choice.rep.clone()
    into[live] = first[choice.into[live]]
    merged = rep >= 0
    rep[merged] = first[choice.into[rep[merged]]]
    return Choice(rep, into, choice.classes, choice.count, choice.forced)


def plain(keep: Optional[torch.Tensor], n: int, device=None) -> Choice:
    """Plain NT's choice for a space: the kept units, each its own class (on `device`)."""
    rep = torch.arange(n, device=device)
    if keep is not None:
        rep = torch.full((n,), -1, dtype=torch.long, device=device)
        rep[keep] = keep
    return classes_of(rep, rep.clone())
