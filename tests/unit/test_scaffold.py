"""`kinshasa new-service`: the package it writes declares a valid service; a refused ask writes nothing."""

from __future__ import annotations

import ast
import importlib
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from types import ModuleType

import pytest
from typer.testing import CliRunner

from kinshasa.cli import app
from kinshasa.scaffold import ScaffoldError, check_name, render, write_service
from kinshasa.services.kit import Service

Importer = Callable[[Path, str], ModuleType]


def fresh_name() -> str:
    """A service name no other test (and no module already imported) uses."""
    return f"svc_{uuid.uuid4().hex[:8]}"


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def import_service(monkeypatch: pytest.MonkeyPatch) -> Iterator[Importer]:
    """Import `<name>.service` from a generated package under `root`; forgotten again after the test."""
    names: list[str] = []

    def load(root: Path, name: str) -> ModuleType:
        monkeypatch.syspath_prepend(str(root))
        names.append(name)
        return importlib.import_module(f"{name}.service")

    yield load
    for name in names:
        for module in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
            del sys.modules[module]


def test_the_package_has_a_service_its_tests_a_readme_and_a_pyproject() -> None:
    name = fresh_name()
    assert set(render(name)) == {PurePosixPath(p) for p in (
        "pyproject.toml", "README.md", f"{name}/__init__.py", f"{name}/service.py",
        "tests/conftest.py", "tests/test_service.py")}


def test_every_placeholder_is_filled_and_every_python_file_parses() -> None:
    name = fresh_name()
    for path, text in render(name).items():
        assert "${" not in text, f"{path} kept a placeholder"
        if path.suffix == ".py":
            ast.parse(text, filename=str(path))
    files = render(name)
    assert f'name = "{name.replace("_", "-")}"' in files[PurePosixPath("pyproject.toml")]
    assert f"kinshasa up --service {name}.service:{name}" in files[PurePosixPath("README.md")]


def test_the_generated_service_imports_and_passes_verify(tmp_path: Path, import_service: Importer) -> None:
    name = fresh_name()
    root = write_service(name, tmp_path)
    assert root == tmp_path / name
    service = getattr(import_service(root, name), name)
    assert isinstance(service, Service)
    service.verify()
    declaration = service.declaration()
    assert declaration.service == name
    [operation] = declaration.operations
    assert (operation.name, operation.entity_type, operation.entity_id_field) == ("create", "item", None)
    assert operation.mutation == f"createSvc{name.removeprefix('svc_').capitalize()}Item"
    assert operation.inverse is not None and operation.inverse.name == "withdraw_item"
    assert operation.payload_schema["examples"]
    [entity] = declaration.entities
    assert (entity.type, entity.list_by) == ("item", ["run_id"])


def test_the_generated_tests_run_the_service_through_the_conformance_kit() -> None:
    name = fresh_name()
    files = render(name)
    assert files[PurePosixPath("tests/conftest.py")].count('pytest_plugins = ["kinshasa.testing"]') == 1
    test = files[PurePosixPath("tests/test_service.py")]
    assert f"from {name}.service import {name}" in test
    assert "running_service(" in test and "run_conformance(" in test and "report.ok" in test


def test_a_missing_dir_is_created_and_holds_only_the_package(tmp_path: Path) -> None:
    name = fresh_name()
    root = write_service(name, tmp_path / "not" / "yet")
    assert (root / name / "service.py").is_file()
    # The package was staged in a hidden directory beside it and renamed into place: nothing else stays.
    assert [p.name for p in (tmp_path / "not" / "yet").iterdir()] == [name]


@pytest.mark.parametrize(("name", "because"), [
    ("Tickets", "lowercase snake_case"),
    ("support-desk", "lowercase snake_case"),
    ("9lives", "lowercase snake_case"),
    ("double__underscore", "lowercase snake_case"),
    ("trailing_", "lowercase snake_case"),
    ("", "lowercase snake_case"),
    ("a" * 49, "at most 48"),
    ("run", "reserved for Kinshasa's own components"),
    ("gateway", "reserved for Kinshasa's own components"),
    ("coordinator", "reserved for Kinshasa's own components"),
    ("documents", "example services"),
    ("ledger", "example services"),
    ("links", "example services"),
    ("notifier", "example services"),
    ("class", "keyword or built-in"),
    ("list", "keyword or built-in"),
    ("json", "already importable"),
    ("kinshasa", "already importable"),
    ("tests", "layout"),
    ("create", "already uses"),
    ("metadata", "already uses"),
])
def test_a_name_that_cannot_be_used_is_refused_and_nothing_is_written(tmp_path: Path, name: str,
                                                                      because: str) -> None:
    with pytest.raises(ScaffoldError, match=r"pick another name|snake_case") as refused:
        write_service(name, tmp_path)
    assert because in str(refused.value)
    assert tree(tmp_path) == []


def test_a_valid_name_is_returned_as_it_is() -> None:
    assert check_name("support_desk2") == "support_desk2"


def test_an_existing_target_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    name = fresh_name()
    (tmp_path / name).mkdir()
    (tmp_path / name / "mine.txt").write_text("keep me")
    with pytest.raises(ScaffoldError, match="already exists"):
        write_service(name, tmp_path)
    assert tree(tmp_path) == [name, f"{name}/mine.txt"]
    assert (tmp_path / name / "mine.txt").read_text() == "keep me"


def test_the_command_writes_the_package_and_says_what_to_do_next(tmp_path: Path) -> None:
    name = fresh_name()
    result = CliRunner().invoke(app, ["new-service", name, "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / name / name / "service.py").is_file()
    assert f"kinshasa up --service {name}.service:{name}" in result.output


@pytest.mark.parametrize("existing", [False, True])
def test_the_command_refuses_with_exit_code_2_and_changes_nothing(tmp_path: Path, existing: bool) -> None:
    name = fresh_name() if existing else "Not_Snake"
    if existing:
        (tmp_path / name).mkdir()
    before = tree(tmp_path)
    result = CliRunner().invoke(app, ["new-service", name, "--dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "error:" in result.stderr
    assert tree(tmp_path) == before


def test_the_templates_are_not_python_modules_of_kinshasa() -> None:
    template = Path(__file__).resolve().parents[2] / "kinshasa" / "scaffold" / "template"
    files = [p for p in template.rglob("*") if p.is_file()]
    assert files and all(p.name.endswith(".tmpl") for p in files)
