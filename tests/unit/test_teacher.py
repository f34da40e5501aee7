"""The distillation teacher runs the k members as they are: the concatenated model's outputs, k members' weights.

With `finetune.teacher_shard=on` on one rank the sharded teacher gives the same outputs.

Run: .venv/bin/python -m pytest tests/unit/test_teacher.py
"""

import pytest
import torch

from helpers import make_run, randomise_bn
from ntdist.fusion import Ensemble, concat
from ntdist.stages.finetune import distill_teacher
from ntdist.models.weights import build_member


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model", [["model.kwargs.width=32", "model.kwargs.depth=3"],
                                   ["model.name=vgg11", "model.kwargs.width=0.0625", "model.kwargs.batch_norm=true"]])
def test_teacher_equals_the_concatenated_model_with_k_members_weights(tmp_path, model):
    k = 3
    run = make_run(tmp_path, *model, f"fusion.k={k}", "finetune.distill=true")
    held = {i: randomise_bn(build_member(run.spec, i)).eval() for i in range(k)}
    teacher = distill_teacher(run, held)
    assert isinstance(teacher, Ensemble) and all(teacher.members[i] is held[i] for i in range(k))
    dense = concat([held[i] for i in range(k)], example_inputs=run.example_inputs()).eval()
    x = torch.stack([run.splits.test[i][0] for i in range(16)])
    with torch.no_grad():
        torch.testing.assert_close(teacher.eval()(x), dense(x), rtol=0, atol=1e-5)
    assert _params(teacher) == k * _params(held[0])
    assert _params(dense) > 1.5 * _params(teacher)   # the dense model holds k^2 blocks in its inner layers


def test_teacher_shard_setting(tmp_path):
    from ntdist.config import load_config
    from ntdist.errors import UserError
    from ntdist.training.teacher import ShardedTeacher
    with pytest.raises(UserError, match="finetune.teacher_shard 'sharded'.*'auto', 'on', 'off'"):
        load_config(None, ["finetune.teacher_shard=sharded"])
    assert load_config(None, ["finetune.teacher_shard=off"]).finetune.teacher_shard == "off"
    k = 3   # one rank, sharding forced on: the same collective-free output, all members on the rank
    run = make_run(tmp_path, "model.kwargs.width=32", f"fusion.k={k}", "finetune.teacher_shard=on",
                   "data.batch_size=8")
    held = {i: randomise_bn(build_member(run.spec, i)).eval() for i in range(k)}
    teacher = distill_teacher(run, held)
    assert isinstance(teacher, ShardedTeacher) and len(teacher.members) == k
    x = torch.stack([run.splits.test[i][0] for i in range(5)])
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), Ensemble([held[i] for i in range(k)])(x), rtol=0, atol=1e-6)
