"""Hugging Face `transformers` classifiers, tiny and randomly initialised: analysed through torch.export.

For every family (BERT, RoBERTa, DistilBERT, GPT-2, Llama, Mistral, Qwen2, ViT,
DeiT, Swin, ConvNeXt) and k = 2, 3: `concat` computes the members' average
logits (relative error < 1e-4), and NT returns the original class, which loads
strictly into a fresh instance of the same config. Text models read token ids
and an attention mask with padding at the end of one row (GPT-2, Llama,
Mistral and Qwen2 classify their last non-padding token).

Run: .venv/bin/python -m pytest tests/unit/test_fusion_hf.py
"""

import pytest
import torch
import torch.nn as nn
import transformers

from ntdist.fusion import analyze, concat, fuse

TEXT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, num_labels=3, pad_token_id=0)
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
              patch_size=4, num_labels=3)
FAMILIES = {
    "bert": lambda t: t.BertForSequenceClassification(t.BertConfig(**TEXT)),
    "roberta": lambda t: t.RobertaForSequenceClassification(t.RobertaConfig(**{**TEXT, "pad_token_id": 1})),
    "distilbert": lambda t: t.DistilBertForSequenceClassification(t.DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64, num_labels=3)),
    "gpt2": lambda t: t.GPT2ForSequenceClassification(t.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=3, pad_token_id=0,
        bos_token_id=1, eos_token_id=1)),
    "llama": lambda t: t.LlamaForSequenceClassification(t.LlamaConfig(**TEXT, num_key_value_heads=2)),
    "mistral": lambda t: t.MistralForSequenceClassification(t.MistralConfig(**TEXT, num_key_value_heads=2)),
    "qwen2": lambda t: t.Qwen2ForSequenceClassification(t.Qwen2Config(**TEXT, num_key_value_heads=2)),
    "vit": lambda t: t.ViTForImageClassification(t.ViTConfig(**VISION)),
    "deit": lambda t: t.DeiTForImageClassification(t.DeiTConfig(**VISION)),
    "swin": lambda t: t.SwinForImageClassification(t.SwinConfig(
        image_size=16, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4, num_labels=3)),
    "convnext": lambda t: t.ConvNextForImageClassification(t.ConvNextConfig(
        num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=16, num_labels=3)),
}
VISION_FAMILIES = ("vit", "deit", "swin", "convnext")


class Logits(nn.Module):
    """A `transformers` model returning its logits as one tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, mask=None):
        return (self.model(x) if mask is None else self.model(x, attention_mask=mask)).logits


def member(family, seed):
    torch.manual_seed(seed)
    return Logits(FAMILIES[family](transformers)).eval()


def example(family):
    torch.manual_seed(100)
    if family in VISION_FAMILIES:
        return (torch.randn(2, 3, 16, 16),)
    ids, mask = torch.randint(2, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    if family != "roberta":        # RoBERTa's position ids follow padding: its mask stays full
        ids[1, 5:], mask[1, 5:] = 0, 0
    return ids, mask


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_concat_is_the_average_and_nt_returns_the_class(family):
    """k = 2 and 3 in one case: member 0 is exported once and its graph serves every call."""
    members, x = [member(family, seed) for seed in range(3)], example(family)
    for k in (2, 3):
        with torch.no_grad():
            average = sum(m(*x) for m in members[:k]) / k
            wide = concat(members[:k], example_inputs=x)
            assert ((wide(*x) - average).abs().max() / average.abs().max()).item() < 1e-4, k
            fused = fuse(members[:k], method="nt", example_inputs=x)
            assert type(fused) is Logits and type(fused.model) is type(members[0].model)
            member(family, 99).load_state_dict(fused.state_dict(), strict=True)
            assert fused(*x).shape == average.shape


def test_grouped_query_heads_move_with_their_key_value_head():
    """Llama with 4 query and 2 key/value heads: a unit is one key/value head and its 2 query heads."""
    model, x = member("llama", 0), example("llama")
    plan = analyze(model, x)
    assert plan.graph is not None
    spec = plan.tensors
    attn = "model.model.layers.0.self_attn"
    q, k = spec[f"{attn}.q_proj.weight"].dims[0], spec[f"{attn}.k_proj.weight"].dims[0]
    assert q[0].space == k[0].space and (q[0].factor, k[0].factor) == (16, 8)
    assert plan.sizes[q[0].space] == 2
    # the residual width is one space across the layers: embedding, norms and every output projection
    embed = spec["model.model.embed_tokens.weight"].dims[1][0].space
    assert spec[f"{attn}.o_proj.weight"].dims[0][0].space == embed
    assert spec["model.model.layers.1.mlp.down_proj.weight"].dims[0][0].space == embed


def test_tied_input_and_output_embeddings_stay_tied():
    """GPT-2 with its language-model head: the output layer is the token embedding table itself."""
    def lm(seed):
        torch.manual_seed(seed)
        return Logits(transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=1))).eval()

    members, x = [lm(0), lm(1)], example("gpt2")
    with torch.no_grad():
        average = sum(m(*x) for m in members) / 2
        wide = concat(members, example_inputs=x)
        assert ((wide(*x) - average).abs().max() / average.abs().max()).item() < 1e-4
        fused = fuse(members, example_inputs=x)
    assert fused.model.lm_head.weight is fused.model.transformer.wte.weight
    lm(99).load_state_dict(fused.state_dict(), strict=True)
