"""Config merging and its errors. Run: .venv/bin/python -m pytest tests/unit/test_config.py"""

import pytest

from ntdist.config import describe_keys, load_config, parse_override, to_yaml
from ntdist.errors import UserError


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = write(tmp_path, "train: {epochs: 7, lr: 0.1}\nmodel: {name: lenet, kwargs: {bias: false}}\n")
    cfg = load_config(path, ["train.epochs=3", "fusion.methods=[nt,avg]", "model.kwargs.width=5"])
    assert cfg.train.epochs == 3            # override beats YAML
    assert cfg.train.lr == 0.1              # YAML beats default
    assert cfg.train.momentum == 0.9        # default kept
    assert cfg.fusion.methods == ["nt", "avg"]
    assert cfg.model.name == "lenet" and cfg.model.kwargs == {"bias": False, "width": 5}


def test_int_accepted_for_float_and_resolved_yaml_roundtrip(tmp_path):
    cfg = load_config(None, ["train.lr=1"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    text = to_yaml(cfg)
    again = load_config(write(tmp_path, text))
    assert again == cfg


@pytest.mark.parametrize("override, words", [
    ("train.epochz=3", ["train.epochz", "train.epochs"]),
    ("trian.epochs=3", ["trian", "train"]),
    ("train.epochs=abc", ["train.epochs", "int", "abc"]),
    ("train.epochs=1.5", ["train.epochs", "int"]),
    ("fusion.methods=nt", ["fusion.methods", "List"]),
    ("data.download=maybe", ["data.download", "bool"]),
    ("train.epochs=-1", ["train.epochs", ">= 0"]),
    ("fusion.k=1", ["fusion.k", "at least 2"]),
    ("fusion.methods=[nt,avgg]", ["avgg", "avg"]),
    ("train.schedule=cosin", ["cosin", "cosine"]),
    ("noequals", ["key=value"]),
])
def test_bad_keys_and_values_are_one_clear_line(override, words):
    with pytest.raises(UserError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_bad_yaml_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(UserError, match="unknown config key 'train.bogus'"):
        load_config(write(tmp_path, "train:\n  bogus: 1\n"))


def test_override_parsing():
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}
    assert parse_override("x=null") == {"x": None}


def test_help_lists_every_section():
    text = "\n".join(describe_keys())
    for key in ("model.name", "data.name", "train.epochs", "fusion.k", "finetune.epochs",
                "distributed.timeout_s", "output.dir"):
        assert key in text
