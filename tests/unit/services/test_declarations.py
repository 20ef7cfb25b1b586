"""Every service declares each catalogue operation with an inverse (or as egress), or it refuses to start."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import MetaData

from kinshasa.schemas.catalogue import CATALOGUE
from kinshasa.services.kit import (
    AppliedStep,
    CommandContext,
    MissingInverseError,
    Service,
    ServiceDeclarationError,
    UndeclaredOperationError,
)
from kinshasa.services.kit.runtime import ServiceRuntime
from kinshasa.services.registry import UnknownServiceError, all_services, load_service, service_names
from kinshasa.settings import SERVICE_NAMES, ServiceSettings, StackSettings


async def _forward(conn: Any, cmd: Any, ctx: CommandContext) -> dict[str, Any]:
    return {}


async def _inverse(conn: Any, step: AppliedStep, ctx: CommandContext) -> None:
    return None


def test_every_catalogue_service_is_registered() -> None:
    assert set(service_names()) == set(CATALOGUE.services) == set(SERVICE_NAMES)


@pytest.mark.parametrize("service", all_services(), ids=lambda s: s.name)
def test_no_forward_operation_lacks_an_inverse(service: Service) -> None:
    declared = service.operations
    assert set(declared) == {spec.command_type for spec in CATALOGUE.for_service(service.name)}
    for command_type, operation in declared.items():
        if operation.spec.egress:
            assert operation.inverse is None, f"{command_type} is egress and must not have an inverse"
        else:
            assert operation.inverse is not None, f"{command_type} has no inverse"
            assert operation.inverse is not operation.forward


def test_egress_operations_are_exactly_the_catalogues() -> None:
    egress = {op.command_type for s in all_services() for op in s.operations.values() if op.egress}
    assert egress == {spec.command_type for spec in CATALOGUE if spec.egress} == {"notifier.send_email"}


def test_declaring_an_operation_without_inverse_raises() -> None:
    service = Service("documents", metadata=MetaData(), domain_tables=[])
    with pytest.raises(
        MissingInverseError, match=r"documents.rename has no inverse: declare it with inverse="
    ):
        service.operation("rename")(_forward)


def test_a_service_missing_an_operation_refuses_to_start() -> None:
    service = Service("documents", metadata=MetaData(), domain_tables=[])
    service.operation("create", inverse=_inverse)(_forward)
    with pytest.raises(UndeclaredOperationError, match=r"does not declare documents.rename, documents.edit"):
        service.verify()
    with pytest.raises(UndeclaredOperationError):
        ServiceRuntime(service, stack=StackSettings(), settings=ServiceSettings())


def test_egress_must_match_the_catalogue() -> None:
    service = Service("notifier", metadata=MetaData(), domain_tables=[])
    with pytest.raises(ServiceDeclarationError, match="egress=True"):
        service.operation("send_email", inverse=_inverse)(_forward)
    with pytest.raises(ServiceDeclarationError, match="cannot have an inverse"):
        service.operation("send_email", egress=True, inverse=_inverse)(_forward)
    other = Service("documents", metadata=MetaData(), domain_tables=[])
    with pytest.raises(ServiceDeclarationError, match="not egress"):
        other.operation("rename", egress=True)(_forward)


def test_unknown_and_duplicate_operations_are_refused() -> None:
    service = Service("documents", metadata=MetaData(), domain_tables=[])
    with pytest.raises(ServiceDeclarationError, match="not in the operation catalogue"):
        service.operation("delete", inverse=_inverse)(_forward)
    service.operation("rename", inverse=_inverse)(_forward)
    with pytest.raises(ServiceDeclarationError, match="declared twice"):
        service.operation("rename", inverse=_inverse)(_forward)


def test_a_service_the_catalogue_does_not_know_refuses_to_start() -> None:
    with pytest.raises(ServiceDeclarationError, match="no operations for service 'shipping'"):
        Service("shipping", metadata=MetaData(), domain_tables=[]).verify()
    with pytest.raises(UnknownServiceError, match="choose one of"):
        load_service("shipping")


def test_domain_tables_must_live_on_the_service_metadata() -> None:
    from kinshasa.services.documents import document_versions

    with pytest.raises(ServiceDeclarationError, match="another MetaData"):
        Service("documents", metadata=MetaData(), domain_tables=[document_versions])


@pytest.mark.parametrize("service", all_services(), ids=lambda s: s.name)
def test_every_service_table_is_append_only(service: Service) -> None:
    names = {t.name for t in service.append_only_tables}
    assert set(service.metadata.tables) == names
