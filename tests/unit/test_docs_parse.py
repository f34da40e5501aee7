"""The docs' commands that are not run are checked without running them.

Every command of tests/unit/test_docs_commands.py that is not mere text (class run or parse): the
program or script exists; an ntdist command's subcommand and options exist and, in a shell block or
when it names a YAML file, it parses as `ntdist` parses it and its config loads with its overrides
(`ntdist.config.load_config`, every point of a sweep; `ntdist fuse` its fusion keys, `ntdist eval` its
data); `make` targets are the Makefile's, `pip install` names extras of pyproject.toml, `torchrun` takes
its options, a script takes the `--flags` written after it, `python -c` code compiles.

Run: .venv/bin/python -m pytest tests/unit/test_docs_parse.py
"""

import argparse
import contextlib
import importlib.util
import io
import os
import re
import tomllib

import pytest
from torch.distributed.run import get_args_parser as torchrun_parser

from helpers import ROOT
from ntdist import cli
from ntdist.config import load_config, read_yaml
from ntdist.sweep import SWEEP_KEYS, load_sweep
from ntdist.training.engines import ENGINES
from test_docs_commands import COMMANDS, PLACEHOLDER, TEXT, Command, classify, defined_files, doc_commands

ENGINE_PACKAGES = tuple(name for name in ENGINES if name != "ddp")   # the engines that are packages to install


def _fail(command: Command, what: str):
    pytest.fail(f"{command}\n  {what}", pytrace=False)


def _parse(argv: list, command: Command) -> argparse.Namespace:
    """`argv` parsed as `ntdist` parses it (help texts swallowed); None after --help."""
    parser = cli._parser()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            args, extra = parser.parse_known_args(argv)
    except SystemExit as stop:
        if stop.code == 0:
            return None
        _fail(command, f"ntdist does not parse it: {err.getvalue().strip().splitlines()[-1]}")
    extra = cli._gather_overrides(args, extra)
    if extra:
        _fail(command, f"ntdist does not take {extra}")
    return args


def _config_path(name: str, command: Command, folder) -> str:
    if os.path.exists(os.path.join(ROOT, name)):
        return os.path.join(ROOT, name)
    files = defined_files(command.doc)
    if name not in files:
        _fail(command, f"config '{name}' is neither a repository file nor a '# {name}' block of the docs")
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(files[name])
    return path


def _load_run(path: str, overrides: list) -> None:
    """Load the config as `ntdist run` does: every point of a sweep, or the one run."""
    if any(key in read_yaml(path) for key in SWEEP_KEYS) or any(o.startswith("seeds=") for o in overrides):
        sweep = load_sweep(path, overrides)
        for point, folder in zip(sweep.points, sweep.dirs):
            load_config(path, sweep.overrides + point.overrides + [f"output.dir={folder}"], extra_keys=SWEEP_KEYS)
    else:
        load_config(path, overrides, extra_keys=SWEEP_KEYS)


def check_ntdist(argv: list, command: Command, folder) -> None:
    """The subcommand and its options exist; in full, the command parses and its config loads."""
    subcommands = cli._parser()._subparsers._group_actions[0].choices
    if not argv:
        return
    if argv[0] not in subcommands:
        _fail(command, f"ntdist has no subcommand '{argv[0]}' ({', '.join(subcommands)})")
    options = subcommands[argv[0]]._option_string_actions
    for word in argv[1:]:
        if word.startswith("-") and word != "-" and word.split("=")[0] not in options:
            _fail(command, f"ntdist {argv[0]} has no option {word.split('=')[0]}")
    full = (command.in_block or any(w.endswith((".yaml", ".yml")) for w in argv)) and len(argv) > 1
    if not full or any(PLACEHOLDER.search(w) for w in argv):
        return
    args = _parse(argv, command)
    if args is None:
        return
    try:
        if args.command == "run":
            _load_run(_config_path(args.config, command, folder), args.overrides)
        elif args.command == "fuse":
            flags = [f"fusion.{key}=[{value}]" if key == "methods" else f"fusion.{key}={value}"
                     for key in cli.FUSE_KEYS if (value := getattr(args, key)) is not None]
            cli.fusion_config(args.checkpoints, flags + args.overrides)
        elif args.command == "eval":
            configs = [_config_path(c, command, folder) for c in args.data if c.endswith((".yaml", ".yml"))]
            load_config(configs[0] if configs else None, [d for d in args.data if "=" in d])
    except Exception as err:  # noqa: BLE001 - any failure is the docs' mistake, shown with its line
        _fail(command, f"{type(err).__name__}: {err}")


