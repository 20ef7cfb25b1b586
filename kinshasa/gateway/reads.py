"""Read stitching: entities from the services' read APIs, steps from the coordinator, DLQs from admin APIs.

None of this is on the write path. A backend that is not configured or does not answer gives a
BACKEND_UNAVAILABLE error naming it and the setting to fix, never a hang, a 500 or where it lives (its URL
goes to the log only). `Backends` is the gateway's one set of HTTP clients, shared by all requests; each
call takes the timeout its request has left (kinshasa/gateway/loaders.py batches and bounds them).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from kinshasa.gateway.errors import BackendUnavailable, Invalid

if TYPE_CHECKING:
    from kinshasa.gateway.service_book import ServiceBook


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepsPage:
    """One page of a run's ledger steps, newest first, as the coordinator's ledger API returns it."""

    steps: list[dict[str, Any]]
    # The `before` of the next (older) page: the step id of this page's last step; None at the end.
    next_before: int | None


@dataclass(frozen=True)
class RevertProgress:
    """Where a run's steps stand on the way back, from the coordinator's ledger: `total` steps a revert
    compensates (egress never is), `compensated`, refused (`failing`) and not yet settled (`pending`)."""

    total: int = 0
    compensated: int = 0
    failing: int = 0
    pending: int = 0


class Backends:
    """HTTP clients for every read backend, sharing one connection pool."""

    def __init__(
        self,
        book: ServiceBook,
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
        # Services and their read APIs come from their declarations: the gateway knows no service's internals.
        self._book = book
        self._client = httpx.AsyncClient(timeout=timeout_s)

    async def close(self) -> None:
        await self._client.aclose()

    def _declared_admin_urls(self) -> dict[str, str]:
        declared = {
            name: d.endpoints.admin for name, d in self._book.declarations.items() if d.endpoints.admin
        }
        return {k: v.rstrip("/") for k, v in declared.items()} | self._admin_urls

    @property
    def components(self) -> list[str]:
        return sorted(self._declared_admin_urls())

    def _service_url(self, service: str) -> str:
        declaration = self._book.declaration(service)
        url = self._service_urls.get(service) or (declaration.endpoints.read if declaration else None)
        if url is None:
            raise BackendUnavailable(
                f"the {service} service has not said where its read API is: it publishes that in its "
                "declaration when it starts; an operator can also set KINSHASA_GATEWAY_SERVICE_URLS",
                backend=service,
            )
        return url.rstrip("/")

    async def _get(
        self,
        backend: str,
        url: str,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        allow_404: bool = True,
        timeout_s: float | None = None,
        json: Any = None,
    ) -> Any:
        """GET (or POST `json`) and decode; `timeout_s` bounds this call (default: the client's)."""
        limit: Any = timeout_s if timeout_s is not None else httpx.USE_CLIENT_DEFAULT
        try:
            if json is None:
                response = await self._client.get(url, params=params, headers=headers, timeout=limit)
            else:
                response = await self._client.post(url, json=json, headers=headers, timeout=limit)
        except httpx.HTTPError as exc:
            # The URL stays in the log: callers are told which component, never where it lives.
            log.warning("%s did not answer at %s: %r", backend, url, exc)
            raise BackendUnavailable(
                f"{backend} did not answer ({type(exc).__name__}); retry later, and tell an operator if it "
                "persists",
                backend=backend,
            ) from exc
        if response.status_code == 404 and allow_404:
            return None
        if response.status_code >= 400:
            log.warning("%s answered %d at %s: %s", backend, response.status_code, url, response.text[:300])
            raise BackendUnavailable(
                f"{backend} answered {response.status_code}", backend=backend, status=response.status_code
            )
        try:
            return response.json()
        except ValueError as exc:
            raise BackendUnavailable(
                f"{backend} answered something that is not JSON", backend=backend
            ) from exc

    def _entity_url(self, service: str, entity_type: str, entity_id: str | None = None) -> str:
        # An empty name would read another resource of the service (`/entities/x/` or its list): the
        # caller's mistake, said as such, never a backend error.
        for name, value in (("type", entity_type), ("id", entity_id)):
            if value is not None and not value.strip():
                raise Invalid(f"{name} must not be empty", [(name, "empty")])
        url = f"{self._service_url(service)}/entities/{quote(entity_type, safe='')}"
        return url if entity_id is None else f"{url}/{quote(entity_id, safe='')}"

    async def entity(
        self, service: str, entity_type: str, entity_id: str, timeout_s: float | None = None
    ) -> dict[str, Any] | None:
        """The entity's current state from its service's read API; None when it has none."""
        url = self._entity_url(service, entity_type, entity_id)
        result = await self._get(service, url, timeout_s=timeout_s)
        return result if isinstance(result, dict) else None

    async def versions(
        self, service: str, entity_type: str, entity_id: str, timeout_s: float | None = None
    ) -> list[dict[str, Any]]:
        """Every version of the entity, oldest first; empty when it never existed."""
        url = self._entity_url(service, entity_type, entity_id) + "/versions"
        result = await self._get(service, url, timeout_s=timeout_s)
        if isinstance(result, dict):
            result = result.get("versions")
        return [v for v in result if isinstance(v, dict)] if isinstance(result, list) else []

    async def listed(
        self, service: str, entity_type: str, field: str, value: str, timeout_s: float | None = None
    ) -> list[dict[str, Any]]:
        """Entities of a type whose declared list field has `value` (`GET /entities/{type}?field=value`)."""
        if not value.strip():
            raise Invalid(f"{field} must not be empty", [(field, "empty")])
        url = self._entity_url(service, entity_type)
        result = await self._get(service, url, {field: value}, timeout_s=timeout_s)
        return [v for v in result if isinstance(v, dict)] if isinstance(result, list) else []

    def _ledger(self) -> str:
        if self._coordinator_url is None:
            raise BackendUnavailable(
                "the coordinator's ledger API is not configured: set KINSHASA_GATEWAY_COORDINATOR_URL",
                backend="coordinator",
            )
        return self._coordinator_url

    async def steps(self, run_id: str, limit: int, before: int | None) -> StepsPage:
        """A page of the run's steps; an empty page when the ledger has not seen the run yet."""
        return (await self.steps_many([(run_id, limit, before)]))[0]

    async def steps_many(
        self, wanted: Sequence[tuple[str, int, int | None]], timeout_s: float | None = None
    ) -> list[StepsPage]:
        """A page of each run's steps, (run id, limit, before) each, in one call to the coordinator."""
        body = {"runs": [{"run_id": r, "limit": n, "before": b} for r, n, b in wanted]}
        result = await self._get("coordinator", f"{self._ledger()}/steps", allow_404=False,
                                 timeout_s=timeout_s, json=body)
        pages = result.get("pages") if isinstance(result, dict) else None
        if not isinstance(pages, list) or len(pages) != len(wanted):
            raise BackendUnavailable(
                "the coordinator's ledger API answered a batch of steps this gateway cannot read: are the "
                "gateway and the coordinator the same version?",
                backend="coordinator",
            )
        return [_steps_page(page) for page in pages]

    async def progress_many(
        self, run_ids: Sequence[str], timeout_s: float | None = None
    ) -> list[RevertProgress]:
        """Each run's revert progress, in one call to the coordinator; zeros for a run it has not seen."""
        result = await self._get("coordinator", f"{self._ledger()}/progress", allow_404=False,
                                 timeout_s=timeout_s, json={"run_ids": list(run_ids)})
        answers = result.get("runs") if isinstance(result, dict) else None
        if not isinstance(answers, list) or len(answers) != len(run_ids):
            raise BackendUnavailable(
                "the coordinator's ledger API answered revert progress this gateway cannot read: are the "
                "gateway and the coordinator the same version?",
                backend="coordinator",
            )
        return [_progress(answer) for answer in answers]

    def _admin(self, component: str) -> str:
        url = self._declared_admin_urls().get(component)
        if url is None:
            raise Invalid(
                f"unknown component {component!r}: known are {', '.join(self.components) or 'none'} "
                "(KINSHASA_GATEWAY_ADMIN_URLS)",
                [("component", "unknown")],
            )
        if not self._token:
            raise BackendUnavailable("no internal token to call admin endpoints with", backend=component)
        return url

    async def dlq(self, component: str, limit: int, timeout_s: float | None = None) -> dict[str, Any]:
        url = self._admin(component)
        result = await self._get(
            component,
            f"{url}/admin/dlq",
            {"limit": limit},
            {"Authorization": f"Bearer {self._token}"},
            allow_404=False,
            timeout_s=timeout_s,
        )
        if not isinstance(result, dict):
            raise BackendUnavailable(f"{component} answered a DLQ that is not an object", backend=component)
        return dict(result)

    async def outbox(self, component: str, timeout_s: float | None = None) -> Any:
        """The component's `GET /admin/outbox`: its outbox backlog and DLQ size, as it answered."""
        url = self._admin(component)
        return await self._get(
            component,
            f"{url}/admin/outbox",
            headers={"Authorization": f"Bearer {self._token}"},
            allow_404=False,
            timeout_s=timeout_s,
        )

    async def receipts(self, component: str, timeout_s: float | None = None) -> Any:
        """The component's `GET /admin/receipts/verify`; None when it keeps no receipt chain (404)."""
        url = self._admin(component)
        return await self._get(component, f"{url}/admin/receipts/verify",
                               headers={"Authorization": f"Bearer {self._token}"}, timeout_s=timeout_s)

    async def dlq_all(
        self, limit: int, timeout_s: float | None = None, only: str | None = None
    ) -> list[dict[str, Any]]:
        """Every component's DLQ (or `only` that one's); one that does not answer shows its error instead of
        failing the query. An `only` this gateway does not know is VALIDATION, naming the known ones."""
        if only is not None:
            self._admin(only)

        async def one(component: str) -> dict[str, Any]:
            try:
                return {"component": component, **(await self.dlq(component, limit, timeout_s))}
            except BackendUnavailable as exc:
                return {"component": component, "count": None, "entries": [], "error": exc.message}

        return list(await asyncio.gather(*(one(c) for c in (self.components if only is None else [only]))))

    async def reprocess(self, component: str, message_ids: list[str]) -> dict[str, Any]:
        url = self._admin(component)
        try:
            response = await self._client.post(
                f"{url}/admin/dlq/reprocess",
                json={"message_ids": message_ids},
                headers={"Authorization": f"Bearer {self._token}"},
            )
        except httpx.HTTPError as exc:
            log.warning("%s did not answer at %s: %r", component, url, exc)
            raise BackendUnavailable(
                f"{component} did not answer ({type(exc).__name__})", backend=component
            ) from exc
        if response.status_code >= 400:
            # Its answer stays in the log: a component's error text may say where it lives.
            log.warning("%s refused a reprocess at %s (%d): %s", component, url, response.status_code,
                        response.text[:300])
            raise BackendUnavailable(
                f"{component} refused the reprocess request ({response.status_code}): check the message ids "
                "with the dlq query; an operator finds its reason in the gateway's log",
                backend=component,
                status=response.status_code,
            )
        try:
            return dict(response.json())
        except ValueError as exc:
            raise BackendUnavailable(
                f"{component} answered something that is not JSON", backend=component
            ) from exc


def _steps_page(page: Any) -> StepsPage:
    """One run's page of a `POST /steps` answer; a run the ledger has not seen has no steps yet."""
    if not isinstance(page, dict) or page.get("missing"):
        return StepsPage([], None)
    next_before = page.get("next_before")
    steps = page.get("steps")
    return StepsPage(
        list(steps) if isinstance(steps, list) else [],
        next_before if isinstance(next_before, int) and not isinstance(next_before, bool) else None,
    )


def _progress(answer: Any) -> RevertProgress:
    if not isinstance(answer, dict) or answer.get("missing"):
        return RevertProgress()

    def count(name: str) -> int:
        value = answer.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

    return RevertProgress(count("total"), count("compensated"), count("failing"), count("pending"))
