"""The control (the best member fine-tuned for the same epochs) gets the fused models' recipe: with
`finetune.distill` it is distilled from the same members, so "fused − control" compares like with like.

Run: .venv/bin/python -m pytest tests/unit/test_control_recipe.py
"""

import torch
from safetensors.torch import load_file

from ntdist.cli import main
from ntdist.records.results import read_results

RUN = ["run", "configs/quickstart.yaml", "distributed.threads_per_rank=1", "train.epochs=1", "finetune.epochs=2",
       "fusion.methods=[avg]", "output.diversity=false"]


def _run(tmp_path, distill: bool):
    out = tmp_path / f"distill_{distill}"
    assert main([*RUN, f"finetune.distill={str(distill).lower()}", f"output.dir={out}"]) == 0
    return read_results(str(out)), load_file(str(out / "checkpoints" / "finetuned_best-member.safetensors"))


def test_a_distilled_run_distils_its_control_from_the_same_members(tmp_path):
    plain, plain_weights = _run(tmp_path, False)
    distilled, distilled_weights = _run(tmp_path, True)
    assert plain.members == distilled.members and plain.control.member == distilled.control.member
    assert not plain.control.distilled and distilled.control.distilled
    # the same member, seed and epochs: only the loss differs, so the weights do
    assert plain_weights.keys() == distilled_weights.keys()
    assert any(not torch.equal(plain_weights[k], distilled_weights[k]) for k in plain_weights)
