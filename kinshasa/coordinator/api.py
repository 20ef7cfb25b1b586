"""The coordinator's HTTP API for the gateway: run summaries, steps newest first, run search, revert progress.

Read-only: a revert starts only at the gateway's doorbell (`revertRun`, `revertRuns`, a trip with
auto-revert), which records `run.revert_requested`; the coordinator acts on that fact, never on a request
made here, so no revert can start that the gateway does not know of.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from temporalio.client import Client
from temporalio.service import RPCError

from kinshasa.coordinator.run_ledger import CursorError, Ledger
from kinshasa.coordinator.workflows import revert_workflow_id
from kinshasa.schemas.run_status import RunStatus

MAX_PAGE = 1000
# Runs per `POST /steps`.
MAX_BATCH = 200


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class StepsRequest(BaseModel):
    """One run's page in `POST /steps`, as `GET /runs/{run_id}/steps` takes it."""

    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(min_length=1, max_length=256)
    limit: int = Field(default=100, ge=1, le=MAX_PAGE)
    before: int | None = Field(default=None, ge=1)


class StepsBatchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    runs: list[StepsRequest] = Field(min_length=1, max_length=MAX_BATCH)


class ProgressBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_ids: list[str] = Field(min_length=1, max_length=MAX_BATCH)


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status)


def ledger_router(ledger: Ledger, *, client: Client | None = None) -> APIRouter:
    """Reads, open to the network the coordinator binds to; `client` answers a run's revert progress."""
    router = APIRouter()

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

    @router.post("/steps")
    async def runs_steps(body: StepsBatchBody) -> dict[str, Any]:
        """The pages of many runs at once (the gateway's `runs { nodes { steps } }`), in the order asked;
        a run the ledger has not seen gets `missing: true` where `GET /runs/{id}/steps` answers 404."""
        found = await ledger.steps_pages([(r.run_id, r.limit, r.before) for r in body.runs])
        return {"pages": [
            {"run_id": r.run_id, "missing": True} if page is None
            else {"run_id": r.run_id, "steps": page[0], "next_before": page[1]}
            for r, page in zip(body.runs, found, strict=True)]}

    @router.post("/progress")
    async def runs_progress(body: ProgressBody) -> dict[str, Any]:
        """Where each run's steps stand on the way back (the gateway's `Run.revertProgress`), in the order
        asked: `total` steps to compensate (egress is never compensated), how many are `compensated`,
        refused (`failing`) and not settled yet (`pending`); `missing: true` for a run not seen yet."""
        found = await ledger.counts_many(body.run_ids)
        return {"runs": [
            {"run_id": run_id, "missing": True} if counts is None else {
                "run_id": run_id,
                "total": counts.steps - counts.irreversible,
                "compensated": counts.compensated,
                "failing": counts.compensation_failed,
                "pending": counts.applied + counts.compensating,
            }
            for run_id, counts in zip(body.run_ids, found, strict=True)]}

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
