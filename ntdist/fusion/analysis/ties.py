"""Tied weights on an fx graph: one layer called more than once in forward, or one Parameter reached under two
names.

The fx graph's rules widen each layer's input and output channels as spaces of their own and prune them
apart. A tie joins them: a square Linear applied twice reads its own output, so its input and output are one
space seen twice, and `self.b.weight = self.a.weight` makes two layers one. Concatenating such a model from
the fx graph would keep the shared layer at one member's width while its neighbours widen. `check_ties`
refuses the fx graph instead, naming the tie; `analyze` then tries the `torch.export` graph, which names every
parameter once, so its rules see the one space (`fusion/analysis/export.py`), and gives this refusal when that
graph cannot be read either.
"""

from collections import Counter
from typing import Dict, List, Tuple

import torch.fx as fx
import torch.nn as nn

from ntdist.errors import UserError

FIX = "fusion widens and prunes every layer on its own and cannot keep a tie: give each use a layer of its own " \
      "weights, or fuse with method avg"


def check_ties(model: nn.Module, gm: fx.GraphModule) -> None:
    """UserError naming the first tie of `model` (traced as `gm`): a tensor reached under two names, or a module
    with weights that `gm` calls more than once."""
    for names in _shared_tensors(model):
        raise UserError(f"{type(model).__name__} ties its weights: '{names[1]}' is the same tensor as "
                        f"'{names[0]}'; {FIX}")
    calls = Counter(node.target for node in gm.graph.nodes if node.op == "call_module")
    for target, count in calls.items():
        module = gm.get_submodule(target)
        if count > 1 and _holds_state(module):
            raise UserError(f"{type(model).__name__} calls layer '{target}' ({type(module).__name__}) {count} "
                            f"times in forward, so its weights are tied across the calls; {FIX}")


def _shared_tensors(model: nn.Module) -> List[Tuple[str, ...]]:
    """The names of each parameter or buffer reached under more than one name: held by two modules, or by one
    module registered twice (fusion would widen it under one name and keep it under the other)."""
    names: Dict[int, List[str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for attr, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is not None:
                names.setdefault(id(t), []).append(f"{mname}.{attr}" if mname else attr)
    return [tuple(found) for found in names.values() if len(found) > 1]


def _holds_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())
