"""NT with Torch-Pruning as the pruner (`fusion.pruner: torch_pruning`): the authors' pipeline, for comparison.

ntdist's own pruner (`fusion.pruner: ntdist`) never builds the wide model: it
scores every member's units and copies the kept ones straight into place
(`prune.select` + `assemble`). The authors' code instead concatenates the
members into the wide model and prunes it with Torch-Pruning. This module
does exactly that: the wide model from `concat`'s code (`assemble` with every
unit kept), Torch-Pruning's `MetaPruner` with `GroupMagnitudeImportance(p=2)`,
local (per-layer) ranking, the output layer ignored, and every hidden layer
pruned to ntdist's exact target width (not Torch-Pruning's truncated
`int(n * (1 - ratio))`, which can be one short). The result is loaded with
`strict=True` into a copy of the reference member, so it is a plain instance
of the original class. Torch-Pruning is imported only here, when asked for.
"""

import warnings
from typing import Dict, Sequence

import torch
import torch.nn as nn

from ntdist.errors import UserError, check_choice
from ntdist.fusion.wide.assemble import assemble, clone_with, tensors_of
from ntdist.fusion.checks import check_finite
from ntdist.fusion.pruning.importance import group_l2, resolve
from ntdist.fusion.analysis.plan import OUT, Plan

PRUNERS = ("ntdist", "torch_pruning")
DEFAULT_PRUNER = "ntdist"
INSTALL_HINT = "pip install torch-pruning (or pip install 'ntdist[pruning]')"
# Layer kinds whose widening Torch-Pruning's dependency graph follows the same way ntdist does; the
# rest (grouped convs, LayerNorm, attention, parameters read in forward) it prunes differently or not at all.
SUPPORTED_KINDS = ("linear", "conv", "dwconv", "bn")


def import_torch_pruning():
    """The torch_pruning module, or one UserError line saying how to install it."""
    try:
        import torch_pruning
    except ImportError:
        raise UserError(f"pruner 'torch_pruning' needs the Torch-Pruning package, which is not installed: "
                        f"{INSTALL_HINT}; or use pruner 'ntdist'") from None
    return torch_pruning


def check_supported(plan: Plan) -> None:
    """UserError unless Torch-Pruning can prune this model's concatenation unit for unit like ntdist."""
    reason = ""
    if plan.atoms or plan.shuffles or plan.widths:
        reason = "it routes channels by position (a channel shuffle, a split inside a layer or a constant width)"
    elif plan.coupled:
        reason = "it has grouped convolutions (Torch-Pruning keeps channels per group, ntdist whole groups)"
    for name, layer in plan.layers.items():
        if reason:
            break
        if layer.kind not in SUPPORTED_KINDS:
            reason = f"layer '{name}' is of kind '{layer.kind}'"
        elif (layer.out is not None and len(layer.out) > 1) or (layer.inp is not None and len(layer.inp) > 1):
            reason = f"layer '{name}' reads or writes concatenated channels"
    if reason:
        raise UserError(f"pruner 'torch_pruning' supports Linear/Conv/BatchNorm models without channel "
                        f"concatenation; this model is refused because {reason}; use pruner 'ntdist'")


def _example(plan: Plan, wide: nn.Module, example_inputs):
    """Torch-Pruning traces by running the model: `example_inputs`, or a random batch for an MLP."""
    if example_inputs is not None:
        return example_inputs
    first = next((m for m in wide.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))), None)
    if isinstance(first, nn.Linear):
        return torch.randn(2, first.in_features, device=first.weight.device, dtype=first.weight.dtype)
    raise UserError("pruner 'torch_pruning' runs the model to trace it; pass example_inputs (one input batch)")


def _output_layer(plan: Plan, wide: nn.Module) -> nn.Module:
    names = {spec.module for spec in plan.tensors.values() if spec.role == "output"}
    if len(names) != 1:
        raise UserError(f"pruner 'torch_pruning' needs exactly one output layer, found {sorted(names)}")
    return wide.get_submodule(names.pop())


