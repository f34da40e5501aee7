"""What NT's repair costs: time and peak memory relative to one forward of the concatenated model.

For k = 2 members of each model (random init, nothing downloaded), NT's selection at the
members' width is computed once; then, on the CPU, the benchmark measures

- one forward of the concatenated model (`concat`) over the calibration set, no gradients;
- `repair` of the pruned model to the members on the same calibration set;

each `--runs` times, interleaved (the medians are reported), and the peak tensor memory each allocates
beyond the models and inputs (torch's profiler, in a separate run that is not timed).
Models: an MLP of width 4096 (3 hidden layers, 3x32x32 inputs flattened), torchvision's
resnet18 and resnet50 (32x32 inputs) and vit_b_16 (image_size 32, its smallest: 2x2 patches).
Run with one thread, e.g. in the background:

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/repair_cost.py [--models mlp resnet18]
        [--samples 256] [--runs 3] [--out repair_cost.json]

It prints one line per model and writes them as JSON to `--out`. Figures and the machine:
docs/PERFORMANCE.md, "Repair".
"""

import argparse
import copy
import json
import platform
import statistics
import time

import torch
import torchvision

from ntdist.commands.bench import peak_tensor_bytes
from ntdist.fusion import analyze, concat
from ntdist.fusion.pruning.select import select, targets
from ntdist.fusion.repair import repair
from ntdist.fusion.wide.assemble import assemble, tensors_of
from ntdist.models import MLP

MODELS = {
    "mlp": (lambda: MLP(3 * 32 * 32, 10, width=4096, depth=3), (3, 32, 32)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32)),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), (3, 32, 32)),
    "vit_b_16": (lambda: torchvision.models.vit_b_16(num_classes=10, image_size=32), (3, 32, 32)),
}


def seconds(fns, runs: int):
    """Median wall time of `runs` calls of each of `fns`, interleaved (a, b, a, b, ...) so that every one of them
    sees the same background load."""
    times = [[] for _ in fns]
    for _ in range(runs):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def measure(name: str, samples: int, runs: int) -> dict:
    build, shape = MODELS[name]
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        members.append(build().eval())
    x = torch.randn(samples, *shape, generator=torch.Generator().manual_seed(2))
    plan = analyze(members[0], x[:2])
    weights = [0.5, 0.5]
    keep = select(members, plan, "group_l2", targets(plan, plan.space_sizes(tensors_of(members[0])), 1.0), weights)
    pruned = assemble(members, plan, weights, keep)
    wide = concat(members, example_inputs=x[:2]).eval()

    @torch.no_grad()
    def forward():
        wide(x)

    notes = []

    def refit():
        repair(members, plan, weights, keep, copy.deepcopy(pruned), x, notes=notes)

    forward()                                  # warm-up: allocator and kernels
    forward_s, repair_s = seconds([forward, refit], runs)
    row = {"model": name, "samples": samples, "runs": runs, "input": list(shape), "forward_s": forward_s,
           "repair_s": repair_s, "forward_peak_mib": peak_tensor_bytes(forward) / 2 ** 20}
    pruned_bytes = sum(t.numel() * t.element_size() for t in pruned.state_dict().values())
    row["repair_peak_mib"] = (peak_tensor_bytes(refit) - pruned_bytes) / 2 ** 20   # less the copy of the pruned model
    row["time_ratio"] = row["repair_s"] / row["forward_s"]
    row["memory_ratio"] = row["repair_peak_mib"] / row["forward_peak_mib"]
    row["notes"] = sorted(set(notes))
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    machine = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {machine}", flush=True)
    for name in args.models:
        row = measure(name, args.samples, args.runs)
        rows.append(row)
        print(f"{name:9s} forward {row['forward_s']:.3f} s, {row['forward_peak_mib']:.1f} MiB; repair "
              f"{row['repair_s']:.3f} s ({row['time_ratio']:.1f}x), {row['repair_peak_mib']:.1f} MiB "
              f"({row['memory_ratio']:.1f}x); {len(row['notes'])} layer(s) left as pruned", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
