"""`NTOptions`: NT's options defined and checked once, read by the Python API, `ntdist run` and `ntdist fuse` alike.

Run: .venv/bin/python -m pytest tests/unit/test_fusion_options.py
"""

import dataclasses

import pytest
import torch

from ntdist.cli import main
from ntdist.commands.fuse import KEYS as FUSE_KEYS
from ntdist.config import describe_keys
from ntdist.errors import UserError
from ntdist.fusion import FusionConfig, NTOptions, fuse, fuse_pair
from ntdist.models import ModelSpec
from ntdist.records.checkpoint import load_model, save_checkpoint

SPEC = ModelSpec("mlp", {"input_dim": 16, "width": 12, "depth": 2, "num_classes": 4})
RUN = ["run", "configs/quickstart.yaml", "distributed.threads_per_rank=1"]


def members(k=3):
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        out.append(SPEC.build().eval())
    return out


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa)


@pytest.fixture
def checkpoints(tmp_path):
    paths = []
    for i, model in enumerate(members()):
        paths.append(str(tmp_path / f"m{i}.safetensors"))
        save_checkpoint(paths[-1], model, SPEC)
    return paths


BAD = [     # each message with {p} where it names an option: '' from Python, 'fusion.' from a config
    (dict(order="merge_first"), "unknown {p}order 'merge_first'"),
    (dict(importance="l3"), "unknown {p}importance 'l3'"),
    (dict(width=0), "{p}width must be a positive number of units"),
    (dict(width=2.5), "{p}width must be a positive number of units"),
    (dict(keep_ratio=0), r"{p}keep_ratio must be in \(0, k\]"),
    (dict(keep_ratio=float("nan")), r"{p}keep_ratio must be in \(0, k\]"),
    (dict(width=8, keep_ratio=0.5), "either {p}width or {p}keep_ratio"),
    (dict(dedup="yes"), "{p}dedup must be true or false"),
    (dict(dedup=True, dedup_threshold=1.0), r"{p}dedup_threshold must be a cosine similarity in \(0, 1\)"),
    (dict(dedup=True, dedup_overflow="keep"), "unknown {p}dedup_overflow 'keep'"),
    (dict(dedup=True, dedup_criterion="outputs"), "unknown {p}dedup_criterion 'outputs'"),
    (dict(dedup_threshold=0.95), "{p}dedup_threshold only applies with {p}dedup on"),
    (dict(dedup_overflow="merge"), "{p}dedup_overflow only applies with {p}dedup on"),
    (dict(dedup=True, order="prune_merge"), "{p}dedup needs {p}order merge_prune"),
    (dict(pruner="torchpruning"), "unknown {p}pruner 'torchpruning' \\(did you mean 'torch_pruning'"),
    (dict(pruner="torch_pruning", importance="l1"), "{p}pruner 'torch_pruning' ranks units with Torch-Pruning"),
    (dict(pruner="torch_pruning", dedup=True), "{p}pruner 'torch_pruning' cannot merge duplicate units"),
]


@pytest.mark.parametrize("bad,words", BAD)
def test_every_check_is_a_one_line_user_error_naming_the_option(bad, words):
    for prefix, make in (("", lambda: NTOptions(**bad)), ("fusion.", lambda: FusionConfig(**bad))):
        with pytest.raises(UserError, match=words.format(p=prefix.replace(".", r"\."))) as err:
            make()
        assert "\n" not in str(err.value), str(err.value)


def test_config_fields_take_default_and_help_from_ntoptions():
    config = {f.name: f for f in dataclasses.fields(FusionConfig)}
    for f in dataclasses.fields(NTOptions):
        assert config[f.name].default == f.default == NTOptions.default(f.name), f.name
        assert config[f.name].metadata["help"].endswith(f.metadata["help"]), f.name
    cfg = FusionConfig(importance="l1", dedup=True, dedup_overflow="match")
    assert cfg.nt_options() == NTOptions(importance="l1", dedup=True, dedup_overflow="match")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.nt_options().dedup = False


def test_nt_options_need_method_nt():
    for bad in (dict(dedup=True), dict(width=8), dict(pruner="torch_pruning"), dict(importance="l1")):
        with pytest.raises(UserError, match="only applies to method nt, not to avg") as err:
            FusionConfig(methods=["avg"], **bad)
        assert "\n" not in str(err.value)
        FusionConfig(methods=["avg", "nt"], **bad)      # nt among the methods reads them
    with pytest.raises(UserError, match="pruner only applies to method nt"):
        fuse(members(2), method="avg", pruner="torch_pruning")
    fuse(members(2), method="avg", width=8)             # the API leaves the other options unread, as documented


