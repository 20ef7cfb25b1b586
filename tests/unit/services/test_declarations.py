"""Every service declares each operation with an inverse (or as egress), or it refuses to start; what it
declares is what it publishes on kinshasa.catalogue."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict
from sqlalchemy import MetaData

from kinshasa.schemas.declaration import compatibility_problems, parse_declaration
from kinshasa.services.kit import (
    AppliedStep,
    CommandContext,
    MissingInverseError,
    Service,
    ServiceDeclarationError,
)
from kinshasa.services.kit.runtime import ServiceRuntime
from kinshasa.services.registry import (
    UnknownServiceError,
    all_services,
    example_catalogue,
    load_module_service,
    load_service,
    service_names,
)
from kinshasa.settings import SERVICE_NAMES, ServiceSettings, StackSettings


class Rename(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"doc_id": "d", "title": "t"}]})
    doc_id: str
    title: str


class Loose(BaseModel):
    doc_id: str


async def _forward(conn: Any, cmd: Any, ctx: CommandContext) -> dict[str, Any]:
    return {}


async def _inverse(conn: Any, step: AppliedStep, ctx: CommandContext) -> None:
    return None


def _read(conn: Any, entity_id: str) -> Any:
    raise AssertionError("not read in these tests")


def _service(name: str = "shipping") -> Service:
    return Service(name, metadata=MetaData(), domain_tables=[])


def _declare(service: Service, name: str = "rename", **options: Any) -> None:
    options = {"payload": Rename, "mutation": f"{name}Doc", "entity": "doc", "entity_id_field": "doc_id",
               "inverse": _inverse, **options}
    service.operation(name, **options)(_forward)


def test_every_example_service_is_registered() -> None:
    assert set(service_names()) == set(example_catalogue().services) == set(SERVICE_NAMES)


@pytest.mark.parametrize("service", all_services(), ids=lambda s: s.name)
def test_no_forward_operation_lacks_an_inverse(service: Service) -> None:
    declaration = service.declaration()
    assert {f"{service.name}.{op.name}" for op in declaration.operations} == set(service.operations)
    for command_type, operation in service.operations.items():
        if operation.spec.egress:
            assert operation.inverse is None, f"{command_type} is egress and must not have an inverse"
            assert operation.declaration.inverse is None
        else:
            assert operation.inverse is not None, f"{command_type} has no inverse"
            assert operation.inverse is not operation.forward
            assert operation.declaration.inverse is not None
            assert operation.declaration.inverse.name == operation.inverse.__name__


@pytest.mark.parametrize("service", all_services(), ids=lambda s: s.name)
def test_what_a_service_publishes_parses_back_with_its_digest(service: Service) -> None:
    published = service.declaration(read_url="http://127.0.0.1:1", admin_url="http://127.0.0.1:1")
    parsed = parse_declaration(published.to_json())
    assert parsed == published
    assert parsed.digest == parsed.computed_digest()
    assert compatibility_problems(parsed, parsed) == []
    for op in parsed.operations:
        assert op.payload_schema.get("examples"), f"{op.name} has no example for the conformance kit"


def test_egress_operations_are_exactly_the_notifiers() -> None:
    egress = {op.command_type for s in all_services() for op in s.operations.values() if op.egress}
    assert (egress == {spec.command_type for spec in example_catalogue() if spec.egress}
            == {"notifier.send_email"})


def test_declaring_an_operation_without_inverse_raises() -> None:
    with pytest.raises(MissingInverseError,
                       match=r"shipping.rename has no inverse: declare it with inverse="):
        _declare(_service(), inverse=None)


def test_a_service_without_operations_or_reads_refuses_to_start() -> None:
    service = _service()
    with pytest.raises(ServiceDeclarationError, match="declares no operations"):
        service.verify()
    _declare(service)
    with pytest.raises(ServiceDeclarationError, match="no read model for them: declare"):
        service.verify()
    with pytest.raises(ServiceDeclarationError, match="no read model"):
        ServiceRuntime(service, stack=StackSettings(), settings=ServiceSettings())
    service.read_model("doc", current=_read, versions=_read)
    service.verify()


def test_egress_cannot_have_an_inverse() -> None:
    with pytest.raises(ServiceDeclarationError, match="cannot have an inverse"):
        _declare(_service(), egress=True)


@pytest.mark.parametrize(("options", "message"), [
    ({"mutation": "RenameDoc"}, "lowerCamelCase"),
    ({"entity_id_field": "id"}, "'id' is not a property of the payload"),
    ({"payload": Loose}, "extra='forbid'"),
])
def test_declarations_the_gateway_would_refuse_fail_at_import(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ServiceDeclarationError, match=message):
        _declare(_service(), **options)


def test_duplicate_operations_are_refused() -> None:
    service = _service()
    _declare(service)
    with pytest.raises(ServiceDeclarationError, match="declared twice"):
        _declare(service)


def test_unknown_services_are_refused_with_what_to_do() -> None:
    with pytest.raises(UnknownServiceError, match="choose one of"):
        load_service("shipping")
    with pytest.raises(UnknownServiceError, match=r"package\.module:attribute"):
        load_module_service("shipping")
    with pytest.raises(UnknownServiceError, match="cannot import"):
        load_module_service("nowhere_at_all.module:service")
    with pytest.raises(UnknownServiceError, match=r"not a kinshasa\.services\.kit\.Service"):
        load_module_service("kinshasa.services.documents:versions")
    assert load_module_service("kinshasa.services.documents:documents").name == "documents"


def test_domain_tables_must_live_on_the_service_metadata() -> None:
    from kinshasa.services.documents import document_versions

    with pytest.raises(ServiceDeclarationError, match="another MetaData"):
        Service("documents", metadata=MetaData(), domain_tables=[document_versions])


@pytest.mark.parametrize("service", all_services(), ids=lambda s: s.name)
def test_every_service_table_is_append_only(service: Service) -> None:
    names = {t.name for t in service.append_only_tables}
    assert set(service.metadata.tables) == names
