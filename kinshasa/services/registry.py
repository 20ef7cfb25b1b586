"""The example services by name: the one place that maps `kinshasa service <name>` to a service module."""

from __future__ import annotations

import importlib

from kinshasa.services.kit import Service

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

