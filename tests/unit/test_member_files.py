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


def test_a_pattern_in_fusion_members_lists_its_files_sorted_and_counts_them_as_k(tmp_path, monkeypatch):
    from ntdist.config import load_config
    monkeypatch.chdir(tmp_path)
    for name in ("b.pt", "a.pt", "c.safetensors"):
        (tmp_path / name).write_bytes(b"")
    cfg = load_config(None, ['fusion.members=["*.pt",c.safetensors]'])
    assert cfg.fusion.members == ["a.pt", "b.pt", "c.safetensors"] and cfg.fusion.k == 3
    with pytest.raises(UserError, match=r"fusion.members: 'x\*.pt' matches no file"):
        load_config(None, ['fusion.members=["x*.pt",a.pt]'])


@pytest.mark.parametrize("value, hint", [("a.pt,b.pt", "write a list in brackets: 'fusion.members=[a,b]'"),
                                         ("[a?.pt]", "that YAML cannot read as a list; quote its items")])
def test_a_list_key_given_a_string_says_how_to_write_a_list(value, hint):
    from ntdist.config import load_config
    with pytest.raises(UserError) as caught:
        load_config(None, [f"fusion.members={value}"])
    assert hint in str(caught.value) and "\n" not in str(caught.value)


def test_a_member_file_replaced_before_a_resume_makes_another_run(tmp_path, monkeypatch):
    """The states fine-tuned from the old files must not be continued from the new ones."""
    from ntdist.config import load_config
    from ntdist.distributed.world import World
    from ntdist.models import build_model
    from ntdist.stages.context import make_run
    from ntdist.training.state import StateOwner

    monkeypatch.chdir(tmp_path)
    for name, seed in (("a.pt", 0), ("b.pt", 1), ("c.pt", 2)):
        torch.manual_seed(seed)
        torch.save(build_model("mlp", {"input_dim": 64, "num_classes": 10, "width": 8}).state_dict(), name)

    def run_id() -> str:
        cfg = load_config(None, ["model.kwargs.width=8", "fusion.members=[a.pt,b.pt]", f"output.dir={tmp_path}/r"])
        return make_run(cfg, World()).run_id

    before = run_id()
    assert run_id() == before
    (tmp_path / "b.pt").write_bytes((tmp_path / "c.pt").read_bytes())
    after = run_id()
    assert after != before
    owner = StateOwner(after, "fine-tuning (nt)", 0, "torch.float32", 1)
    saved = {**owner.__dict__, "run": before}
    assert owner.differences(saved)[0].endswith("or the bytes of the fusion.members files, differ")


def test_the_same_member_file_twice_is_named_in_the_diversity_warning(tmp_path):
    from ntdist.stages.given import repeated_files
    torch.save({"w": torch.ones(2)}, tmp_path / "a.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "b.pt")
    (tmp_path / "copy.pt").write_bytes((tmp_path / "a.pt").read_bytes())
    a, b, copy = (str(tmp_path / n) for n in ("a.pt", "b.pt", "copy.pt"))
    assert repeated_files([a, b]) == ""
    assert f"gives the same weights twice ('{a}' and '{copy}')" in repeated_files([a, b, copy])
    assert f"('{a}' and '{tmp_path}/./a.pt')" in repeated_files([a, f"{tmp_path}/./a.pt"])


def test_a_sweep_over_member_patterns_passes_each_value_back_unchanged():
    from ntdist.config import parse_override
    from ntdist.sweep import expand
    values = [["m?.pt"], ["a.pt", "runs/*/m[01].pt"], ["1.0", "yes"]]
    points = expand({"sweep": {"fusion.members": values}})
    assert [parse_override(p.overrides[0])["fusion"]["members"] for p in points] == values


def test_overwrite_refuses_to_remove_members_that_an_earlier_run_wrote_in_its_directory(tmp_path):
    from ntdist.records.manifest import add_to_manifest
    from ntdist.stages.given import check_not_overwritten
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "member0.safetensors").write_bytes(b"")
    (run_dir / "mine.pt").write_bytes(b"")   # the user's own: --overwrite leaves it
    add_to_manifest(str(run_dir), ["checkpoints/member0.safetensors"])
    check_not_overwritten([str(run_dir / "mine.pt"), str(tmp_path / "elsewhere.pt")], str(run_dir))
    with pytest.raises(UserError, match=r"fusion.members file '.*member0.safetensors' is checkpoints/member0"
                                        r".safetensors of the run directory '.*run', which --overwrite removes"):
        check_not_overwritten([str(run_dir / "mine.pt"), str(run_dir / "checkpoints" / "member0.safetensors")],
                              str(run_dir))
