"""The arithmetic of the pairwise schedules: which pairs meet in which round, and folding along them.

`recursive_plan(k)` is the tree that `fuse(..., schedule="recursive")` and the
distributed tree (`ntdist.distributed.tree`) both follow, so the two give
bit-identical weights; `fold` applies any pairwise step along a schedule.
"""

from typing import List, Tuple

from ntdist.errors import UserError

SCHEDULES = ("flat", "iterative", "recursive")
DEFAULT_SCHEDULE = "recursive"   # of fuse(), fusion.schedule and ntdist fuse: the tree the ranks follow too


def recursive_plan(k: int) -> List[List[Tuple[int, int, int, int]]]:
    """The pairwise tree: rounds of (left, right, leaves_left, leaves_right).

    Indices name the leftmost leaf (rank) of each subtree; the result of a pair
    is held by `left`. With an odd count the last subtree waits a round.
    """
    if k < 1:
        raise UserError(f"need at least one model, got {k}")
    alive, leaves, rounds = list(range(k)), [1] * k, []
    while len(alive) > 1:
        steps = []
        for i in range(0, len(alive) - 1, 2):
            left, right = alive[i], alive[i + 1]
            steps.append((left, right, leaves[left], leaves[right]))
            leaves[left] += leaves[right]
        rounds.append(steps)
        alive = alive[::2]
    return rounds


def recursive_pairs(k: int) -> List[List[Tuple[int, int]]]:
    """`recursive_plan(k)` without the leaf counts: rounds of (left_index, right_index)."""
    return [[(l, r) for l, r, _, _ in steps] for steps in recursive_plan(k)]


def fold(models, weights, schedule: str, pair):
    """Reduce `models` with `pair(a, b, weight_a, weight_b)` along the iterative chain or the recursive tree."""
    if schedule == "iterative":
        acc, acc_w = models[0], weights[0]
        for model, w in zip(models[1:], weights[1:]):
            acc = pair(acc, model, acc_w, w)
            acc_w += w
        return acc
    held, held_w = dict(enumerate(models)), dict(enumerate(weights))
    for steps in recursive_plan(len(models)):
        for left, right, _, _ in steps:
            held[left] = pair(held[left], held.pop(right), held_w[left], held_w[right])
            held_w[left] += held_w.pop(right)
    return held[0]