def pruning_ratios(plan: Plan, wide: nn.Module, want: Dict[int, int]) -> Dict[nn.Module, float]:
    """Per-layer Torch-Pruning ratios that leave exactly `want[space]` units of every hidden space.

    Torch-Pruning keeps int(n * (1 - ratio)) channels; asking for (want + 0.5) / n keeps
    that count away from an integer, so float rounding cannot make it one short.
    """
    sizes = plan.space_sizes(tensors_of(wide))
    ratios = {}
    for name, layer in plan.layers.items():
        if layer.kind not in ("linear", "conv") or layer.out is None or layer.out[0].space == OUT:
            continue
        space = layer.out[0].space
        if space in want and want[space] < sizes[space]:
            ratios[wide.get_submodule(name)] = 1.0 - (want[space] + 0.5) / sizes[space]
    return ratios


def tp_prune_wide(wide: nn.Module, plan: Plan, want: Dict[int, int], example_inputs=None) -> nn.Module:
    """Prune the wide model in place with Torch-Pruning (group L2 magnitude, local ranking) to `want` units."""
    tp = import_torch_pruning()
    example = _example(plan, wide, example_inputs)
    ratios = pruning_ratios(plan, wide, want)
    if ratios:
        was_training = wide.training
        wide.eval()         # tracing runs forward once; BatchNorm statistics must not move
        # Torch-Pruning traces through autograd, so it must run with gradients on even inside no_grad
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")     # Torch-Pruning warns about unwrapped parameters and versions
            pruner = tp.pruner.MetaPruner(
                wide, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                global_pruning=False, pruning_ratio=0.0, pruning_ratio_dict=ratios,
                ignored_layers=[_output_layer(plan, wide)])
            pruner.step()
        wide.train(was_training)
    got = plan.space_sizes(tensors_of(wide))
    wrong = {s: (got[s], want[s]) for s in want if got[s] != want[s]}
    if wrong:
        raise UserError(f"Torch-Pruning left {len(wrong)} hidden layer(s) at the wrong width (got, wanted): "
                        f"{sorted(wrong.values())}; use pruner 'ntdist'")
    return wide


def tp_nt_step(models: Sequence[nn.Module], weights: Sequence[float], plan: Plan, want: Dict[int, int],
               reference: nn.Module, example_inputs=None) -> nn.Module:
    """NT the authors' way: materialise the concatenation of `models`, prune it with Torch-Pruning.

    At the reference's width the result is a copy of `reference` into which the pruned
    wide model's state dict was loaded with strict=True; at any other width it is the
    pruned wide model itself (Torch-Pruning updated its layers' attributes).
    """
    check_supported(plan)
    check_finite(models)
    wide = tp_prune_wide(assemble(models, plan, list(weights)), plan, want, example_inputs)
    if want != plan.space_sizes(tensors_of(reference)):
        return wide
    # the reference may live on the meta device (the distributed tree's template): allocate beside the members
    device = next(iter(tensors_of(models[0]).values())).device
    fused = clone_with(reference, {n: torch.empty(t.shape, dtype=t.dtype, device=device)
                                   for n, t in tensors_of(reference).items()})
    fused.load_state_dict(wide.state_dict(), strict=True)
    return fused


def check_pruner(pruner: str, order: str, dedup: bool, importance, where: str = "pruner") -> None:
    """UserError unless `pruner` is known and meaningful with this order, dedup and importance (NT's options)."""
    check_choice(pruner, PRUNERS, where)
    if pruner == DEFAULT_PRUNER:
        return
    if resolve(importance) is not group_l2:
        raise UserError(f"{where} '{pruner}' ranks units with Torch-Pruning's group magnitude importance "
                        f"(ntdist's 'group_l2'); importance {getattr(importance, '__name__', importance)!r} "
                        f"needs {where} '{DEFAULT_PRUNER}'")
    if order != "merge_prune":
        raise UserError(f"{where} '{pruner}' prunes the concatenated model (order merge_prune), got order {order!r}")
    if dedup:
        raise UserError(f"{where} '{pruner}' cannot merge duplicate units; turn dedup off or use {where} "
                        f"'{DEFAULT_PRUNER}'")
