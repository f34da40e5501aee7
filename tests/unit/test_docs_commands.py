"""Every command written in README.md and docs/*.md is checked: run, or parsed without running.

A command is a line of a ```bash, ```sh or ```console block (continuation lines joined, `# comments`
dropped, a `<<'END'` here-document kept as the file it writes; in a console block only the lines
after `$ `) or an inline code span that starts with a program of PROGRAM (after `VAR=value`
assignments and `.venv/bin/`). Each gets one class, the first rule of RULES that matches it:

  run    quick: tests/unit/test_docs_runs.py (QUICK_RUNS) or tests/multiproc/test_docs_long_runs.py runs
         it as written, in a temporary directory, and compares the figures the docs give beside it;
  parse  long, or it needs files, GPUs, packages or launchers the tests do not have: checked without
         running it by tests/unit/test_docs_parse.py (which checks the run ones too);
  text   a phrase in code font that is no command (listed one by one).

A command that no rule matches fails `test_every_command_has_a_class`, naming its file, line and
text and how to classify it. Files the docs define (a ```yaml or ```python block whose first line
is `# NAME.ext`) are what commands such as `ntdist run own_model.yaml` read.

Run: .venv/bin/python -m pytest tests/unit/test_docs_commands.py
"""

import os
import re
import shlex
from dataclasses import dataclass

import pytest

from helpers import ROOT
from test_docs import DOCS

SHELLS = ("bash", "sh", "console")
BLOCK = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")
ENV = r"(?:[A-Z_]+=\S*\s+)*(?:\.venv/bin/)?"
PROGRAM = re.compile(ENV + r"(ntdist|python3?|make|torchrun|sbatch|pip|tensorboard|launch/\S+\.sh(?=\s))(?:\s|$)")
DEFINED = re.compile(r"^# ([\w.-]+\.\w+)\n")            # a block that defines a file: its first line names it
HEREDOC = re.compile(r"<<'?(\w+)'?")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*(\.\.\.)?$|<\w+>|\.\.\.")   # CONFIG, FILES, <name>, ...

RUN, PARSE, TEXT = "run", "parse", "text"
QUICK_RUNS = {   # doc: the commands tests/unit/test_docs_runs.py runs, in this order, in one temporary folder
    "README.md": [
        "ntdist run configs/quickstart.yaml",
        "ntdist run configs/quickstart.yaml train.epochs=5 fusion.methods=[nt,avg,ot] output.dir=runs/three",
        "ntdist run --help",
        "ntdist fuse runs/quickstart/checkpoints/member0.safetensors runs/quickstart/checkpoints/member1.safetensors"
        " -o fused.safetensors fusion.importance=l1 fusion.dedup=on",
        "python -c import torch; from ntdist.data import DataConfig, load_splits; "
        "torch.save(torch.stack([x for x, _ in load_splits(DataConfig()).train]), 'x_train.pt')",
        "ntdist fuse --method nt --schedule flat --calibration x_train.pt -o fused_flat.safetensors "
        "runs/quickstart/checkpoints/member0.safetensors runs/quickstart/checkpoints/member1.safetensors",
        "ntdist report runs/quickstart",
        "ntdist run configs/quickstart.yaml --resume",
        "ntdist run configs/quickstart.yaml --overwrite",
        "ntdist eval runs/quickstart/checkpoints/*.safetensors",
        "ntdist run configs/quickstart.yaml --dry-run --world-size 64 --gpus-per-node 8",
        "ntdist run configs/quickstart.yaml data.name=mydata:noisy_sines data.kwargs.samples=2000 "
        "output.dir=runs/own_data",
    ],
    "docs/USAGE.md": [
        "cat > make_pngs.py <<PY",
        "python make_pngs.py",
        "ntdist run configs/quickstart.yaml data.name=imagefolder data.root=data/digits_png data.image_size=8 "
        "data.augment=false train.epochs=3 output.dir=runs/imagefolder",
    ],
}
RULES = [   # (pattern searched in the command, class, why); the first that matches decides
    (r"^ntdist / one by one$", TEXT, "a column header of docs/PERFORMANCE.md"),
    (r"^make demo$|^ntdist run own_model\.yaml$", RUN, "tests/multiproc/test_docs_long_runs.py runs it (a minute)"),
    (r"^make |-m pytest", PARSE, "installs packages or runs the test suite"),
    (r"configs/paper/|seeds=\[", PARSE, "the paper's experiments and seed lists: minutes to hours"),
    (r"\bbench\b|benchmarks/", PARSE, "benchmarks: minutes, figures depend on the machine"),
    (r"^(torchrun|sbatch)\b|launch/|engine=deepspeed", PARSE, "launchers and engines: tests/launchers"),
    (r"torchvision:|cifar10|--device cuda", PARSE, "a GPU, torchvision weights or data not on this machine"),
    (r"\b(a|b|m\d+)\.(safetensors|pt)\b|fused\.safetensors --data|runs/(paper|a|b)\b", PARSE, "the reader's own files"),
    (r"^(pip|tensorboard)\b|tensorboard\]", PARSE, "installs a package or starts a viewer"),
    (r"runs/quickstart/|noisy_sines", PARSE, "like a README command that runs, on the quickstart's run directory"),
    (r"^(ntdist|python3? -m ntdist)( \S+)?( --?[\w-]+)*$|--max-restarts", PARSE, "a mention: subcommand, options"),
    (r"[A-Z]{2,}|<\w+>|\.\.\.|RUN_DIR", PARSE, "a synopsis with placeholders"),
]


