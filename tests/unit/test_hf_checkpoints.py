"""Hugging Face folders (save_pretrained) in and out of `ntdist fuse` and `ntdist run`, offline, with tiny configs.

Run: .venv/bin/python -m pytest tests/unit/test_hf_checkpoints.py
"""

import json
import os
import pickle

import pytest
import torch

import transformers
from safetensors.torch import load_file

from ntdist.cli import main
from ntdist.fusion import fuse
from ntdist.models import ModelSpec
from ntdist.models.weights import build_member, initial_state
from ntdist.records.results import read_results

CONVNEXT = dict(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=2, image_size=16,
                num_labels=3)
BERT = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=16, num_labels=3)


def save_members(root, cls, config, **save):
    """Two members of `cls` (seeds 0 and 1) saved with save_pretrained; their folders."""
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        folders.append(str(root / f"{cls.__name__}{seed}"))
        cls(config).save_pretrained(folders[-1], **save)
    return folders


@pytest.fixture(scope="module")
def convnext(tmp_path_factory):
    return save_members(tmp_path_factory.mktemp("convnext"), transformers.ConvNextForImageClassification,
                        transformers.ConvNextConfig(**CONVNEXT))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ntdist: error:") and "Traceback" not in err, err
    return err


def test_fuse_writes_a_folder_that_from_pretrained_loads(tmp_path, convnext):
    out = str(tmp_path / "fused")
    assert main(["fuse", f"hf:{convnext[0]}", f"hf:{convnext[1]}", "-o", out, "--method", "nt"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    loaded = transformers.AutoModelForImageClassification.from_pretrained(out, local_files_only=True)
    assert type(loaded) is transformers.ConvNextForImageClassification
    from ntdist.models.hf import logits_class   # the class ntdist fuses: forward returns the logits
    cls = logits_class(transformers.ConvNextForImageClassification)
    members = [cls.from_pretrained(folder, local_files_only=True).eval() for folder in convnext]
    expected = fuse(members, "nt", example_inputs=torch.zeros(2, 3, 16, 16)).state_dict()
    state = loaded.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    logits = loaded.eval()(torch.randn(2, 3, 16, 16)).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    assert json.load(open(os.path.join(out, "config.json")))["hidden_sizes"] == CONVNEXT["hidden_sizes"]
    # -o FILE.safetensors still writes one ntdist checkpoint, with the Hugging Face keys
    single = str(tmp_path / "fused.safetensors")
    assert main(["fuse", convnext[0], convnext[1], "-o", single, "--method", "avg"]) == 0
    assert set(load_file(single)) == set(expected)


def test_lazy_fusion_of_folders_writes_the_normal_fuses_folder(tmp_path, convnext):
    outs = [str(tmp_path / name) for name in ("eager", "lazy")]
    assert main(["fuse", *convnext, "-o", outs[0]]) == 0
    assert main(["fuse", *convnext, "-o", outs[1], "--lazy"]) == 0
    eager, lazy = (load_file(os.path.join(out, "model.safetensors")) for out in outs)
    assert eager.keys() == lazy.keys() and all(torch.equal(eager[k], lazy[k]) for k in eager)
    loaded = transformers.AutoModelForImageClassification.from_pretrained(outs[1], local_files_only=True)
    assert torch.isfinite(loaded.eval()(torch.randn(1, 3, 16, 16)).logits).all()


def test_sharded_text_members_fuse_by_averaging(tmp_path):
    config = transformers.BertConfig(**BERT)
    folders = save_members(tmp_path, transformers.BertForSequenceClassification, config, max_shard_size="10KB")
    assert "model.safetensors.index.json" in os.listdir(folders[0])   # really sharded
    out = str(tmp_path / "fused")
    assert main(["fuse", "--model", f"hf:{folders[0]}", folders[0], folders[1], "-o", out, "--method", "avg"]) == 0
    loaded = transformers.BertForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
    members = [transformers.BertForSequenceClassification.from_pretrained(f, local_files_only=True).state_dict()
               for f in folders]
    for key, value in loaded.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(value, members[0][key] * 0.5 + members[1][key] * 0.5), key
    ids = torch.randint(0, BERT["vocab_size"], (1, 8))
    assert torch.isfinite(loaded(ids).logits).all()


def test_missing_folders_and_folders_without_config_are_one_line(tmp_path, convnext, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = str(tmp_path / "out")
    for args, expected in ((["hf:" + str(tmp_path / "nowhere"), convnext[1]], "is not a local folder"),
                           (["hf:bert-base-uncased", convnext[1]], "never downloads"),
                           ([str(empty), convnext[1]], "without config.json"),
                           (["--model", f"hf:{empty}", convnext[0], convnext[1]], "without config.json")):
        assert main(["fuse", *args, "-o", out]) == 2
        assert expected in one_line_error(capsys)
    assert not os.path.exists(out)
    assert main(["fuse", *convnext, "-o", str(tmp_path)]) == 2   # a folder that is not empty
    assert "not empty" in one_line_error(capsys)
    assert main(["fuse", *convnext, "-o", out, "--width", "4"]) == 2   # the config would no longer fit
    assert "fusion.width and fusion.keep_ratio change the architecture" in one_line_error(capsys)
    config = tmp_path / "run.yaml"
    config.write_text("data: {name: 'userpkg.hfdata:images'}\nmodel: {name: 'hf:nowhere/at/all'}\n")
    assert main(["run", str(config), f"output.dir={tmp_path / 'run'}"]) == 2
    assert "'nowhere/at/all' is not a local folder" in one_line_error(capsys)


def test_run_trains_and_fuses_hf_members(tmp_path, convnext):
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {{name: 'userpkg.hfdata:images', batch_size: 8}}\nmodel: {{name: 'hf:{convnext[0]}'}}\n"
                      "train: {epochs: 1}\nfinetune: {epochs: 1}\nfusion: {k: 2, methods: [nt]}\n")
    assert main(["run", str(config), f"output.dir={tmp_path / 'run'}"]) == 0
    results = read_results(str(tmp_path / "run"))
    assert len(results.members) == 2 and 0 <= results.fusion["nt"].finetune[-1] <= 1


def test_run_feeds_token_ids_to_a_text_model(tmp_path):
    folder = save_members(tmp_path, transformers.BertForSequenceClassification, transformers.BertConfig(**BERT))[0]
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {{name: 'userpkg.hfdata:tokens', batch_size: 8}}\nmodel: {{name: 'hf:{folder}'}}\n"
                      "train: {epochs: 1}\nfinetune: {epochs: 1}\nfusion: {k: 2, methods: [avg]}\n")
    assert main(["run", str(config), f"output.dir={tmp_path / 'run'}"]) == 0
    assert set(read_results(str(tmp_path / "run")).fusion) == {"avg"}


def test_model_weights_start_every_member_from_a_folder(convnext):
    spec = ModelSpec(f"hf:{convnext[0]}", {})
    member = build_member(spec, seed=3, initial=initial_state(spec.name, convnext[0]))
    saved = transformers.ConvNextForImageClassification.from_pretrained(convnext[0], local_files_only=True)
    own = member.state_dict()
    assert own.keys() == saved.state_dict().keys()
    assert all(torch.equal(own[k], v) for k, v in saved.state_dict().items())


def test_wrapped_models_pickle_and_come_back_computing_the_same_logits(tmp_path, convnext):
    from ntdist.models.hf import build, logits_class
    torch.manual_seed(0)
    text = logits_class(transformers.BertForSequenceClassification)(transformers.BertConfig(**BERT))
    for model, x in ((build(f"hf:{convnext[0]}"), torch.randn(2, 3, 16, 16)),
                     (text, torch.randint(0, BERT["vocab_size"], (2, 8)).float())):   # token ids as a dataset holds them
        model.eval()
        torch.save(model, tmp_path / "whole.pt")     # the whole module, as multiprocessing and torch.save pickle it
        for back in (pickle.loads(pickle.dumps(model)), torch.load(tmp_path / "whole.pt", weights_only=False)):
            assert type(back) is type(model) and back is not model
            assert torch.equal(back(x), model(x)) and back(x).shape == (2, 3)
