"""The package's shape: no import cycles (every import counts, the lazy ones inside functions too), sub-packages
that import only those below them, and leaf modules that import cheaply."""

import ast
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON, ROOT

PACKAGE = ROOT / "diffusion"
# The layers from the bottom up; a module may import its own layer and those before it.
LAYERS = ["errors", "config", "runtime", "models", "process", "sampling", "data", "evaluation", "engine"]
TOP = {"config.store", "config.resolvers", "config.explain"}  # the registry and what reads it sit above all


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package modules ``path`` imports, anywhere in it but under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    found = set()

    def visit(node, typing_only=False):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only = True
        if not typing_only:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child, typing_only)

    visit(tree)
    return {m for m in found if m in known}


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(paths)
    edges = {m: imports_of(p, known) - {m} for m, p in paths.items()}
    # (Importing a.b.c also runs the package __init__ files above it; they define namespaces, and a cycle through
    # them would show up here as an explicit import of the package.)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (cycle := dfs(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := dfs(m)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def layer_of(module: str) -> int | None:
    """The layer index of a module of a sub-package (None: an entry point or the package root)."""
    rest = module.removeprefix("diffusion.")
    if rest in TOP or rest == "diffusion":
        return None
    head = rest.split(".")[0]
    return LAYERS.index(head) if head in LAYERS else None


def test_sub_packages_import_only_those_below_them():
    wrong = []
    for module, targets in graph().items():
        mine = layer_of(module)
        if mine is None:
            continue
        for target in targets:
            theirs = layer_of(target)
            if target.removeprefix("diffusion.") in TOP or (theirs is not None and theirs > mine):
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


@pytest.mark.parametrize(
    "module", ["diffusion.evaluation.metrics", "diffusion.sampling.solvers", "diffusion.process.gaussian"]
)
def test_importing_a_leaf_module_builds_no_config_store_and_imports_no_network(module):
    code = (
        f"import sys, {module}\n"
        "from hydra.core.config_store import ConfigStore\n"
        "names = [n for n in ConfigStore.instance().repo if n.startswith('schema_')]\n"
        "print(len(names), 'diffusion.models.unet' in sys.modules, 'diffusion.models.dit' in sys.modules)\n"
    )
    out = subprocess.run(
        [PYTHON, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout.split()
    assert out == ["0", "False", "False"], out


def test_register_fills_the_store():
    code = (
        "import diffusion\n"
        "diffusion.register()\n"
        "from hydra.core.config_store import ConfigStore\n"
        "print(sum(n.startswith('schema_') for n in ConfigStore.instance().repo))\n"
    )
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert int(out) > 20
