"""Read stitching: entities from the services' read APIs, steps from the coordinator, DLQs from admin APIs.

None of this is on the write path. A backend that is not configured or does not answer gives a
BACKEND_UNAVAILABLE error naming it and the setting to fix, never a hang or a 500.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from kinshasa.gateway.errors import BackendUnavailable, Invalid
from kinshasa.schemas.operations import OperationCatalogue


@dataclass(frozen=True)
class StepsPage:
    """One page of a run's ledger steps, newest first, as the coordinator's ledger API returns it."""

    steps: list[dict[str, Any]]
    # The `before` of the next (older) page: the step id of this page's last step; None at the end.
    next_before: int | None


class Backends:
    """HTTP clients for every read backend, sharing one connection pool."""

    def __init__(
        self,
        catalogue: OperationCatalogue,
        service_urls: dict[str, str],
        coordinator_url: str | None,
        admin_urls: dict[str, str],
        internal_token: str | None,
        timeout_s: float,
    ) -> None:
        self._service_urls = {k: v.rstrip("/") for k, v in service_urls.items()}
        self._coordinator_url = coordinator_url.rstrip("/") if coordinator_url else None
        self._admin_urls = {k: v.rstrip("/") for k, v in admin_urls.items()}
        self._token = internal_token
        # Entity type -> owning service, from the catalogue: the gateway knows no service's internals.
        self._owner = {spec.entity_type: spec.service for spec in catalogue}
        self._client = httpx.AsyncClient(timeout=timeout_s)

    async def close(self) -> None:
        await self._client.aclose()

    @property
    def components(self) -> list[str]:
        return sorted(self._admin_urls)

    def _service_url(self, service: str) -> str:
        url = self._service_urls.get(service)
        if url is None:
            raise BackendUnavailable(
                f"the {service} read API is not configured: set KINSHASA_GATEWAY_SERVICE_URLS to a JSON "
                f'such as \'{{"{service}": "http://127.0.0.1:8101"}}\'',
                backend=service,
            )
        return url

    async def _get(
        self,
        backend: str,
        url: str,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        allow_404: bool = True,
    ) -> Any:
        try:
            response = await self._client.get(url, params=params, headers=headers)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(
                f"{backend} did not answer at {url} ({type(exc).__name__}); check it is running and the "
                "gateway's URL setting for it",
                backend=backend,
            ) from exc
        if response.status_code == 404 and allow_404:
            return None
        if response.status_code >= 400:
            raise BackendUnavailable(
                f"{backend} answered {response.status_code} at {url}",
                backend=backend,
                status=response.status_code,
            )
        try:
            return response.json()
        except ValueError as exc:
            raise BackendUnavailable(f"{backend} answered non-JSON at {url}", backend=backend) from exc

    async def entity(self, entity_type: str, entity_id: str) -> dict[str, Any] | None:
        service = self._owner[entity_type]
        url = (
            f"{self._service_url(service)}/entities/{quote(entity_type, safe='')}/{quote(entity_id, safe='')}"
        )
        result = await self._get(service, url)
        return result if isinstance(result, dict) else None

    async def versions(self, entity_type: str, entity_id: str) -> list[dict[str, Any]]:
        service = self._owner[entity_type]
        url = (
            f"{self._service_url(service)}/entities/{quote(entity_type, safe='')}/"
            f"{quote(entity_id, safe='')}/versions"
        )
        result = await self._get(service, url)
        return list(result) if isinstance(result, list) else []

    async def links_of(self, entity_id: str) -> list[dict[str, Any]]:
        service = self._owner["link"]
        result = await self._get(service, f"{self._service_url(service)}/links", {"entity_id": entity_id})
        return list(result or [])

    async def emails_of(self, run_id: str) -> list[dict[str, Any]]:
        service = self._owner["email"]
        result = await self._get(service, f"{self._service_url(service)}/emails", {"run_id": run_id})
        return list(result or [])

    async def steps(self, run_id: str, limit: int, before: int | None) -> StepsPage:
        """A page of the run's steps; an empty page when the ledger has not seen the run yet (404)."""
        if self._coordinator_url is None:
            raise BackendUnavailable(
                "the coordinator's ledger API is not configured: set KINSHASA_GATEWAY_COORDINATOR_URL",
                backend="coordinator",
            )
        params: dict[str, Any] = {"limit": limit}
        if before is not None:
            params["before"] = before
        result = await self._get(
            "coordinator", f"{self._coordinator_url}/runs/{quote(run_id, safe='')}/steps", params
        )
        if isinstance(result, list):
            return StepsPage(list(result), None)
        if not isinstance(result, dict):
            return StepsPage([], None)
        next_before = result.get("next_before")
        steps = result.get("steps")
        return StepsPage(
            list(steps) if isinstance(steps, list) else [],
            next_before if isinstance(next_before, int) and not isinstance(next_before, bool) else None,
        )

    def _admin(self, component: str) -> str:
        url = self._admin_urls.get(component)
        if url is None:
            raise Invalid(
                f"unknown component {component!r}: known are {', '.join(self.components) or 'none'} "
                "(KINSHASA_GATEWAY_ADMIN_URLS)",
                [("component", "unknown")],
            )
        if not self._token:
            raise BackendUnavailable("no internal token to call admin endpoints with", backend=component)
        return url

    async def dlq(self, component: str, limit: int) -> dict[str, Any]:
        url = self._admin(component)
        result = await self._get(
            component,
            f"{url}/admin/dlq",
            {"limit": limit},
            {"Authorization": f"Bearer {self._token}"},
            allow_404=False,
        )
        return dict(result)

    async def dlq_all(self, limit: int) -> list[dict[str, Any]]:
        """Every component's DLQ; one that does not answer shows its error instead of failing the query."""

        async def one(component: str) -> dict[str, Any]:
            try:
                return {"component": component, **(await self.dlq(component, limit))}
            except BackendUnavailable as exc:
                return {"component": component, "count": None, "entries": [], "error": exc.message}

        return list(await asyncio.gather(*(one(c) for c in self.components)))

    async def reprocess(self, component: str, message_ids: list[str]) -> dict[str, Any]:
        url = self._admin(component)
        try:
            response = await self._client.post(
                f"{url}/admin/dlq/reprocess",
                json={"message_ids": message_ids},
                headers={"Authorization": f"Bearer {self._token}"},
            )
        except httpx.HTTPError as exc:
            raise BackendUnavailable(
                f"{component} did not answer at {url} ({type(exc).__name__})", backend=component
            ) from exc
        if response.status_code >= 400:
            raise BackendUnavailable(
                f"{component} refused the reprocess request ({response.status_code}): {response.text[:300]}",
                backend=component,
                status=response.status_code,
            )
        return dict(response.json())