def check_command(command: Command, folder) -> None:
    """The check of a parse-only command (a run command gets it too, before it runs)."""
    argv = command.argv
    program, rest = argv[0], argv[1:]
    if program in ("python", "python3") and rest[:2] == ["-m", "ntdist"]:
        program, rest = "ntdist", rest[2:]
    if program == "ntdist":
        check_ntdist(rest, command, folder)
    elif program == "torchrun":
        split = rest.index("-m") if "-m" in rest else len(rest)
        parser = torchrun_parser()
        unknown = [w.split("=")[0] for w in rest[:split] if w.split("=")[0] not in parser._option_string_actions]
        if unknown:
            _fail(command, f"torchrun has no option {unknown}")
        if not any(PLACEHOLDER.search(w.split("=")[-1]) for w in rest):
            parser.parse_args(rest[:split] + ["script"])   # the values parse
        if rest[split + 1:split + 2] == ["ntdist"]:
            check_ntdist(rest[split + 2:], command, folder)
    elif program == "make":
        with open(os.path.join(ROOT, "Makefile")) as f:
            targets = re.search(r"^\.PHONY:(.*)$", f.read(), re.M).group(1).split()
        for target in rest:
            assert target in targets, f"{command}\n  the Makefile has no target '{target}' ({targets})"
    elif program in ("python", "python3"):
        _check_python(rest, command)
    elif program == "pip":
        _check_pip(rest, command)
    elif program == "tensorboard":
        assert "tensorboard" in _extras(), f"{command}\n  pyproject.toml has no extra that installs tensorboard"
    elif program == "sbatch" or program.startswith("launch/"):
        script = rest[0] if program == "sbatch" else program
        assert os.access(os.path.join(ROOT, script), os.X_OK) or program == "sbatch", f"{command}\n  {script}"
        check_ntdist(["run", *(rest[1:] if program == "sbatch" else rest)], command, folder)
    elif program == "cat":
        if command.body and command.text.split(">")[1].split()[0].endswith(".py"):
            compile(command.body, "heredoc", "exec")
    else:
        _fail(command, f"no check for the program '{program}': add one to check_command")


def _extras() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"]


def _check_pip(rest: list, command: Command) -> None:
    """`pip install -e '.[extra,...]'` names extras of pyproject.toml; a bare name is a dependency of one."""
    assert rest[0] == "install", command
    for word in rest[1:]:
        if word.startswith("-"):
            continue
        if word.startswith("ntdist"):
            _fail(command, "ntdist is not on a package index: install from the checkout, "
                           "pip install -e '.[EXTRA]' in the repository root")
        extras = re.match(r"^\.(?:\[(.*)\])?$", word)
        if extras:
            missing = set(filter(None, (extras.group(1) or "").split(","))) - set(_extras())
            assert not missing, f"{command}\n  pyproject.toml has no extra {sorted(missing)}"
        else:
            wanted = {re.split(r"[<>=\[]", d)[0] for deps in _extras().values() for d in deps}
            assert re.split(r"[<>=]", word)[0] in wanted, f"{command}\n  '{word}' is in no extra of pyproject.toml"


def _check_python(rest: list, command: Command) -> None:
    """`python -m pytest ...`, `python -c CODE` (compiles), `python SCRIPT --flag` (the script takes the flag)."""
    if rest[:2] == ["-m", "pytest"] or rest[:1] == ["-m"]:
        return
    if rest[:1] == ["-c"]:
        compile(rest[1], "-c", "exec")
        return
    script = os.path.join(ROOT, rest[0])
    if not os.path.exists(script):
        assert rest[0] in defined_files(command.doc) or any(
            c.body and rest[0] in c.text for c in doc_commands(command.doc)), f"{command}\n  no file {rest[0]}"
        return
    with open(script) as f:
        source = f.read()
    for flag in (w for w in rest[1:] if w.startswith("--")):
        assert f'"{flag}"' in source or f"'{flag}'" in source, f"{command}\n  {rest[0]} takes no {flag}"



@pytest.mark.parametrize("command", [c for c in COMMANDS if classify(c)[0] not in (TEXT, None)], ids=str)
def test_every_command_passes_its_check(command, tmp_path, monkeypatch):
    # `make test-unit` installs no engine package: a config naming one is checked as if it were installed
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: object() if name in ENGINE_PACKAGES
                        else find_spec(name, *args))
    check_command(command, tmp_path)


def test_a_wrong_command_fails_with_its_file_and_line(tmp_path):
    for text, why in [("ntdist run configs/quickstart.yaml train.epoch=3", "train.epoch"),
                      ("ntdist fuse --metod nt -o x a b", "no option --metod"),
                      ("pip install 'ntdist[tensorboard]'", "not on a package index"),
                      ("make deploy", "no target 'deploy'")]:
        with pytest.raises(BaseException) as failed:
            check_command(Command("README.md", 7, text, True), tmp_path)
        assert "README.md:7: " + text in str(failed.value) and why in str(failed.value), str(failed.value)


def test_run_help_names_the_top_level_keys_of_sweeps():
    """`ntdist run --help` ("every config key", README) lists sweep.SWEEP_KEYS beside the sections' keys."""
    text = cli._parser()._subparsers._group_actions[0].choices["run"].format_help()
    for key in SWEEP_KEYS:
        assert f"\n  {key} (" in text, key
