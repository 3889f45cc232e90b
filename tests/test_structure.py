"""The shape of the package, checked on its source: trainers share only the training kit, no module imports another
module's private (underscore) names, and the import graph has no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

from align.paths import REPO_ROOT

PACKAGE = REPO_ROOT / "align"
TRAINERS = {"align.trainers.offline", "align.trainers.online", "align.trainers.reward", "align.trainers.agent"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path):
    """(line, imported module, imported name or None) of every import in a module, at any depth (lazy ones too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for alias in node.names:
                yield node.lineno, base, alias.name


def _target(module: str, name: str | None) -> str | None:
    """The align module an import reaches: ``from pkg import submodule`` reaches the submodule."""
    if name is not None and f"{module}.{name}" in MODULES:
        return f"{module}.{name}"
    while module and module not in MODULES:
        module = module.rpartition(".")[0]
    return module or None


def test_no_trainer_imports_another_trainer():
    found = {
        f"{path.relative_to(REPO_ROOT)}:{line} imports {_target(mod, name)}"
        for me in TRAINERS
        for path in [MODULES[me]]
        for line, mod, name in _imports(me, path)
        if _target(mod, name) in TRAINERS - {me}
    }
    assert not found, "trainers share code through align/trainers/kit.py only:\n" + "\n".join(sorted(found))


def test_no_module_imports_a_private_name_of_another():
    found = []
    for me, path in MODULES.items():
        aliases = {}
        tree = ast.parse(path.read_text())
        for line, mod, name in _imports(me, path):
            if not mod.startswith("align"):
                continue
            if name is not None and name.startswith("_") and not name.startswith("__"):
                found.append(f"{path.relative_to(REPO_ROOT)}:{line}: from {mod} import {name}")
            if name is not None:
                aliases[name] = mod
        for node in ast.walk(tree):  # module._private through an imported align module
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and _target(aliases.get(node.value.id, ""), node.value.id) in MODULES
            ):
                found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_import_graph_has_no_cycles():
    graph = {m: set() for m in MODULES}
    for me, path in MODULES.items():
        for _, mod, name in _imports(me, path):
            target = _target(mod, name) if mod.startswith("align") else None
            if target and target != me:
                graph[me].add(target)
    # Tarjan's strongly connected components: any component of two or more modules is a cycle
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checks_see_what_they_look_for():
    """The walkers are not vacuous: they find the imports that are there."""
    kit_users = [
        m for m in TRAINERS if any(_target(mod, n) == "align.trainers.kit" for _, mod, n in _imports(m, MODULES[m]))
    ]
    assert sorted(kit_users) == sorted(TRAINERS)
    assert _target("align.losses", "registry") == "align.losses.registry"
    assert len(MODULES) > 60
