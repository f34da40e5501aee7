"""The layers NT's repair leaves as pruned (here a masked attention) reach the user once per fusion: a warning from
the Python API, a list when one is passed, a line each on stderr from `ntdist fuse`.

Run: .venv/bin/python -m pytest tests/unit/test_repair_notes.py
"""

import warnings

import torch
from userpkg.attention import masked_block

from ntdist.cli import main
from ntdist.fusion import fuse

X = torch.randn(40, 5, 6, generator=torch.Generator().manual_seed(3))
ATTENTION = ("'attn' left as pruned: mha layer (MultiheadAttention) is not refitted: called with attn_mask "
             "(only attention without masks is)")


def _members(k):
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        out.append(masked_block().eval())
    return out


def test_the_python_api_warns_once_per_note_or_fills_the_list_it_is_given():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fuse(_members(3), schedule="recursive", calibration=X, example_inputs=X[:2])   # two pairwise repairs
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert sum(ATTENTION in m for m in messages) == 1, messages
    assert len(messages) == len(set(messages))
    notes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fuse(_members(3), schedule="recursive", calibration=X, example_inputs=X[:2], notes=notes)
    assert not [w for w in caught if "left as pruned" in str(w.message)]
    assert sorted(notes) == sorted(messages) and any(ATTENTION in n for n in notes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fuse(_members(2), example_inputs=X[:2])                   # not repaired: nothing to say
    assert not [w for w in caught if "left as pruned" in str(w.message)]


def test_ntdist_fuse_prints_each_note_once_on_stderr(tmp_path, capsys):
    paths = []
    for i, model in enumerate(_members(2)):
        paths.append(str(tmp_path / f"m{i}.pt"))
        torch.save(model.state_dict(), paths[-1])
    torch.save(X, tmp_path / "cal.pt")
    code = main(["fuse", "--model", "userpkg.attention:masked_block", "--input-shape", "5,6", "--calibration",
                 str(tmp_path / "cal.pt"), "-o", str(tmp_path / "fused.safetensors"), *paths])
    err = capsys.readouterr().err
    assert code == 0, err
    lines = [line for line in err.splitlines() if "left as pruned" in line]
    assert sum(ATTENTION in line for line in lines) == 1 and len(lines) == len(set(lines)), err
    assert all(line.startswith("ntdist fuse: note: repair: ") for line in lines)
