"""`nn.MultiheadAttention` in the repair: heads are units, and the module is refitted in two regressions.

NT keeps whole heads (`fusion/analysis/attention.py`): the concatenated module has k
times the heads, each reading only its member's block of the residual stream, and the
pruned module keeps some of them. `refit._Fit.refit_attention` refits it on the pruned
model's input to the module (as repaired so far), one row per token as for a
channels-last Linear (`positions` tokens per input):

1. `in_proj_weight` and `in_proj_bias`, queries, keys and values in one regression:
   the targets are the concatenated model's q, k and v of the kept heads, which are
   each member's own `in_proj` applied to that member's input to the module
   (`projections`).
2. `out_proj`: the rows are the pruned module's attention context recomputed with the
   refitted projections (`context`: per head softmax(q k^T / sqrt(head_dim)) v, the
   heads merged), the targets the concatenated model's attention output at the kept
   channels of the space `out_proj` writes (member m's output at its kept channels).

`MultiheadAttention.forward` reads `out_proj`'s weights itself (it never calls it as a
module), hence the recomputed context. It reproduces self-attention only: query, key and
value one tensor, no masks, no zero-attention row. Any other call is left as NT pruned
it, with the reason (`call_reason`).
"""

import inspect
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

NOT_REFITTED = "mha layer (MultiheadAttention) is not refitted"
_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def call_reason(module: nn.Module, args: tuple, kwargs: dict) -> str:
    """Why a call of `module` with these arguments is not refitted, or '' when it is plain self-attention."""
    if type(module).forward is not nn.MultiheadAttention.forward:
        return f"{NOT_REFITTED}: {type(module).__name__} has a forward of its own"
    given = _SIGNATURE.bind(module, *args, **kwargs).arguments
    if not (given["query"] is given["key"] is given["value"]):
        return f"{NOT_REFITTED}: its key or value is not its query (only self-attention is)"
    for mask in ("attn_mask", "key_padding_mask"):
        if given.get(mask) is not None:
            return f"{NOT_REFITTED}: called with {mask} (only attention without masks is)"
    if given.get("is_causal"):
        return f"{NOT_REFITTED}: called with is_causal (only attention without masks is)"
    if module.add_zero_attn:
        return f"{NOT_REFITTED}: add_zero_attn is set"
    return ""


def call_reasons(model: nn.Module, names: List[str], x: torch.Tensor) -> Dict[str, str]:
    """`call_reason` of the first call of each module `names` when `model` runs on `x` (one forward)."""
    reasons: Dict[str, str] = {}

    def hook(name):
        def check(module, args, kwargs):
            reasons.setdefault(name, call_reason(module, args, kwargs))
        return check

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n), with_kwargs=True) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return reasons


def batch_first(module: nn.MultiheadAttention, t: torch.Tensor) -> torch.Tensor:
    """A query or output of `module` as [batch, tokens, features] (unbatched: a batch of one)."""
    if t.dim() == 2:
        return t[None]
    return t if module.batch_first else t.transpose(0, 1)


def query_and_output(module: nn.MultiheadAttention, call: Tuple[tuple, dict, object]
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(query, attention output), both [batch, tokens, features], of a call of `module` (`capture.reach_call`)."""
    args, kwargs, output = call
    query = _SIGNATURE.bind(module, *args, **kwargs).arguments["query"]
    return batch_first(module, query), batch_first(module, output[0])


def projections(module: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """The queries, keys and values of `module` on `x` [batch, tokens, embed]: [batch, tokens, 3 embed]."""
    return F.linear(x, module.in_proj_weight, module.in_proj_bias)


def context(module: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """The attention context of `module` on `x` [batch, tokens, embed] before `out_proj`: [batch, tokens, embed]."""
    heads = lambda t: t.unflatten(-1, (module.num_heads, module.head_dim)).transpose(1, 2)  # noqa: E731
    q, k, v = (heads(t) for t in projections(module, x).chunk(3, -1))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


@torch.no_grad()
def install_projections(module: nn.MultiheadAttention, coef: torch.Tensor) -> None:
    """Write coefficients [1, embed (+1), 3 embed] from `lstsq.solve` into `in_proj_weight` (and its bias)."""
    d = module.in_proj_weight.shape[1]
    module.in_proj_weight.copy_(coef[0, :d].T)
    if module.in_proj_bias is not None:
        module.in_proj_bias.copy_(coef[0, d])


def owner(plan_layers: Dict, name: str) -> Optional[str]:
    """The MultiheadAttention layer whose `out_proj` is `name`, or None."""
    parent, _, last = name.rpartition(".")
    layer = plan_layers.get(parent)
    return parent if last == "out_proj" and layer is not None and layer.kind == "mha" else None
