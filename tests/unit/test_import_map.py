"""The README's map of the code ("Where things are") held true: no import cycle, each package imports only
what the map allows, and no module name means two different things.

The graph is read from the source with `ast`, so nothing is imported to build it. An edge is any import
that runs: at module level, inside a function or a `with` block (a deferred import still ties the two
modules; it only hides the cycle from the interpreter until someone moves the import up). Imports under
`if TYPE_CHECKING:` never run and are left out: a type named for the checker is not a dependency.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import kinshasa

ROOT = Path(kinshasa.__file__).resolve().parent

README = ROOT.parent / "README.md"


def _map_of_the_code() -> dict[str, frozenset[str] | str]:
    """What each part of kinshasa/ may import of kinshasa's own code (besides itself), read from the
    README's "Where things are" table. A part is a package directly under kinshasa/ or a top-level
    module; "*" marks the entry points, which wire everything."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Where things are\n", 1)[1].split("\n## ", 1)[0]
    parts: dict[str, frozenset[str] | str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`kinshasa/"):
            continue
        allowed: frozenset[str] | str
        if cells[2].startswith("nothing"):
            allowed = frozenset()
        elif cells[2] == "anything":
            allowed = "*"
        else:
            allowed = frozenset(name.strip() for name in cells[2].split(","))
        for path in re.findall(r"`kinshasa/([a-z_]+)(?:/|\.py)`", cells[0]):
            parts[path] = allowed
    # The root package's __init__ imports nothing, so importing any part loads only that part's layers.
    parts["kinshasa"] = frozenset()
    return parts


MAY_IMPORT = _map_of_the_code()
# The contract layer is read by every other one, so it stays on the standard library and pydantic.
SCHEMAS_THIRD_PARTY = frozenset({"pydantic", "pydantic_core", "annotated_types"})
# The services' domain modules: the one owner of each domain. Nothing outside services/ (but the
# entry points and the test kit, which run them) may import one.
DOMAIN_MODULES = frozenset(
    {"kinshasa.services.documents", "kinshasa.services.ledger", "kinshasa.services.links",
     "kinshasa.services.notifier"}
)
# Basenames that name one role in every package that has it; each such module is that package's own.
ROLES = {
    "__init__": "a package",
    "__main__": "`python -m` for a package",
    "cli": "a package's typer commands, mounted by kinshasa/cli.py",
    "errors": "a package's error family",
    "settings": "a process's settings (kinshasa/settings.py holds the shared ones)",
    "store": "a component's own tables",
    "install": "creates a component's tables at start",
    "runtime": "one process's parts, started and stopped together",
    "context": "what a handler or resolver is handed beside its input",
}
# One concept seen from two sides under one name, on purpose: the module names the thing itself.
SAME_THING = {
    "runs": {"kinshasa.gateway.runs", "kinshasa.client.runs"},
    "operations": {"kinshasa.schemas.operations", "kinshasa.client.operations"},
    # The SDK package and the module of its client class, which the package re-exports.
    "client": {"kinshasa.client", "kinshasa.client.client"},
}
# Cycles known to be on their way out; each must still exist (a stale entry fails the test).
KNOWN_CYCLES: set[frozenset[str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            # Only its `else:` ever runs.
            yield from _import_nodes(ast.Module(body=child.orelse, type_ignores=[]))
            continue
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        yield from _import_nodes(child)


def _owning_module(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(kinshasa modules it imports, top-level names of everything else it imports)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    own: set[str] = set()
    other: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            stem = ".".join(base + ([node.module] if node.module else []))
            targets = [f"{stem}.{alias.name}" for alias in node.names]
        else:
            assert node.module is not None
            targets = [f"{node.module}.{alias.name}" for alias in node.names]
        for target in targets:
            if target.split(".")[0] != "kinshasa":
                other.add(target.split(".")[0])
                continue
            found = _owning_module(target)
            if found and found != module:
                own.add(found)
    return own, other


GRAPH = {module: _imports(module)[0] for module in MODULES}


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of two or more modules, each as one cycle through it (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            members: list[str] = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                members.append(top)
                if top == node:
                    break
            if len(members) > 1:
                found.append(_one_cycle(graph, set(members)))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph)))
    try:
        for node in sorted(graph):
            if node not in index:
                visit(node)
    finally:
        sys.setrecursionlimit(limit)
    return found


def _one_cycle(graph: dict[str, set[str]], members: set[str]) -> list[str]:
    """A concrete path a -> ... -> a inside one strongly connected set, to print."""
    start = min(members)
    path = [start]
    seen = {start}
    while True:
        step = sorted(n for n in graph[path[-1]] if n in members)
        back = [n for n in step if n == start]
        if back and len(path) > 1:
            return [*path, start]
        fresh = [n for n in step if n not in seen]
        nxt = fresh[0] if fresh else step[0]
        if nxt in seen:
            return [*path[path.index(nxt):], nxt]
        path.append(nxt)
        seen.add(nxt)


def test_the_graph_sees_the_packages_it_checks() -> None:
    # A parser that silently found nothing would pass every rule below.
    assert "kinshasa.schemas.clock" in GRAPH["kinshasa.kernel.outbox"]
    # Imported inside a function (`_mount`), so counted only because function-level imports are edges.
    assert "kinshasa.topics.cli" in GRAPH["kinshasa.cli"]
    assert set(MAY_IMPORT) == {_part(m) for m in MODULES}


def test_the_map_names_every_part_and_only_parts_that_exist() -> None:
    assert MAY_IMPORT["schemas"] == frozenset() and MAY_IMPORT["cli"] == "*"
    for allowed in MAY_IMPORT.values():
        assert allowed == "*" or allowed <= set(MAY_IMPORT), f"the map names a part not there: {allowed}"


def test_the_product_never_imports_the_benchmarks() -> None:
    for module in MODULES:
        assert "bench" not in _imports(module)[1], f"{module} imports bench"


def test_the_cycle_finder_finds_a_cycle_and_prints_its_path() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_type_checking_imports_are_not_edges_but_function_level_ones_are() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from kinshasa.gateway import store\n"
        "def f():\n    from kinshasa.kernel import outbox\n"
    )
    names = {n.module for n in _import_nodes(tree) if isinstance(n, ast.ImportFrom)}
    assert names == {"typing", "kinshasa.kernel"}


def test_kinshasa_has_no_import_cycle() -> None:
    cycles = _cycles(GRAPH)
    unknown = [c for c in cycles if frozenset(c) not in KNOWN_CYCLES]
    assert not unknown, "import cycles:\n" + "\n".join(" -> ".join(c) for c in unknown)
    stale = KNOWN_CYCLES - {frozenset(c) for c in cycles}
    assert not stale, f"these cycles are gone: take them out of KNOWN_CYCLES: {stale}"


def test_each_package_imports_only_what_the_map_allows() -> None:
    wrong = []
    for module, targets in sorted(GRAPH.items()):
        part = _part(module)
        allowed = MAY_IMPORT[part]
        if allowed == "*":
            continue
        for target in sorted(targets):
            if _part(target) != part and _part(target) not in allowed:
                wrong.append(f"{module} imports {target} ({part} may import: {sorted(allowed) or 'nothing'})")
    assert not wrong, "\n".join(wrong)


def test_schemas_rest_on_the_standard_library_and_pydantic_alone() -> None:
    stdlib = sys.stdlib_module_names
    for module in (m for m in MODULES if _part(m) == "schemas"):
        _, other = _imports(module)
        foreign = {name for name in other if name not in stdlib and name != "__future__"}
        assert foreign <= SCHEMAS_THIRD_PARTY, f"{module} imports {sorted(foreign - SCHEMAS_THIRD_PARTY)}"


def test_only_the_services_and_the_entry_points_import_a_domain_module() -> None:
    for module, targets in sorted(GRAPH.items()):
        if _part(module) in {"services", "launcher", "testing", "cli"}:
            continue
        assert not targets & DOMAIN_MODULES, f"{module} imports {sorted(targets & DOMAIN_MODULES)}"


def test_a_role_name_is_never_a_package_and_the_readme_lists_every_role() -> None:
    # `cli` is a module in many packages; a package named `cli` would make `x.cli` mean two things.
    packages = {m.rsplit(".", 1)[-1] for m, path in MODULES.items() if path.name == "__init__.py"}
    assert not packages & (set(ROLES) - {"__init__"})
    section = README.read_text(encoding="utf-8").split("\n## Where things are\n", 1)[1]
    assert all(f"`{role}`" in section for role in set(ROLES) - {"__init__"})


def test_no_two_modules_share_a_name_for_different_things() -> None:
    by_name: dict[str, set[str]] = {}
    for module in MODULES:
        if module != "kinshasa":
            by_name.setdefault(module.rsplit(".", 1)[-1], set()).add(module)
    shared = {
        name: sorted(modules) for name, modules in by_name.items()
        if len(modules) > 1 and name not in ROLES and SAME_THING.get(name) != modules
    }
    assert not shared, f"one name, several things (rename one, or list a deliberate role): {shared}"
