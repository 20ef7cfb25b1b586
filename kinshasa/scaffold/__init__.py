"""`kinshasa new-service`: writes a ready service package of your own from the templates beside this module.

The templates under `template/` are plain text files ending in `.tmpl` (so nothing there is an
importable module of Kinshasa), rendered with `string.Template`: `${name}` is the service name, which
is also its Python package and its `Service` attribute. `template/package/` becomes `<name>/`.

`write_service(name, directory)` refuses (ScaffoldError, nothing written) a name that is not a valid
service name, that Kinshasa keeps for itself, or that would break the generated package; and a target
directory that already exists. The package is written in a hidden temporary directory beside the target
and renamed into place, so a failure half way leaves nothing behind.
"""

from __future__ import annotations

import ast
import builtins
import functools
import importlib.util
import keyword
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from importlib import metadata, resources
from importlib.resources.abc import Traversable
from pathlib import Path, PurePosixPath
from string import Template

from kinshasa.schemas.declaration import RESERVED_SERVICE_NAMES, SERVICE_NAME_RE
from kinshasa.services.registry import service_names

TEMPLATE_SUFFIX = ".tmpl"
# The template directory that becomes the service's Python package, named after the service.
PACKAGE_DIR = "package"
# snake_case: lowercase words of letters and digits joined by single underscores.
SNAKE_CASE_RE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
# A stand-in name to read the templates' own Python names with.
_PROBE = "probe_service_name"


class ScaffoldError(ValueError):
    """A service package that cannot be written as asked; the message says what to do instead."""


def title_case(name: str) -> str:
    """`support_desk` -> `SupportDesk`: the name inside the generated mutation (`createSupportDeskItem`)."""
    return "".join(word.capitalize() for word in name.split("_"))


def check_name(name: str) -> str:
    """Return `name` if it can name a new service, its package and its `Service`, else raise ScaffoldError."""
    if not SNAKE_CASE_RE.match(name) or not SERVICE_NAME_RE.match(name):
        raise ScaffoldError(
            f"{name!r} is not a service name: use lowercase snake_case (letters, digits and single '_', "
            "starting with a letter, at most 48 characters), e.g. support_desk")
    if name in RESERVED_SERVICE_NAMES:
        raise ScaffoldError(f"{name!r} is reserved for Kinshasa's own components: pick another name")
    if name in service_names():
        raise ScaffoldError(f"{name!r} is one of Kinshasa's example services, which run on every stack: "
                            "pick another name")
    if keyword.iskeyword(name) or name in dir(builtins):
        raise ScaffoldError(f"{name!r} is a Python keyword or built-in, so it cannot name the generated "
                            "package and Service: pick another name")
    if name in _layout_names():
        raise ScaffoldError(f"{name!r} is already taken in the generated package's layout (its {name}/ "
                            "beside the package): pick another name")
    if name in _template_names():
        raise ScaffoldError(f"{name!r} is a name the generated code already uses for something else: pick "
                            "another name")
    found = importlib.util.find_spec(name)
    if found is not None:
        where = found.origin or ", ".join(found.submodule_search_locations or []) or "here"
        raise ScaffoldError(f"a module named {name!r} is already importable ({where}); a package of that "
                            "name would shadow it: pick another name")
    return name


def render(name: str) -> dict[PurePosixPath, str]:
    """Every file of the package for service `name`, by its path inside the package directory."""
    values = _values(check_name(name))
    return {path: Template(template.read_text(encoding="utf-8")).substitute(values)
            for path, template in _templates(name)}


def write_service(name: str, directory: Path) -> Path:
    """Write the package for service `name` as `<directory>/<name>/` and return that path.

    Raises ScaffoldError, having written nothing, for a name `check_name` refuses or a target that
    exists. `directory` is created if it is missing.
    """
    files = render(name)
    target = directory / name
    if target.exists() or target.is_symlink():
        raise ScaffoldError(f"{target} already exists: choose another --dir, or move it away first")
    if directory.exists() and not directory.is_dir():
        raise ScaffoldError(f"{directory} is not a directory: give --dir a directory")
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=directory))
    try:
        for path, text in files.items():
            destination = staging.joinpath(*path.parts)
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_text(text, encoding="utf-8")
        staging.rename(target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ScaffoldError(f"could not write {target}: {exc}") from exc
    return target


def _values(name: str) -> Mapping[str, str]:
    return {"name": name, "title": title_case(name), "distribution": name.replace("_", "-"),
            "kinshasa_version": metadata.version("kinshasa")}


def _templates(name: str) -> Iterator[tuple[PurePosixPath, Traversable]]:
    """Each template file with the path it renders to: `.tmpl` dropped, `package/` renamed to `name/`."""
    def walk(folder: Traversable, at: PurePosixPath) -> Iterator[tuple[PurePosixPath, Traversable]]:
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.is_dir():
                yield from walk(entry, at / (name if at == PurePosixPath() and entry.name == PACKAGE_DIR
                                             else entry.name))
            elif entry.name.endswith(TEMPLATE_SUFFIX):
                yield at / entry.name.removesuffix(TEMPLATE_SUFFIX), entry

    yield from walk(resources.files(__name__).joinpath("template"), PurePosixPath())


@functools.cache
def _layout_names() -> frozenset[str]:
    """The top-level files and directories the package has besides its Python package (`tests`, ...)."""
    return frozenset(path.parts[0] for path, _ in _templates(_PROBE) if path.parts[0] != _PROBE)


@functools.cache
def _template_names() -> frozenset[str]:
    """The module-level names the generated Python files bind, besides the service's own name."""
    values = _values(_PROBE)
    names: set[str] = set()
    for path, template in _templates(_PROBE):
        if path.suffix != ".py":
            continue
        tree = ast.parse(Template(template.read_text(encoding="utf-8")).substitute(values))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Import | ast.ImportFrom):
                names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(t.id for t in targets if isinstance(t, ast.Name))
    return frozenset(names - {_PROBE})
