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
"""

from ntdist.fusion.plan import Dim, Layer, Tup, Val
from ntdist.fusion.shapes import refuse


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
