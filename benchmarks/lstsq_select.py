"""Does choosing NT's kept units by least squares instead of magnitude help the repair? MNIST-1D.

An experiment, not a fusion option: NT keeps the units of largest weight magnitude and the
repair (fusion/repair) then refits the kept units' weights. Here the kept set itself is chosen
on calibration data, for chain models only (every hidden space made by one layer and read by
one Linear or Conv1d/Conv2d layer without groups or dilation, as the MNIST-1D MLP and CNN are):

  from the output layer back to the first hidden layer, each space keeps the units whose
  outputs best explain, by ridge least squares with a constant term, what its consumer computes
  in the concatenated model: the weighted logits for the output layer, the pre-activations at
  the already chosen units of the next space otherwise. Units are dropped one at a time, always
  the one whose loss costs the least (backward elimination over the units' input columns;
  a convolution's unit is its kernel-wide group of columns, a flattened Linear's its positions).

The consumer inputs are the concatenated model's (the members' side by side), not the repaired
model's. A third rule, `energy`, scores each unit alone by the energy of its contribution to its
consumer's output on the calibration inputs (data-aware, but blind to units that duplicate
others). `python benchmarks/lstsq_select.py` prints one-shot test accuracy of NT + repair with
magnitude and with the two other rules, per seed, and the paired differences to magnitude;
`benchmarks/finetune_recipes.py --select lstsq` fine-tunes what it gives. Run:
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/lstsq_select.py [--models cnn1d mlp] [--seeds 10]
"""

import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ntdist.fusion import analyze
from ntdist.fusion.pruning.importance import DEFAULT_IMPORTANCE
from ntdist.fusion.pruning.select import select, targets, top
from ntdist.fusion.repair import RIDGE, repair
from ntdist.fusion.repair.capture import reach
from ntdist.fusion.wide.assemble import assemble, tensors_of
from ntdist.records.stats import paired

ROWS = 1 << 16   # input rows (inputs x positions) used per consumer, at most


