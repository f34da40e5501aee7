"""finetune.lr_scaling: the fine-tuning LR for a global batch of W ranks x data.batch_size.

Run: .venv/bin/python -m pytest tests/unit/test_lr_scaling.py
(tests/multiproc/test_engines.py checks the scaled LR of a real 2-rank run.)
"""

import pytest

from ntdist.config import load_config
from ntdist.errors import UserError
from ntdist.training.config import scaled_lr


def test_each_rule_scales_the_lr_for_the_world_size():
    lrs = {rule: scaled_lr(load_config(None, ["finetune.lr=0.01", f"finetune.lr_scaling={rule}"]).finetune, 4)
           for rule in ("none", "linear", "sqrt")}
    assert lrs == pytest.approx({"none": 0.01, "linear": 0.04, "sqrt": 0.02})
    assert scaled_lr(load_config(None, ["finetune.lr_scaling=linear"]).finetune, 1) == 0.01   # one rank: unchanged


def test_an_unknown_rule_is_one_line():
    with pytest.raises(UserError, match="finetune.lr_scaling") as err:
        load_config(None, ["finetune.lr_scaling=cubic"])
    assert "\n" not in str(err.value) and "linear" in str(err.value)
