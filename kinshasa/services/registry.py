"""Where `kinshasa service` finds a service: the example services by name, any other by `module:attribute`."""

from __future__ import annotations

import importlib

from kinshasa.schemas.declaration import ServiceDeclaration, build_catalogue
from kinshasa.schemas.operations import OperationCatalogue
from kinshasa.services.kit import Service
from kinshasa.topics.catalogue import CATALOGUE

# Module and attribute of each service's declaration; imported lazily so starting one service does not
# import (or fail on) the others.
_MODULES: dict[str, tuple[str, str]] = {
    "documents": ("kinshasa.services.documents", "documents"),
    "ledger": ("kinshasa.services.ledger", "ledger"),
    "links": ("kinshasa.services.links", "links"),
    "notifier": ("kinshasa.services.notifier", "notifier"),
}


class UnknownServiceError(LookupError):
    """No service of that name is registered."""


def service_names() -> tuple[str, ...]:
    return tuple(_MODULES)


def load_service(name: str) -> Service:
    """Import the service module and return its verified declaration; raises if it is incomplete."""
    try:
        module_name, attribute = _MODULES[name]
    except KeyError:
        raise UnknownServiceError(
            f"unknown service {name!r}: choose one of {', '.join(_MODULES)}"
        ) from None
    service = getattr(importlib.import_module(module_name), attribute)
    if not isinstance(service, Service):
        raise TypeError(f"{module_name}.{attribute} is not a kinshasa.services.kit.Service")
    service.verify()
    return service


def all_services() -> list[Service]:
    return [load_service(name) for name in _MODULES]


def load_module_service(reference: str) -> Service:
    """The verified `Service` at `package.module:attribute` (a service that lives outside Kinshasa)."""
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise UnknownServiceError(
            f"{reference!r} is not a service reference: write it as package.module:attribute, "
            "e.g. tickets.service:tickets"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownServiceError(
            f"cannot import {module_name}: {exc}; install its package (pip install -e <dir>) or run from "
            "the directory that holds it"
        ) from exc
    service = getattr(module, attribute, None)
    if not isinstance(service, Service):
        raise UnknownServiceError(
            f"{reference} is {type(service).__name__ if service is not None else 'missing'}, not a "
            "kinshasa.services.kit.Service"
        )
    service.verify()
    return service



def example_declarations() -> list[ServiceDeclaration]:
    """What the example services publish on kinshasa.catalogue (without endpoints)."""
    return [service.declaration() for service in all_services()]


def example_catalogue() -> OperationCatalogue:
    """The gateway's view of the example services' operations, as it builds it from their declarations."""
    return build_catalogue(example_declarations())


def publish_example_declarations(bootstrap: str, topic: str = CATALOGUE) -> None:
    """Create the example services' topics and publish their declarations, as each does at start (for
    benchmarks and tests that run a gateway without the services)."""
    import asyncio

    from kinshasa.topics.admin import ensure_topics
    from kinshasa.topics.catalogue import catalogue, catalogue_topic_spec
    from kinshasa.topics.declaration_feed import publish_declaration
    from kinshasa.topics.producer import AsyncProducer

    specs = catalogue(service_names())
    if topic not in {spec.name for spec in specs}:
        specs.append(catalogue_topic_spec(name=topic))
    ensure_topics(bootstrap, specs)

    async def publish() -> None:
        async with AsyncProducer(bootstrap, client_id="kinshasa-examples") as producer:
            for declaration in example_declarations():
                await publish_declaration(producer, declaration, topic)

    asyncio.run(publish())
