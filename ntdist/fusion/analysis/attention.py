"""Rules of the channel-space analysis for transformer pieces: multi-head attention and token indexing.

Attention heads are units. `nn.MultiheadAttention` projects its input with one
fused `in_proj_weight` whose rows are [queries; keys; values], each laid out
head by head (head h owns features h * head_dim ... (h + 1) * head_dim - 1).
The heads form one space with factor head_dim, appearing three times along
those rows and once along `out_proj`'s columns, so widening keeps the members'
heads side by side: the concatenated module has k times the heads, each
reading only its member's block of the residual stream, and NT keeps whole
heads (`num_heads` follows; `head_dim` never changes). Indexing a token
(`x[:, 0]`, the class token) drops a dimension that is not the channels.

MaxViT's `RelativePositionalMultiHeadAttention` is traced as one module (a leaf
of `symbolic_trace` below, used for the analysis and for every rewrite of the
concatenated model), since inside it splits `to_qkv`'s output into queries,
keys and values and reads its head count as a constant: `to_qkv` rows are laid
out as `in_proj_weight`'s, `merge` reads the heads, the relative position table
has one column per head, and `n_heads` is set to the heads kept (k times in the
concatenated model, the members' count after NT).
"""

from torch import fx

from ntdist.fusion.analysis.plan import Dim, Layer, Tup, Val
from ntdist.fusion.analysis.shapes import one, refuse

RELATIVE_ATTENTION = "torchvision.models.maxvit.RelativePositionalMultiHeadAttention"
LEAVES = {RELATIVE_ATTENTION}


def class_name(mod) -> str:
    return f"{type(mod).__module__}.{type(mod).__qualname__}"


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m, qualified_name):
        return class_name(m) in LEAVES or super().is_leaf_module(m, qualified_name)


def symbolic_trace(model) -> fx.GraphModule:
    """`torch.fx.symbolic_trace`, keeping the attention modules in LEAVES whole."""
    tracer = _Tracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def relative_attention(name, mod, x, sp, layers):
    """MaxViT's attention on channels-last tokens: heads are one space; `merge` opens a new one."""
    if x.ndim is None or x.cdim != x.ndim - 1:
        refuse(name, f"(relative attention) reads the last dimension but the channels are dimension {x.cdim}")
    if name in layers:
        refuse(name, "(relative attention) is called twice; fusion follows each attention module once")
    n, hd = mod.n_heads, mod.head_dim
    if mod.to_qkv.out_features != 3 * n * hd or mod.merge.in_features != n * hd or \
            mod.relative_position_bias_table.shape[1] != n:
        refuse(name, f"(relative attention) has layers that do not match its {n} heads of {hd} features")
    space = sp.new(n, name)
    heads = (Dim(space, hd),)
    layers[name] = Layer("heads", one(space), x.lay)
    layers[f"{name}.to_qkv"] = Layer("linear", heads * 3, x.lay)
    layers[f"{name}.relative_position_bias_table"] = Layer("param", one(space), one(space), 1)
    out = sp.open(f"{name}.merge", mod.merge.out_features)
    layers[f"{name}.merge"] = Layer("linear", out, heads)
    return Val(out, x.ndim, x.hw, x.cdim)


def multi_head_attention(name, mod, vals, sp, layers):
    """`nn.MultiheadAttention(query, key, value)`: heads are one space; the output opens a new one."""
    if len(vals) != 3:
        refuse(name, "(MultiheadAttention) needs query, key and value as tensors")
    if not mod._qkv_same_embed_dim or mod.bias_k is not None or mod.bias_v is not None:
        refuse(name, "(MultiheadAttention) has separate key/value widths or extra key/value biases")
    if name in layers:
        refuse(name, "(MultiheadAttention) is called twice; fusion follows each attention module once")
    x = vals[0]
    if x.ndim is None or x.cdim != x.ndim - 1:
        refuse(name, f"(MultiheadAttention) reads the last dimension but the channels are dimension {x.cdim}")
    for v in vals[1:]:                 # one weight matrix reads all three: their channels are one layout
        sp.union_layouts(x.lay, v.lay, name)
    heads = (Dim(sp.new(mod.num_heads, name), mod.head_dim),)
    layers[name] = Layer("mha", heads * 3, x.lay)
    out = sp.open(f"{name}.out_proj", mod.embed_dim)
    layers[f"{name}.out_proj"] = Layer("linear", out, heads)
    return Tup((Val(out, x.ndim, x.hw, x.cdim), None))


def index(name, x, idx):
    """`x[idx]` with plain integers and slices on dimensions other than the channels."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if x.ndim is None or len(idx) > x.ndim:
        refuse(name, "indexes a feature tensor of unknown rank")
    ndim, cdim = x.ndim, x.cdim
    for d, i in enumerate(idx):
        if isinstance(i, slice) and i == slice(None):
            continue
        if d == x.cdim:
            refuse(name, "indexes or slices the channels of a feature tensor")
        if isinstance(i, bool) or not isinstance(i, (int, slice)):
            refuse(name, f"indexes a feature tensor with {type(i).__name__}, which the fusion does not follow")
        if isinstance(i, int):
            ndim -= 1
            cdim -= 1 if d < x.cdim else 0
    return Val(x.lay, ndim, None, cdim)
