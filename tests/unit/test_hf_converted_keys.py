"""Hugging Face folders whose stored tensor names differ from the class's modules (transformers 5 saves ViT as
`encoder.layer.0.attention.attention.query` and loads it as `layers.0.attention.q_proj`): `ntdist fuse` reads
them as from_pretrained does, repairs NT on the --calibration images, and writes a folder that loads back.

Run: .venv/bin/python -m pytest tests/unit/test_hf_converted_keys.py
"""

import torch
import transformers

from ntdist.cli import main

VIT = dict(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
           intermediate_size=32, num_labels=3)


def _logits(folder, x):
    model = transformers.ViTForImageClassification.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        return model(pixel_values=x).logits


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
