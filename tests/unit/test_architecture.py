"""The layout's rules, checked on the source: no import cycles, pure fusion code, small stages, docstrings.

Run: .venv/bin/python -m pytest tests/unit/test_architecture.py
"""

import ast
import importlib
import inspect
import os

import ntdist.pipeline as pipeline
from helpers import ROOT

PACKAGE = os.path.join(ROOT, "ntdist")
# bottom up, as in docs/ARCHITECTURE.md: a module may import from its own layer and the ones before it
LAYERS = [{"errors", "options", "preempt"}, {"fusion"}, {"models"}, {"images", "datacheck", "data", "shards"}, {"records"},
          {"distributed"}, {"training"}, {"config"}, {"stages"}, {"pipeline"}, {"sweep"}, {"commands", "cli", "__main__"}]


def _modules() -> dict:
    """Dotted module name -> parsed source, for every file of the package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                with open(path) as f:
                    out[dotted] = ast.parse(f.read(), path)
    return out


def _imports(modules: dict) -> dict:
    """Module -> the modules it imports, anywhere in the file (function-level and `TYPE_CHECKING` imports
    included: a circle a reader follows is a circle, whether or not Python executes it)."""
    graph = {}
    for name, tree in modules.items():
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in modules else node.module)
        graph[name] = found
    return graph


def test_no_import_cycles():
    modules = _modules()
    graph = {m: {d for d in deps if d in modules} for m, deps in _imports(modules).items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[m] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert len(graph) > 30   # the walk saw the whole package


def test_layers_import_only_downwards():
    level = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    for module, deps in _imports(_modules()).items():
        top = module.split(".")[1] if "." in module else None
        if top is None:
            continue
        assert top in level, f"{module}: add its package to LAYERS and docs/ARCHITECTURE.md"
        for dep in deps:
            if dep.startswith("ntdist.") and dep.split(".")[1] != top:
                assert level[dep.split(".")[1]] <= level[top], f"{module} imports {dep}, a layer above it"


def test_fusion_is_pure_tensor_code():
    allowed = {"ntdist.errors", "ntdist.options"}
    for module, deps in _imports(_modules()).items():
        if not module.startswith("ntdist.fusion"):
            continue
        for dep in deps:
            assert not dep.startswith("torch.distributed"), f"{module} imports {dep}"
            if dep.startswith("ntdist") and dep != "ntdist":
                assert dep.startswith("ntdist.fusion") or dep in allowed, f"{module} imports {dep}"


def test_every_module_opens_with_a_docstring():
    for module, tree in _modules().items():
        if module.endswith("__main__"):
            continue
        assert ast.get_docstring(tree), f"{module} has no docstring"


def test_stages_take_at_most_five_parameters():
    modules = [pipeline] + [importlib.import_module(f"ntdist.stages.{name[:-3]}")
                            for name in sorted(os.listdir(os.path.join(PACKAGE, "stages"))) if name.endswith(".py")]
    stages = [f for module in modules for f in vars(module).values()
              if inspect.isfunction(f) and f.__module__ == module.__name__]
    assert len(stages) >= 25
    for stage in stages:
        assert len(inspect.signature(stage).parameters) <= 5, f"{stage.__module__}.{stage.__name__}"
