"""One vectorised training step of k members: the way ntdist took it before against the way it takes it now.

    .venv/bin/python benchmarks/vectorized_step.py [--k 8] [--batch 32] [--steps 200] [--repeats 9]

Width-32 MLPs (64-32-32-10) on random digits-shaped data, SGD with momentum, 1 torch thread.
`before`: k index gathers and a stack, cross-entropy inside vmap, functional_call re-tying weights.
`now`: one gather over [k, B] indices, one cross-entropy over the k*B logits, no re-tying (as
`ntdist.stages.vectorized`). Both sides alternate, so they see the same background load; prints the
median milliseconds per step of each, their ratio and the load average.
"""

import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def ms_per_step(models, x_all, y_all, order, batch: int, steps: int, now: bool) -> float:
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    if now:
        forward = vmap(lambda p, b, x: functional_call(base, (p, b), (x,), tie_weights=False))
    else:
        forward = vmap(lambda p, b, x, y: F.cross_entropy(functional_call(base, (p, b), (x,)), y))
    optimizer = torch.optim.SGD(list(params.values()), lr=0.05, momentum=0.9, weight_decay=5e-4)
    total = torch.zeros(len(models), dtype=torch.float64)
    start = time.perf_counter()
    for step in range(steps):
        first = (step * batch) % (order.shape[1] - batch)
        take = order[:, first:first + batch]
        if now:
            x, y = x_all[take], y_all[take]
            logits = forward(params, buffers, x)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(0, 1), reduction="none").view(len(y), -1).mean(1)
        else:
            x, y = torch.stack([x_all[t] for t in take]), torch.stack([y_all[t] for t in take])
            loss = forward(params, buffers, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimizer.step()
        total += loss.detach().double() * batch
    total.tolist()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    models = [mlp() for _ in range(args.k)]
    x_all, y_all = torch.randn(1437, 1, 8, 8), torch.randint(0, 10, (1437,))
    order = torch.stack([torch.randperm(1437) for _ in range(args.k)])
    times = {"before": [], "now": []}
    for repeat in range(args.repeats + 1):   # the first round warms up and is not counted
        for side in times:
            ms = ms_per_step(models, x_all, y_all, order, args.batch, args.steps, side == "now")
            if repeat:
                times[side].append(ms)
    before, now = statistics.median(times["before"]), statistics.median(times["now"])
    print(f"k={args.k} batch={args.batch}: before {before:.2f} ms/step, now {now:.2f} ms/step, "
          f"{before / now:.2f}x; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
