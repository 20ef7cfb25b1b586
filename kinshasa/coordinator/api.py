"""The coordinator's HTTP API for the gateway: run summaries, steps newest first, run search, bulk reverts."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from temporalio.client import Client
from temporalio.service import RPCError

from kinshasa.coordinator.ledger import CursorError, Ledger
from kinshasa.coordinator.models import RevertPolicy, RevertRunsInput, RunSelector
from kinshasa.coordinator.starter import BULK_PREFIX, bulk_workflow_id, start_bulk_revert
from kinshasa.coordinator.store import RunStatus
from kinshasa.coordinator.workflows import revert_workflow_id

MAX_PAGE = 1000


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class BulkRevertBody(BaseModel):
    """`POST /reverts`: revert every run a selector covers."""

    model_config = ConfigDict(extra="forbid")

    selector: RunSelector
    reason: str = Field(min_length=1, max_length=2000)
    requested_by: str = Field(default="operator", min_length=1, max_length=256)
    max_concurrency: int = Field(default=8, ge=1, le=256)
    bulk_id: str | None = Field(default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status)


def _token_guard(token: str | None) -> Callable[[Request], Awaitable[None]]:
    async def guard(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise ApiError(401, "UNAUTHENTICATED", "send `Authorization: Bearer <internal token>`; "
                           "the token is in <data_dir>/internal-token")
        if not hmac.compare_digest(presented.strip().encode(), token.encode()):
            raise ApiError(403, "FORBIDDEN", "the bearer token is not this stack's internal token")
    return guard


def ledger_router(ledger: Ledger, *, client: Client | None = None, task_queue: str | None = None,
                  token: str | None = None, policy: RevertPolicy | None = None) -> APIRouter:
    """Reads are open to the network the coordinator binds to; starting a bulk revert needs the token."""
    router = APIRouter()
    protected = [Depends(_token_guard(token))]

    @router.get("/runs/{run_id}")
    async def run_summary(run_id: str) -> dict[str, Any]:
        summary = await ledger.summary(run_id)
        if summary is None:
            raise ApiError(404, "RUN_NOT_FOUND", f"the ledger has no run {run_id}: check the id, or wait for "
                           "its first event to be projected")
        body = summary.to_json()
        body["facts"] = await ledger.run_facts(run_id)
        body["rejections"] = await ledger.rejections(run_id)
        return body

    @router.get("/runs/{run_id}/steps")
    async def run_steps(run_id: str, limit: int = Query(100, ge=1, le=MAX_PAGE),
                        before: int | None = Query(None, ge=1)) -> dict[str, Any]:
        if await ledger.status(run_id) is None:
            raise ApiError(404, "RUN_NOT_FOUND", f"the ledger has no run {run_id}")
        page, next_before = await ledger.steps_page(run_id, limit, before)
        return {"run_id": run_id, "steps": page, "next_before": next_before}

    @router.get("/runs")
    async def search_runs(agent_id: str | None = None, entry_point: str | None = None,
                          status: RunStatus | None = None, started_after: datetime | None = None,
                          started_before: datetime | None = None, limit: int = Query(50, ge=1, le=MAX_PAGE),
                          after: str | None = None) -> dict[str, Any]:
        for name, value in (("started_after", started_after), ("started_before", started_before)):
            if value is not None and value.tzinfo is None:
                raise ApiError(422, "VALIDATION", f"{name} has no timezone: send UTC with an offset, "
                               "e.g. 2024-05-01T12:00:00Z")
        try:
            found, cursor = await ledger.search_runs(
                agent_id=agent_id, entry_point=entry_point, status=status.value if status else None,
                started_after=started_after, started_before=started_before, limit=limit, after=after)
        except CursorError as exc:
            raise ApiError(422, "VALIDATION", str(exc)) from exc
        return {"runs": [s.to_json() for s in found], "next": cursor}

    @router.get("/runs/{run_id}/revert")
    async def revert_progress(run_id: str) -> dict[str, Any]:
        if client is None:
            raise ApiError(503, "UNAVAILABLE", "this coordinator has no Temporal client")
        handle = client.get_workflow_handle(revert_workflow_id(run_id))
        try:
            description = await handle.describe()
            progress = await handle.query("progress")
        except RPCError as exc:
            raise ApiError(404, "REVERT_NOT_FOUND",
                           f"no revert of run {run_id} is known to Temporal: {exc}") from exc
        return {"run_id": run_id, "workflow_id": handle.id, "workflow_status": description.status.name
                if description.status else None, "progress": progress}

    @router.post("/reverts", dependencies=protected, status_code=202)
    async def bulk_revert(body: BulkRevertBody) -> dict[str, Any]:
        if client is None or task_queue is None:
            raise ApiError(503, "UNAVAILABLE", "this coordinator has no Temporal client to start the revert")
        params = RevertRunsInput(selector=body.selector, reason=body.reason, requested_by=body.requested_by,
                                 max_concurrency=body.max_concurrency, policy=policy or RevertPolicy())
        handle = await start_bulk_revert(client, task_queue, params, body.bulk_id)
        return {"workflow_id": handle.id, "bulk_id": handle.id.removeprefix(BULK_PREFIX)}

    @router.get("/reverts/{bulk_id}")
    async def bulk_progress(bulk_id: str) -> dict[str, Any]:
        if client is None:
            raise ApiError(503, "UNAVAILABLE", "this coordinator has no Temporal client")
        handle = client.get_workflow_handle(bulk_workflow_id(bulk_id))
        try:
            progress = await handle.query("progress")
        except RPCError as exc:
            raise ApiError(404, "REVERT_NOT_FOUND", f"no bulk revert {bulk_id}: {exc}") from exc
        return {"bulk_id": bulk_id, "progress": progress}

    return router


def install_error_handlers(app: FastAPI) -> None:
    """Bad input gets a 4xx with a code and a next step, never a 500."""

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [{"field": ".".join(str(p) for p in err.get("loc", ())), "problem": err.get("msg", "")}
                    for err in exc.errors()]
        return _error(422, "VALIDATION", "the request is not valid: fix the fields listed in 'problems'",
                      problems=problems)

    @app.exception_handler(ValidationError)
    async def _model_validation(_request: Request, exc: ValidationError) -> JSONResponse:
        problems = [{"field": ".".join(str(p) for p in err.get("loc", ())), "problem": err.get("msg", "")}
                    for err in exc.errors()]
        return _error(422, "VALIDATION", "the request is not valid", problems=problems)


def ledger_app(ledger: Ledger, **kwargs: Any) -> FastAPI:
    """A standalone app with only the ledger API (the process adds the kernel admin endpoints)."""
    app = FastAPI(title="kinshasa coordinator", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.include_router(ledger_router(ledger, **kwargs))
    return app