def _rows(module: nn.Module, x: torch.Tensor, factor: int) -> torch.Tensor:
    """The consumer's input as rows x units x columns per unit (a unit's columns: its kernel or positions)."""
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], -1, factor)
    if module.groups != 1 or any(d != 1 for d in module.dilation) or isinstance(module.padding, str):
        raise ValueError(f"{type(module).__name__} with groups, dilation or string padding is not a chain layer")
    if isinstance(module, nn.Conv1d):
        p, k, s = module.padding[0], module.kernel_size[0], module.stride[0]
        patches = F.pad(x, (p, p)).unfold(2, k, s)                    # N x C x L' x k
        return patches.permute(0, 2, 1, 3).reshape(-1, x.shape[1], k)
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, padding=module.padding, stride=module.stride)   # N x C*kk x L
        return cols.transpose(1, 2).reshape(-1, x.shape[1], cols.shape[1] // x.shape[1])
    raise ValueError(f"{type(module).__name__} is not a Linear, Conv1d or Conv2d layer")


def _columns(weight: torch.Tensor, units: int) -> torch.Tensor:
    """A consumer's weight as outputs x units x columns per unit."""
    return weight.reshape(weight.shape[0], units, -1)


def _wide_weight(layers, weights, out_keep, units, output: bool) -> torch.Tensor:
    """The concatenated consumer's weight (outputs x wide units x columns): members' blocks on the diagonal,
    or side by side and weighted for the output layer; only the rows `out_keep` of a hidden consumer."""
    blocks = [_columns(l.weight.detach().double(), u) for l, u in zip(layers, units)]
    if output:
        return torch.cat([b * w for b, w in zip(blocks, weights)], 1)
    rows = sum(b.shape[0] for b in blocks)
    wide = torch.zeros(rows, sum(units), blocks[0].shape[2], dtype=torch.float64)
    r = c = 0
    for b in blocks:
        wide[r:r + b.shape[0], c:c + b.shape[1]] = b
        r, c = r + b.shape[0], c + b.shape[1]
    return wide if out_keep is None else wide[out_keep]


def _explained(gram: torch.Tensor, cross: torch.Tensor, units, per_unit: int, ridge: float) -> float:
    """Target energy explained by ridge least squares on the columns of `units` and the constant (last)."""
    idx = torch.tensor([u * per_unit + j for u in units for j in range(per_unit)] + [gram.shape[0] - 1])
    g = gram[idx][:, idx].clone()
    g.diagonal()[:-1] += ridge
    c = cross[idx]
    return (c * torch.linalg.solve(g, c)).sum().item()


def eliminate(gram: torch.Tensor, cross: torch.Tensor, n_units: int, per_unit: int, count: int,
              ridge: float = RIDGE) -> torch.Tensor:
    """Sorted indices of `count` units kept by backward elimination (each step drops the unit whose loss
    explains the least less)."""
    lam = ridge * gram.diagonal()[:-1].mean().item()
    kept = list(range(n_units))
    while len(kept) > count:
        drop = max(kept, key=lambda u: _explained(gram, cross, [v for v in kept if v != u], per_unit, lam))
        kept.remove(drop)
    return torch.tensor(kept)


@torch.no_grad()
def lstsq_keep(members, plan, weights, calibration: torch.Tensor, seed: int = 0) -> dict:
    """space -> sorted kept indices into the concatenated space, chosen from the output back (chain models)."""
    readers = {}
    for n, l in plan.layers.items():
        for d in l.inp or ():
            readers.setdefault(d.space, []).append(n)
    keep = {}
    gen = torch.Generator().manual_seed(seed)
    for space in reversed(plan.order):
        if len(readers.get(space, ())) != 1 or len(plan.layers[readers[space][0]].inp) != 1:
            raise ValueError(f"space {space} is not the only input of exactly one layer: not a chain model")
        name = readers[space][0]
        layer, factor = plan.layers[name], plan.layers[name].inp[0].factor
        output = layer.out is None
        mods = [m.get_submodule(name) for m in members]
        parts = [_rows(mod, reach(m, name, calibration, "input"), factor) for mod, m in zip(mods, members)]
        units = [p.shape[1] for p in parts]
        x = torch.cat(parts, 1).double()
        if x.shape[0] > ROWS:
            x = x[torch.randperm(x.shape[0], generator=gen)[:ROWS]]
        x = torch.cat([x.reshape(x.shape[0], -1), torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
        out_keep = None if output else keep[layer.out[0].space]
        w = _wide_weight(mods, weights, out_keep, units, output)
        w = torch.cat([w.reshape(w.shape[0], -1), torch.zeros(w.shape[0], 1, dtype=w.dtype)], 1)
        gram = x.T @ x
        keep[space] = eliminate(gram, gram @ w.T, sum(units), (x.shape[1] - 1) // sum(units), plan.sizes[space])
    return keep


@torch.no_grad()
def energy_keep(members, plan, calibration: torch.Tensor) -> dict:
    """space -> the units whose contribution to their consumer's output has the largest energy on the calibration
    inputs (each unit scored alone: what least squares adds over it is seeing which units duplicate others)."""
    keep = {}
    for space in plan.order:
        name = next(n for n, l in plan.layers.items() if l.inp and l.inp[0].space == space)
        scores = []
        for m in members:
            module = m.get_submodule(name)
            x = _rows(module, reach(m, name, calibration, "input"), plan.layers[name].inp[0].factor).double()
            w = _columns(module.weight.detach().double(), x.shape[1])
            scores.append(torch.einsum("ouc,ruc->ruo", w, x).square().sum((0, 2)))
        keep[space] = top(torch.cat(scores), plan.sizes[space])
    return keep


HOWS = ("magnitude", "lstsq", "energy")


def repaired(members, calibration, how: str):
    """NT + repair of `members` (equal weights, members' width) keeping units by magnitude or by least squares."""
    plan = analyze(members[0], calibration[:2])
    weights = [1.0 / len(members)] * len(members)
    if how == "lstsq":
        keep = lstsq_keep(members, plan, weights, calibration)
    elif how == "energy":
        keep = energy_keep(members, plan, calibration)
    else:
        keep = select(members, plan, DEFAULT_IMPORTANCE, targets(plan, plan.space_sizes(tensors_of(members[0])), 1.0),
                      weights)
    return repair(members, plan, weights, keep, assemble(members, plan, weights, keep), calibration)


def main():
    from finetune_recipes import Scorer, calibration_of, members_of, setup
    from repair_mnist1d import CONFIGS, ROOT
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--cache", default=os.path.join(ROOT, "runs", "finetune_recipes", "members"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.models:
        cfg, spec, splits = setup(name, [])
        score, rows = Scorer(splits), []
        for seed in range(args.seeds):
            cfg.train.seed = seed
            members = members_of(cfg, spec, splits, args.cache, name)
            calibration = calibration_of(cfg, splits)
            rows.append({how: 100 * score(repaired(members, calibration, how))["test"] for how in HOWS})
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.1f}" for k, v in rows[-1].items()), flush=True)
        for how in HOWS[1:]:
            d = paired([r[how] for r in rows], [r["magnitude"] for r in rows])
            print(f"{name}: {how} − magnitude {d['mean']:+.2f} ± {d['std']:.2f} points, p = {d['p']:.2g}, "
                  f"{d['wins']}/{d['n']} ahead", flush=True)


if __name__ == "__main__":
    main()
