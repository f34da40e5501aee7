"""Member files that cannot be read (`fusion.members`, `ntdist fuse`, `ntdist eval`): one short line saying why.

Run: .venv/bin/python -m pytest tests/unit/test_member_files.py
"""

import pytest
import torch

from ntdist.errors import UserError
from ntdist.models.statedict import read_weights


def _message(path) -> str:
    with pytest.raises(UserError) as caught:
        read_weights(str(path))
    return str(caught.value)


def test_a_pickled_module_is_named_and_torch_page_long_text_is_left_out(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pt")
    message = _message(tmp_path / "model.pt")
    assert "holds a pickled torch.nn.modules.linear.Linear, not a state dict" in message
    assert "\x1b[" not in message and "\n" not in message and len(message) < 300


@pytest.mark.parametrize("content, reason", [(b"garbage" * 10, "(Unsupported operand 103)"), (b"", "(EOFError)")])
def test_bytes_that_are_no_torch_file_say_so(tmp_path, content, reason):
    (tmp_path / "bad.pt").write_bytes(content)
    message = _message(tmp_path / "bad.pt")
    assert message.startswith("'") and "is neither a safetensors file nor a torch state dict" in message
    assert reason in message and "weights_only" not in message
