"""The documentation points at files that exist, the README stays short, and docs/FUSION.md's API is the code's.

Every repository path written in backticks in README.md and docs/*.md (inline spans and fenced
blocks, also inside commands and after `key=`) must exist; `path:line` and `path::name` suffixes
are dropped, `<placeholders>` skipped, globs must match a file. The Python block under "Public
API" in docs/FUSION.md must name every export of `ntdist.fusion`, each function with the code's
parameters (names, kinds, defaults).

Run: .venv/bin/python -m pytest tests/unit/test_docs.py
"""

import ast
import glob
import inspect
import os
import re

import pytest

import ntdist.fusion as fusion
from helpers import ROOT

PREFIXES = ("ntdist/", "configs/", "benchmarks/", "docs/", "tests/", "scripts/", "launch/")
README_MAX_LINES = 220
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
SPAN = re.compile(r"`([^`]+)`")   # spans may wrap onto the next line
STRIP = "\"'()[],;.!?*"   # quotes, brackets and sentence punctuation around a path


def backticked(text: str) -> list:
    """The text of every fenced block and every inline code span."""
    blocks = FENCE.findall(text)
    return blocks + SPAN.findall(FENCE.sub("", text))


def paths_in(snippet: str) -> set:
    """Repository paths in one code snippet, without `:line` / `::name` suffixes."""
    found = set()
    for token in snippet.split():
        for part in token.split("="):
            part = part.strip(STRIP)
            if not part.startswith(PREFIXES) or "<" in part or "{" in part or "$" in part:
                continue
            found.add(re.split(r":", part, maxsplit=1)[0].rstrip(STRIP))
    return found


def missing_paths(doc: str) -> list:
    with open(os.path.join(ROOT, doc)) as f:
        text = f.read()
    assert FENCE.sub("", text).count("`") % 2 == 0, f"{doc}: an unclosed backtick pairs the spans wrongly"
    paths = set().union(*(paths_in(s) for s in backticked(text)))
    return sorted(p for p in paths if not glob.glob(os.path.join(ROOT, p)))


@pytest.mark.parametrize("doc", DOCS)
def test_every_backticked_path_exists(doc):
    assert missing_paths(doc) == []


def test_paths_are_found_with_suffixes_and_placeholders_skipped():
    snippet = ("`ntdist/cli.py:12` `tests/unit/test_cli.py::test_help` `configs/paper/<name>.yaml` "
               "`finetune.deepspeed_config=launch/deepspeed.json` (`docs/ZOO.md`).")
    assert set().union(*(paths_in(s) for s in backticked(snippet))) == {
        "ntdist/cli.py", "tests/unit/test_cli.py", "launch/deepspeed.json", "docs/ZOO.md"}
    block = "```bash\nntdist run configs/x.yaml\n```"
    assert backticked(block + "\n`a`") == [block, "a"]


def test_readme_is_short():
    with open(os.path.join(ROOT, "README.md")) as f:
        lines = f.read().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move reference material into docs/"


def _documented_api() -> ast.Module:
    with open(os.path.join(ROOT, "docs", "FUSION.md")) as f:
        section = f.read().split("## Public API", 1)[1]
    return ast.parse(re.search(r"```python\n(.*?)```", section, re.S).group(1))


def _params(fn: ast.FunctionDef) -> list:
    """(name, kind, default) of a documented function, as inspect names them."""
    a = fn.args
    positional = a.posonlyargs + a.args
    empty = inspect.Parameter.empty
    defaults = [empty] * (len(positional) - len(a.defaults)) + [ast.literal_eval(d) for d in a.defaults]
    out = [(p.arg, "POSITIONAL_OR_KEYWORD", d) for p, d in zip(positional, defaults)]
    if a.vararg:
        out.append((a.vararg.arg, "VAR_POSITIONAL", empty))
    out += [(p.arg, "KEYWORD_ONLY", empty if d is None else ast.literal_eval(d))
            for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg:
        out.append((a.kwarg.arg, "VAR_KEYWORD", empty))
    return out


def test_fusion_md_lists_the_public_api_with_the_codes_signatures():
    tree = _documented_api()
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    named = set(functions) | {n.name for n in tree.body if isinstance(n, ast.ClassDef)} | {
        t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets}
    assert set(fusion.__all__) - named == set(), "exports of ntdist.fusion missing from docs/FUSION.md"
    for name, node in functions.items():
        code = [(p.name, p.kind.name, p.default) for p in inspect.signature(getattr(fusion, name)).parameters.values()]
        assert _params(node) == code, name
    for node in tree.body:
        if isinstance(node, ast.Assign):
            value = getattr(fusion, node.targets[0].id)
            if not isinstance(value, dict):
                assert ast.literal_eval(node.value) == value, node.targets[0].id