@pytest.mark.parametrize("schedule", ["flat", "iterative", "recursive"])
def test_keyword_api_and_options_api_give_identical_weights(schedule):
    models, x = members(), torch.randn(64, 16)
    cases = [dict(), dict(importance="l1", keep_ratio=0.75), dict(order="prune_merge", width=8),
             dict(dedup=True, dedup_threshold=0.3, dedup_overflow="merge"),
             dict(dedup=True, dedup_threshold=0.3, dedup_criterion="activations")]
    for case in cases:
        by_keywords, by_options = {}, {}
        a = fuse(models, schedule=schedule, example_inputs=x, merged=by_keywords, **case)
        b = fuse(models, schedule=schedule, example_inputs=x, merged=by_options, options=NTOptions(**case))
        assert same_weights(a, b) and by_keywords == by_options, case
    replaced = fuse(models, schedule=schedule, options=NTOptions(importance="l1"), keep_ratio=0.5)
    assert same_weights(replaced, fuse(models, schedule=schedule, importance="l1", keep_ratio=0.5))
    a, b = models[:2]
    assert same_weights(fuse_pair(a, b, 2, 1, importance="l1", width=8),
                        fuse_pair(a, b, 2, 1, options=NTOptions(importance="l1", width=8)))


def test_an_unknown_keyword_is_a_type_error_with_a_suggestion():
    with pytest.raises(TypeError, match="fuse\\(\\) got an unexpected keyword argument 'importnce'.*importance"):
        fuse(members(2), importnce="l1")
    with pytest.raises(TypeError, match="fuse_pair\\(\\) got an unexpected keyword argument 'dedupe'"):
        fuse_pair(*members(2), dedupe=True)


def test_fuse_keys_give_the_weights_of_the_api(tmp_path, checkpoints):
    models = members()
    cases = [(["fusion.importance=l1"], dict(importance="l1")),
             (["--importance", "l1"], dict(importance="l1")),
             (["fusion.schedule=flat", "fusion.keep_ratio=0.5", "fusion.order=prune_merge"],
              dict(schedule="flat", keep_ratio=0.5, order="prune_merge")),
             (["fusion.dedup=on", "fusion.dedup_threshold=0.3", "--dedup-overflow", "match"],
              dict(dedup=True, dedup_threshold=0.3, dedup_overflow="match")),
             (["fusion.methods=[ot]"], dict(method="ot"))]
    for i, (keys, kwargs) in enumerate(cases):
        out = str(tmp_path / f"fused{i}.safetensors")
        assert main(["fuse", checkpoints[0], *keys, *checkpoints[1:], "-o", out]) == 0, keys
        expected = fuse(models, **{"schedule": "recursive", "example_inputs": torch.zeros(2, 16), **kwargs})
        assert same_weights(load_model(out)[0], expected), keys


def test_fuse_help_lists_the_fusion_keys_as_run_help_does(capsys):
    lines = {}
    for command in ("run", "fuse"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        lines[command] = capsys.readouterr().out.splitlines()
    wanted = list(describe_keys(only=[f"fusion.{key}" for key in FUSE_KEYS]))
    assert len(wanted) == len(FUSE_KEYS) == 6 + len(NTOptions.names())   # methods, schedule, calibration, BN, OT's two
    for line in wanted:
        assert line in lines["fuse"] and line in lines["run"], line
    assert not any(line.startswith(("  fusion.k ", "  fusion.bn_batches ")) for line in lines["fuse"])


def test_fuse_refuses_keys_it_has_no_use_for_in_one_line(tmp_path, checkpoints, capsys):
    out = str(tmp_path / "f.safetensors")
    for key, words in (("fusion.k=3", "ntdist fuse does not take fusion.k"),
                       ("fusion.bn_batches=3", "does not take fusion.bn_batches"),
                       ("train.epochs=2", "does not take train.epochs"),
                       ("fusion.importnce=l1", "did you mean 'fusion.importance'"),
                       ("fusion.methods=[nt,avg]", "one method"),
                       ("fusion.width=abc", "config key 'fusion.width' expects")):
        assert main(["fuse", *checkpoints, "-o", out, key]) == 2, key
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "f.safetensors").exists()


@pytest.mark.parametrize("keys,words", [
    (["fusion.dedup_threshold=0.5"], "fusion.dedup_threshold only applies with fusion.dedup on"),
    (["fusion.dedup=on", "fusion.methods=[avg]"], "fusion.dedup only applies to method nt, not to avg"),
])
def test_run_and_fuse_refuse_the_same_mistakes_with_the_same_line(tmp_path, checkpoints, capsys, keys, words):
    assert main([*RUN, f"output.dir={tmp_path / 'run'}", *keys]) == 2
    run_err = capsys.readouterr().err
    assert main(["fuse", *checkpoints, "-o", str(tmp_path / "f.safetensors"), *keys]) == 2
    fuse_err = capsys.readouterr().err
    assert run_err == fuse_err and run_err.count("\n") == 1 and words in run_err, (run_err, fuse_err)
    assert not (tmp_path / "run").exists()
