"""The gateway and the coordinator know no service: every service declares itself on kinshasa.catalogue."""

from __future__ import annotations

import re
from pathlib import Path

from kinshasa.services.registry import example_declarations

PACKAGE = Path(__file__).resolve().parents[2] / "kinshasa"


def _names() -> re.Pattern[str]:
    """How code would name an example service: a qualified operation or scope (`documents.rename`,
    `ledger.*`), the service's name quoted, or a mutation (`createDocument`).

    Bare words are left out where they mean something else here: the coordinator's per-run ledger, a
    GraphQL document, a link between entities.
    """
    services: set[str] = set()
    qualified: set[str] = set()
    mutations: set[str] = set()
    for declaration in example_declarations():
        services.add(declaration.service)
        qualified |= {f"{declaration.service}.{op.name}" for op in declaration.operations}
        mutations |= {op.mutation for op in declaration.operations}
    names = "|".join(sorted(services))
    return re.compile(
        r"(?<![\w.])(" + "|".join(sorted(map(re.escape, qualified), key=len, reverse=True)) + r")\b"
        rf"|(?<![\w.])({names})(\.\*|:read)"
        rf"|[\"'`]({names})[\"'`]"
        r"|\bnotifier\b"
        rf"|\b({'|'.join(sorted(mutations))})\b"
    )


def test_no_module_of_the_gateway_or_the_coordinator_names_an_example_service() -> None:
    pattern = _names()
    found = []
    for package in ("gateway", "coordinator"):
        for path in sorted((PACKAGE / package).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                match = pattern.search(line)
                if match:
                    where = f"{path.relative_to(PACKAGE.parent)}:{number}"
                    found.append(f"{where}: {match.group(0)}: {line.strip()}")
    assert found == [], "\n".join(found)


def test_the_check_can_fail() -> None:
    assert _names().search('spec = catalogue.get("documents.rename")')
    assert _names().search("mutation { createDocument(runId: $r) }")
    assert _names().search('scopes such as ["ledger.*"]') and _names().search('owner = "links"')
    assert not _names().search("the run's ledger of steps; a GraphQL document; links between entities")
