"""Single-process training on digits and checkpoint round trips. Run: .venv/bin/python -m pytest tests/unit/test_train.py"""

import pytest
import torch

from helpers import make_run
from ntdist.errors import UserError
from ntdist.models import ModelSpec, build_model
from ntdist.records.checkpoint import load_model, read_checkpoint, save_checkpoint
from ntdist.training.batches import eval_batches
from ntdist.training.loop import evaluate
from ntdist.stages.members import train_member

SPEC = ModelSpec("mlp", {"input_dim": 64, "num_classes": 10, "width": 32, "depth": 2})
MLP = ["model.kwargs.width=32", "model.kwargs.depth=2", "train.lr=0.05"]


def test_mlp_reaches_90_percent_on_digits_and_is_deterministic(tmp_path):
    run = make_run(tmp_path, *MLP, "train.epochs=8")
    model, history = train_member(run, 0)
    acc = evaluate(model, eval_batches(run.splits.test, 256), "cpu")["accuracy"]
    assert acc > 0.90
    assert [r["epoch"] for r in history] == list(range(1, 9))
    again = train_member(run, 0)[0]
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    other = train_member(run, 1)[0]
    assert not torch.equal(model.net[1].weight, other.net[1].weight)   # each member its own seed


def test_nan_loss_names_stage_and_epoch(tmp_path):
    with pytest.raises(UserError, match="member 0 at epoch 1"):
        train_member(make_run(tmp_path, *MLP, "train.epochs=2", "train.lr=1e6"), 0)


@pytest.mark.parametrize("name, kwargs, shape", [
    ("mlp", SPEC.kwargs, (3, 1, 8, 8)),
    ("vgg11", {"in_channels": 1, "image_size": 8, "width": 0.125}, (3, 1, 8, 8)),
    ("resnet18", {"in_channels": 1, "width": 4}, (3, 1, 8, 8)),
])
def test_checkpoint_round_trip_rebuilds_same_module(tmp_path, name, kwargs, shape):
    torch.manual_seed(0)
    model = build_model(name, kwargs)
    model.train()
    model(torch.randn(*shape))   # move BN running stats away from their initial values
    model.eval()
    path = str(tmp_path / "m.safetensors")
    save_checkpoint(path, model, ModelSpec(name, kwargs), info={"epoch": 3},
                    extra={"momentum": torch.ones(2)})
    loaded, meta = load_model(path)
    assert type(loaded) is type(model) and meta["info"] == {"epoch": 3}
    loaded.eval()
    x = torch.randn(*shape)
    assert torch.equal(model(x), loaded(x))
    assert torch.equal(read_checkpoint(path)[2]["momentum"], torch.ones(2))


def test_bad_checkpoints_are_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UserError, match="not a readable safetensors"):
        load_model(str(evil))
    assert not marker.exists()
    truncated = tmp_path / "t.safetensors"
    save_checkpoint(str(truncated), build_model("mlp"), ModelSpec("mlp", {}))
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(UserError):
        load_model(str(truncated))
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tmp_path / "missing.safetensors"))
    good = tmp_path / "g.safetensors"
    save_checkpoint(str(good), build_model("mlp"), ModelSpec("mlp", {}))
    with pytest.raises(UserError, match="config asks for"):
        load_model(str(good), expect_spec=ModelSpec("mlp", {"width": 8}))


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    import ntdist.records.checkpoint as ck
    path = str(tmp_path / "m.safetensors")
    model = build_model("mlp")
    save_checkpoint(path, model, ModelSpec("mlp", {}), info={"version": 1})

    def dies_halfway(tensors, tmp, metadata=None):
        with open(tmp, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt   # stands in for a kill during the write

    monkeypatch.setattr(ck, "save_file", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, build_model("mlp"), ModelSpec("mlp", {}), info={"version": 2})
    loaded, meta = load_model(path)
    assert meta["info"] == {"version": 1}
    assert torch.equal(loaded.net[1].weight, model.net[1].weight)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]   # no temporary file left behind
