"""The shape of the code base: no import cycles, a Django-free engine, one way into /v1.

Every import counts, including those inside functions and `if TYPE_CHECKING:` blocks: a cycle
dodged by a late import is still a cycle for the reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APPS = ("catalog", "downloads", "engine", "inference", "millm_site", "monitoring", "profiles", "serving", "steering")
DJANGO_APPS = tuple(app for app in APPS if app != "engine")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    modules = {}
    for app in APPS:
        for path in (ROOT / app).rglob("*.py"):
            if "migrations" not in path.parts:
                modules[module_name(path)] = path
    return modules


MODULES = project_modules()


def imported_names(path: Path) -> set[str]:
    """Every module name an import statement anywhere in the file names (absolute imports only)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def project_imports(path: Path) -> set[str]:
    """The project modules a file imports (a name resolves to the longest module it starts with)."""
    found = set()
    for name in imported_names(path):
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    found.discard(module_name(path))
    return found


def import_graph() -> dict[str, set[str]]:
    return {name: project_imports(path) for name, path in MODULES.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each listed with one cycle path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_walker_sees_function_local_and_type_checking_imports(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from catalog.models import X\n"
                      "def f():\n    import serving.api\n")
    assert {"catalog.models.X", "serving.api"} <= imported_names(source)


def test_no_import_cycles_between_project_modules():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles between project modules:\n" + "\n".join(" ↔ ".join(c) for c in cycles)


def test_the_engine_imports_neither_django_nor_any_project_app():
    offenders = []
    for name, path in MODULES.items():
        if name.split(".")[0] != "engine":
            continue
        for imported in imported_names(path):
            top = imported.split(".")[0]
            if top == "django" or top in DJANGO_APPS:
                offenders.append(f"{name} imports {imported}")
    assert not offenders, "\n".join(sorted(offenders))


def test_only_the_url_conf_imports_the_v1_layer():
    offenders = [f"{name} imports {target}"
                 for name, imports in import_graph().items() if name.split(".")[0] != "serving"
                 for target in imports if target.split(".")[0] == "serving" and name != "millm_site.urls"]
    assert not offenders, "\n".join(sorted(offenders))
