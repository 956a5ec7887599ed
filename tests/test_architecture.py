"""The import graph of preftune/ has no cycle and no arrow from a lower layer to a higher one.

Layers, lowest first (docs/ARCHITECTURE.md): a module may import its own layer and the ones below.
Every import counts, including ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "preftune"

LAYERS: list[tuple[str, ...]] = [
    ("errors", "atomic", "settings", "runfolder", "allocator"),
    ("data",),
    ("logprobs",),
    ("model",),
    ("losses",),
    ("control",),
    ("online",),
    ("methods",),
    ("config", "config_template", "config_checks"),
    ("train",),
    ("eval",),
    ("run", "sweep", "evaluate", "cli", "__main__"),
]
# The package's own __init__ is its public facade: it re-exports from the top layer.
FACADE = "preftune"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    first = module.split(".")[1] if "." in module else ""
    for rank, names in enumerate(LAYERS):
        if first in names:
            return rank
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS and to docs/ARCHITECTURE.md")


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The preftune modules `path` imports: `from a import b` counts as a.b when that is a module, else as a."""
    module = _module_name(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = package[: len(package) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found |= {f"{name}.{alias.name}" if f"{name}.{alias.name}" in modules else name for alias in node.names}
    resolved = set()
    for name in found:
        parts = name.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        if parts and parts[0] == FACADE and ".".join(parts) != module:
            resolved.add(".".join(parts))
    return resolved


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(paths)) for name, path in paths.items()}


def test_no_module_imports_a_higher_layer():
    upward = [
        f"{source} → {target}"
        for source, targets in _graph().items() if source != FACADE
        for target in targets if target != FACADE and _layer(target) > _layer(source)
    ]
    assert not upward, "imports that run back up the layers:\n" + "\n".join(sorted(upward))


def test_no_module_imports_the_package_facade():
    offenders = [source for source, targets in _graph().items() if source != FACADE and FACADE in targets]
    assert not offenders, f"import from preftune.<module>, not from the package facade: {offenders}"


def test_the_import_graph_has_no_cycle():
    graph = {source: targets - {FACADE} for source, targets in _graph().items() if source != FACADE}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            raise AssertionError("import cycle: " + " → ".join(cycle))
