"""Hugging Face folders through `ntdist fuse --calibration`: folders whose stored tensor names differ from the
class's modules (transformers 5 saves ViT as `encoder.layer.0.attention.attention.query` and loads it as
`layers.0.attention.q_proj`) are read as from_pretrained does; a text model's calibration may be its integer token
ids as the tokenizer gives them. NT is repaired closer to the ensemble, and the folder written loads back.

Run: .venv/bin/python -m pytest tests/unit/test_hf_converted_keys.py
"""

import torch
import transformers

from ntdist.cli import main

VIT = dict(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
           intermediate_size=32, num_labels=3)


BERT = dict(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=16, num_labels=3)


def _logits(folder, x, cls=transformers.ViTForImageClassification):
    model = cls.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        return model(pixel_values=x).logits if x.is_floating_point() else model(input_ids=x).logits


def test_vit_folders_fuse_with_repair_and_load_back(tmp_path):
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        members.append(str(tmp_path / f"vit{seed}"))
        transformers.ViTForImageClassification(transformers.ViTConfig(**VIT)).save_pretrained(members[-1])
    cal = tmp_path / "cal.pt"
    torch.save(torch.randn(128, 3, 8, 8, generator=torch.Generator().manual_seed(2)), cal)
    plain, repaired = str(tmp_path / "plain"), str(tmp_path / "repaired")
    assert main(["fuse", *members, "-o", plain]) == 0
    assert main(["fuse", *members, "-o", repaired, "--calibration", str(cal)]) == 0
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    ensemble = (_logits(members[0], x) + _logits(members[1], x)) / 2

    def gap(folder):
        return ((_logits(folder, x) - ensemble).norm() / ensemble.norm()).item()

    assert gap(repaired) < 0.5 * gap(plain)


def test_text_folders_repair_on_integer_token_ids(tmp_path):
    cls = transformers.BertForSequenceClassification
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        members.append(str(tmp_path / f"bert{seed}"))
        cls(transformers.BertConfig(**BERT)).save_pretrained(members[-1])
    ids = torch.randint(0, 40, (192, 12), generator=torch.Generator().manual_seed(2))
    torch.save(ids[:128], tmp_path / "ids.pt")
    plain, repaired = str(tmp_path / "plain"), str(tmp_path / "repaired")
    assert main(["fuse", *members, "-o", plain]) == 0
    assert main(["fuse", *members, "-o", repaired, "--calibration", str(tmp_path / "ids.pt")]) == 0
    held_out = ids[128:]
    ensemble = (_logits(members[0], held_out, cls) + _logits(members[1], held_out, cls)) / 2

    def gap(folder):
        return ((_logits(folder, held_out, cls) - ensemble).norm() / ensemble.norm()).item()

    assert gap(repaired) < 0.5 * gap(plain)