@dataclass(frozen=True)
class Command:
    doc: str
    line: int
    text: str           # as written, continuations joined, comment dropped
    in_block: bool
    body: str = ""      # what a here-document writes

    @property
    def argv(self) -> list:
        """The words after `VAR=value` assignments and `.venv/bin/`, synopsis brackets removed."""
        words = shlex.split(self.text)
        while words and re.match(r"^[A-Z_]+=", words[0]):
            words.pop(0)
        words = [w.removeprefix(".venv/bin/") for w in words for w in _braces(w)]
        return [_unbracket(w) for w in words]

    @property
    def name(self) -> str:
        return " ".join(self.argv)

    def __str__(self):
        return f"{self.doc}:{self.line}: {self.text}"


def _unbracket(word: str) -> str:
    """A synopsis's `[--flag` and `VALUE]` without their brackets (`key=[a,b]` and `.[extra]` keep theirs)."""
    word = word[1:] if word.startswith("[") and word.count("[") > word.count("]") else word
    return word[:-1] if word.endswith("]") and word.count("]") > word.count("[") else word


def _braces(word: str) -> list:
    """`member{0,1}.pt` as bash expands it: `member0.pt member1.pt`."""
    found = re.match(r"^(.*)\{([^{}]*,[^{}]*)\}(.*)$", word)
    return [found[1] + part + found[3] for part in found[2].split(",")] if found else [word]


def _block_commands(doc: str, first: int, kind: str, body: str) -> list:
    lines, out, i = body.splitlines(), [], 0
    while i < len(lines):
        line, start = lines[i], first + i
        i += 1
        if kind == "console":
            if not line.startswith("$ "):
                continue
            line = line[2:]
        while line.endswith("\\") and i < len(lines):
            line, i = line[:-1] + " " + lines[i].strip(), i + 1
        text = _strip_comment(line)
        here = HEREDOC.search(text)
        heredoc = ""
        if here:
            end = lines.index(here.group(1), i)
            heredoc, i = "\n".join(lines[i:end]) + "\n", end + 1
        if text:
            out.append(Command(doc, start, text, True, heredoc))
    return out


def _strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a # outside quotes, after whitespace)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip()
    return line.strip()


def doc_commands(doc: str) -> list:
    with open(os.path.join(ROOT, doc)) as f:
        text = f.read()
    out = []
    for m in BLOCK.finditer(text):
        if m.group(1) in SHELLS:
            out += _block_commands(doc, text.count("\n", 0, m.start(2)) + 1, m.group(1), m.group(2))
    prose = BLOCK.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for number, line in enumerate(prose.splitlines(), 1):
        out += [Command(doc, number, span, False) for span in SPAN.findall(line) if PROGRAM.match(span)]
    return out


def all_commands() -> list:
    return [c for doc in DOCS for c in doc_commands(doc)]


def defined_files(doc: str = None) -> dict:
    """{file name: text} of the blocks that define a file, `doc`'s own overriding the other docs'."""
    files = {}
    for name in sorted(DOCS, key=lambda d: d == doc):
        with open(os.path.join(ROOT, name)) as f:
            for m in BLOCK.finditer(f.read()):
                if m.group(1) in ("yaml", "python") and (named := DEFINED.match(m.group(2))):
                    files[named.group(1)] = m.group(2)
    return files


def classify(command: Command) -> tuple:
    """(class, why) of the first rule of RULES whose pattern is found in the command, or (None, None)."""
    if any(command.name in names for names in QUICK_RUNS.values()):
        return RUN, "tests/unit/test_docs_runs.py runs it"
    for pattern, kind, why in RULES:
        if re.search(pattern, command.name):
            return kind, why
    return None, None


COMMANDS = all_commands()


def test_commands_are_found_in_blocks_and_spans():
    names = [c.name for c in COMMANDS if c.doc == "README.md"]
    assert "ntdist run configs/quickstart.yaml" in names and "make demo" in names
    assert "ntdist run --help" in names and not any("#" in n for n in names)
    assert any(c.body and "make_pngs.py" in c.text for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_every_command_has_a_class(command):
    kind, why = classify(command)
    assert kind is not None, (
        f"{command}\n  no rule of RULES in tests/unit/test_docs_commands.py matches it: add it to QUICK_RUNS if "
        "it takes seconds (tests/unit/test_docs_runs.py runs it and compares its figures), or a PARSE rule saying "
        "why it is too long to run (tests/unit/test_docs_parse.py then checks it without running it)")
