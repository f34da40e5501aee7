"""Rules of the channel-space analysis for windowed attention: torchvision's Swin v1/v2 free functions.

Swin writes its attention as functions that torch.fx keeps whole (`torch.fx.wrap`),
so the analysis sees one node per call and reads the parameters passed to it;
each rule below is keyed by the function's qualified name (no model library
is imported). As in `attention.py`, heads are units: `shifted_window_attention`
reads `qkv` rows as [queries; keys; values], each head by head, so the heads
form one space with factor head_dim, three times along `qkv`'s rows and once
along `proj`'s columns. Everything else with one entry per head follows that
space: the relative position bias (a table parameter in v1, the output of the
continuous position bias MLP `cpb_mlp` in v2) and v2's `logit_scale`. The head
count is passed as a constant, so the concatenated model's call gets k times
it (`Plan.widths`), and NT, which keeps the members' heads and width, returns
the original class. `_patch_merging_pad` concatenates four spatial shifts of
the tokens along the channels: four parts, each the input's layout.
"""

from ntdist.fusion.analysis.functional import record
from ntdist.fusion.analysis.plan import IN, Dim, Layer, Param, Val
from ntdist.fusion.analysis.shapes import arg, is_input, one, refuse

SWIN = "torchvision.models.swin_transformer."


def qualified(target) -> str:
    """`module.name` of a function, how the rules are keyed."""
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', '')}"


def constant_input(node, gm, env, fetch):
    """A module fed a buffer (v2's position MLP reads a fixed coordinate table): a constant, like the input.

    The buffer is the same in every member, so it counts as model input, its
    last dimension read as the channels by the module that consumes it.
    """
    consts = [env.get(a) for a in node.all_input_nodes]
    if len(consts) != 1 or not isinstance(consts[0], Param) or consts[0].name in dict(gm.named_parameters()):
        return []
    nd = fetch(consts[0].name).dim()
    return [Val(one(IN), nd, None, nd - 1)]


def relative_position_bias(node, env, fetch, sp, layers, nonlinear):
    """`_get_relative_position_bias(table, index, window)`: [1, heads, N, N] from a [positions, heads] table."""
    table = env.get(node.args[0])
    if isinstance(table, Param):          # v1: the table is a parameter; its columns open the head space
        t = fetch(table.name)
        if t.dim() != 2:
            refuse(node.name, f"reads a relative position table of shape {list(t.shape)}, not [positions, heads]")
        space = sp.new(t.shape[1], table.name)
        layers[table.name] = Layer("param", one(space), one(space), 1)
        return Val(one(space), 4, None, 1)
    if not isinstance(table, Val) or table.ndim != 2 or table.cdim != 1 or len(table.lay) != 1 \
            or table.lay[0].factor != 1 or is_input(sp, table.lay):
        refuse(node.name, "reads a relative position table that is not [positions, heads] of one layer's output")
    return Val(table.lay, 4, None, 1)


def shifted_window_attention(node, env, fetch, sp, layers, nonlinear):
    """`shifted_window_attention(x, qkv_weight, proj_weight, bias, window, num_heads, ...)` on channels-last x."""
    name = node.name
    x = env.get(node.args[0])
    if not isinstance(x, Val) or x.ndim is None or x.cdim != x.ndim - 1:
        refuse(name, "(shifted window attention) needs a feature tensor with channels in its last dimension")
    get = {key: env.get(arg(node, i, key, None)) for i, key in (
        (1, "qkv_weight"), (2, "proj_weight"), (3, "relative_position_bias"), (9, "qkv_bias"), (10, "proj_bias"),
        (11, "logit_scale"))}
    num_heads = arg(node, 5, "num_heads", None)
    if not isinstance(num_heads, int):
        refuse(name, "(shifted window attention) gets its head count as a tensor, which the fusion cannot read")
    owners = {}
    for role in ("qkv", "proj"):
        w, b = get[f"{role}_weight"], get[f"{role}_bias"]
        if not isinstance(w, Param) or (b is not None and not isinstance(b, Param)) or \
                (b is not None and b.name.rpartition(".")[0] != w.name.rpartition(".")[0]):
            refuse(name, f"(shifted window attention) gets a {role} weight and bias that are not one module's")
        owners[role] = w.name.rpartition(".")[0]
    bias = get["relative_position_bias"]
    if not isinstance(bias, Val) or len(bias.lay) != 1 or bias.lay[0].factor != 1 or bias.cdim != 1:
        refuse(name, "(shifted window attention) gets a position bias that is not one entry per head")
    space = bias.lay[0].space
    if sp.size[space] != num_heads:
        refuse(name, f"(shifted window attention) has {num_heads} heads but a position bias for {sp.size[space]}")
    width = sum(sp.size[d.space] * d.factor for d in x.lay)
    qkv, proj = fetch(owners["qkv"] + ".weight"), fetch(owners["proj"] + ".weight")
    if width % num_heads or tuple(qkv.shape) != (3 * width, width) or tuple(proj.shape) != (width, width):
        refuse(name, f"(shifted window attention) has {num_heads} heads, qkv {list(qkv.shape)} and proj "
                     f"{list(proj.shape)} for {width} channels")
    heads = (Dim(space, width // num_heads),)
    record(layers, sp, owners["qkv"], "linear", heads * 3, x.lay)
    out = record(layers, sp, owners["proj"], "linear",
                 None if owners["proj"] in layers else sp.open(owners["proj"], width), heads)
    scale = get["logit_scale"]
    if scale is not None:       # v2: one cosine-attention scale per head, [heads, 1, 1]
        if not isinstance(scale, Param) or fetch(scale.name).shape[0] != num_heads:
            refuse(name, "(shifted window attention) gets a logit scale that is not one parameter per head")
        layers[scale.name] = Layer("param", one(space), one(space), 0)
    nonlinear.append((name, heads))
    sp.widths.append((name, 5 if len(node.args) > 5 else "num_heads"))
    return Val(out, x.ndim, None, x.cdim)


def patch_merging_pad(node, env, fetch, sp, layers, nonlinear):
    """`_patch_merging_pad(x)`: four spatial shifts of channels-last x side by side along the channels."""
    x = env.get(node.args[0])
    if not isinstance(x, Val) or x.ndim is None or x.cdim != x.ndim - 1 or is_input(sp, x.lay):
        refuse(node.name, "(patch merging) needs hidden features with channels in their last dimension")
    return Val(x.lay * 4, x.ndim, None, x.cdim)


WRAPPED = {SWIN + "shifted_window_attention": shifted_window_attention,
           SWIN + "_get_relative_position_bias": relative_position_bias,
           SWIN + "_patch_merging_pad": patch_merging_pad}
