"""A small transformer block with `nn.MultiheadAttention`, called as self-attention, with a causal mask or as
cross-attention: `model.name: userpkg.attention:masked_block`.

Not a test file: tests/unit/test_repair_attention.py and tests/unit/test_repair_notes.py use it.
"""

import torch
import torch.nn as nn


class Block(nn.Module):
    """Tokens embedded by a Linear layer, then LayerNorm + attention and LayerNorm + MLP, each added to the stream;
    the mean token is classified. `mode`: self-attention, with a causal mask, or with keys and values taken from the
    stream before its LayerNorm; `batch_first=False` feeds the attention [tokens, batch, features]."""

    def __init__(self, mode="self", batch_first=True, width=8, heads=2, tokens=5, features=6):
        super().__init__()
        self.mode, self.batch_first = mode, batch_first
        self.embed = nn.Linear(features, width)
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=batch_first)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, 3)
        self.register_buffer("causal", torch.triu(torch.ones(tokens, tokens, dtype=torch.bool), 1))

    def attend(self, h):
        a = self.ln1(h)
        if self.mode == "masked":
            return self.attn(a, a, a, attn_mask=self.causal, need_weights=False)[0]
        if self.mode == "cross":
            return self.attn(a, h, h, need_weights=False)[0]
        return self.attn(query=a, key=a, value=a, need_weights=False)[0]

    def forward(self, x):
        h = self.embed(x)
        h = h + (self.attend(h) if self.batch_first else self.attend(h.transpose(0, 1)).transpose(0, 1))
        h = h + self.mlp(self.ln2(h))
        return self.head(h.mean(1))


def masked_block() -> nn.Module:
    """The block with a causally masked attention: what the repair leaves as NT pruned it."""
    return Block("masked")
