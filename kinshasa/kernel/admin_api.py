"""Each component's internal admin endpoint: health, DLQ inspect/reprocess and Prometheus metrics.

Routes:

* `GET /healthz` - open, so a process supervisor or load balancer needs no secret. It says only
  whether each named check passes (200) or not (503), never any data.
* `GET /admin/dlq?limit=N`, `POST /admin/dlq/reprocess` - need `Authorization: Bearer <token>`.
* `GET /admin/outbox` - same token: `{component, pending, oldest_pending_age_s, dead, dlq_count}`, the
  outbox rows not yet published, the age of the oldest of them (null when none), the rows whose
  publish attempts ran out, and the DLQ's size. The gateway aggregates it (`outboxStatus`) and alerts
  on it (`dlq_threshold`).
* `GET /admin/receipts/verify` - same token: `{component, length, verified, problems, ...}`, the
  component's receipt chain walked and its source linkage checked (`kinshasa.kernel.receipts`); 404
  NO_RECEIPT_CHAIN when it keeps none. The gateway asks it for the operator query `receipts`.
* `GET /metrics` - needs the same bearer token. Metrics name topics, groups and DLQ sizes, and the
  admin port may be reachable beyond loopback in a deployment, so they are not served openly.
  Prometheus sends the token with a scrape config like::

      - job_name: kinshasa-documents
        authorization: {type: Bearer, credentials_file: /path/to/.kinshasa/internal-token}
        static_configs: [{targets: ["127.0.0.1:8021"]}]

  Every metric, its labels (bounded: never a run, agent or entity id) and what a scrape costs are listed
  in docs/operations.md; deploy/grafana/kinshasa-dashboard.json charts them.

The token is the stack's internal token (`load_or_create_internal_token`): configured, or generated
once into `<data_dir>/internal-token` with mode 0600 and shared by the gateway (which calls these
endpoints for the operator's `dlq` / `reprocessDlq`) and every component.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
import stat
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from kinshasa.kernel.dlq import INSPECT_MAX, DlqError, ReprocessOutcome
from kinshasa.kernel.metrics import CONTENT_TYPE, ComponentMetrics
from kinshasa.kernel.outbox import OutboxBacklog, OutboxStatus
from kinshasa.kernel.receipts import ChainReport, ChainVerifier, NoChainError

logger = logging.getLogger(__name__)

TOKEN_FILE = "internal-token"
# A check that hangs must not hang the probe: the supervisor would kill a healthy process.
HEALTH_CHECK_TIMEOUT_S = 5.0
REPROCESS_MAX = 1000

HealthCheck = Callable[[], Awaitable[object]]


class CheckFailed(Exception):
    """Raised by a health check whose message says it all (`/healthz` shows it without the type name)."""


class DlqEntryView(Protocol):
    def to_json(self) -> dict[str, Any]: ...


class DlqApi(Protocol):
    """The component-level DLQ API (`kinshasa.kernel.dlq.DeadLetterQueue` implements it)."""

    async def dlq_count(self) -> int: ...
    async def dlq_inspect(self, limit: int = 50) -> Sequence[DlqEntryView]: ...
    async def dlq_reprocess(self, message_ids: Sequence[str]) -> list[ReprocessOutcome]: ...


class OutboxStatusApi(Protocol):
    """The component's outbox numbers (`kinshasa.kernel.outbox.OutboxStatus` implements it)."""

    async def backlog(self) -> OutboxBacklog: ...


class ReceiptsApi(Protocol):
    """The component's receipt chain check (`kinshasa.kernel.receipts.ChainVerifier` implements it)."""

    async def verify(self) -> ChainReport: ...


class AdminError(Exception):
    """An admin request refused with an HTTP status, a stable code and a message saying what to do."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="kinshasa-admin"'} if status == 401 else None
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status,
                        headers=headers)


class ReprocessRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message_ids: list[str] = Field(min_length=1, max_length=REPROCESS_MAX,
                                   description="message ids as listed by GET /admin/dlq")


def _bearer_guard(token: str) -> Callable[[Request], Awaitable[None]]:
    expected = token.encode("utf-8")

    async def require_token(request: Request) -> None:
        header = request.headers.get("authorization")
        if not header:
            raise AdminError(401, "UNAUTHENTICATED",
                             "missing Authorization header: send 'Authorization: Bearer <token>' with the "
                             "internal token from <data_dir>/internal-token or KINSHASA_INTERNAL_TOKEN")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise AdminError(401, "UNAUTHENTICATED",
                             "malformed Authorization header: use 'Authorization: Bearer <token>'")
        # Constant-time comparison: response timing must not leak how much of a guess was right.
        if not hmac.compare_digest(presented.strip().encode("utf-8"), expected):
            raise AdminError(403, "FORBIDDEN",
                             "the bearer token is not this stack's internal token: use the token in "
                             "<data_dir>/internal-token of the stack this component belongs to")

    return require_token


async def _run_check(check: HealthCheck) -> str | None:
    """None when the check passes, else why it failed."""
    try:
        result = await asyncio.wait_for(check(), HEALTH_CHECK_TIMEOUT_S)
    except TimeoutError:
        return f"timed out after {HEALTH_CHECK_TIMEOUT_S:.0f}s"
    except CheckFailed as exc:
        return str(exc)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "check returned false" if result is False else None


def admin_app(component: str, *, token: str, dlq_api: DlqApi, metrics: ComponentMetrics,
              health_checks: Mapping[str, HealthCheck] | None = None,
              outbox: OutboxStatusApi | None = None, receipts: ReceiptsApi | None = None) -> FastAPI:
    """The admin FastAPI app of one component; mount or serve it on the component's admin port.

    Without `outbox`, `GET /admin/outbox` answers 404 NO_OUTBOX (every Kinshasa component has one).
    Without `receipts`, the chain is checked in the outbox's database, with no component-specific
    source check: a component's receipts commit with its outbox rows, so they live side by side.
    """
    if receipts is None and isinstance(outbox, OutboxStatus):
        receipts = ChainVerifier(outbox.engine, component)
    if not token or not token.strip():
        raise ValueError("the admin token is empty: pass load_or_create_internal_token(data_dir) or a "
                         "configured internal token")
    checks = dict(health_checks or {})
    app = FastAPI(title=f"kinshasa {component} admin", docs_url=None, redoc_url=None, openapi_url=None)
    protected = [Depends(_bearer_guard(token))]

    @app.exception_handler(AdminError)
    async def _admin_error(_request: Request, exc: AdminError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [{"field": ".".join(str(p) for p in err.get("loc", ())), "problem": err.get("msg", "")}
                    for err in exc.errors()]
        return _error(422, "VALIDATION", "the request is not valid: fix the fields listed in 'problems'",
                      problems=problems)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        results = await asyncio.gather(*(_run_check(check) for check in checks.values()))
        failures = {name: why for name, why in zip(checks, results, strict=True) if why is not None}
        for name, why in failures.items():
            logger.warning("health check %s failed: %s", name, why)
        body = {"component": component, "status": "degraded" if failures else "ok",
                "checks": {name: ("ok" if name not in failures else f"failed: {failures[name]}")
                           for name in checks}}
        return JSONResponse(body, status_code=503 if failures else 200)

    @app.get("/admin/dlq", dependencies=protected)
    async def dlq(limit: int = Query(50, ge=1, le=INSPECT_MAX)) -> dict[str, Any]:
        count = await dlq_api.dlq_count()
        entries = await dlq_api.dlq_inspect(limit)
        return {"component": component, "count": count, "entries": [entry.to_json() for entry in entries]}

    @app.post("/admin/dlq/reprocess", dependencies=protected)
    async def reprocess(body: ReprocessRequest) -> dict[str, Any]:
        try:
            outcomes = await dlq_api.dlq_reprocess(body.message_ids)
        except DlqError as exc:
            raise AdminError(409, "DLQ_UNAVAILABLE", str(exc)) from exc
        return {"component": component, "results": [outcome.to_json() for outcome in outcomes],
                "count": await dlq_api.dlq_count()}

    @app.get("/admin/outbox", dependencies=protected)
    async def outbox_status() -> dict[str, Any]:
        if outbox is None:
            raise AdminError(404, "NO_OUTBOX", f"{component} serves no outbox status: pass "
                             "outbox=OutboxStatus(engine) to admin_app")
        backlog = await outbox.backlog()
        return {"component": component, "pending": backlog.pending,
                "oldest_pending_age_s": backlog.oldest_age_s, "dead": backlog.dead,
                "dlq_count": await dlq_api.dlq_count()}

    @app.get("/admin/receipts/verify", dependencies=protected)
    async def receipts_verify() -> dict[str, Any]:
        try:
            if receipts is None:
                raise NoChainError(f"{component} serves no receipt check")
            return (await receipts.verify()).to_json()
        except NoChainError as exc:
            raise AdminError(404, "NO_RECEIPT_CHAIN", str(exc)) from exc

    @app.get("/metrics", dependencies=protected)
    async def prometheus() -> Response:
        try:
            metrics.set_dlq_size(await dlq_api.dlq_count())
        except Exception:
            # The rest of the metrics are still worth serving; the stale gauge is logged.
            logger.exception("could not read the DLQ size for /metrics")
        return Response(await metrics.render(), media_type=CONTENT_TYPE)

    return app


def load_or_create_internal_token(data_dir: Path, configured: str | None = None,
                                  file: Path | None = None) -> str:
    """The stack's internal token: `configured` if given, else the contents of `file` (a mounted secret)
    if given, else `<data_dir>/internal-token`, created once.

    A new token is written with mode 0600 from the start (never world-readable, not even briefly),
    and exclusive creation makes two components starting together agree on one token.
    """
    if configured is not None and configured.strip():
        return configured.strip()
    if file is not None:
        token = Path(file).read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"the internal token file {file} is empty: put the shared token in it")
        return token
    path = Path(data_dir) / TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_token(path)
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(token + "\n")
    return token


def _read_token(path: Path) -> str:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        # Tighten rather than refuse: the file is ours and the fix is unambiguous; say so in the logs.
        logger.warning("%s was readable by others (mode %o); setting it to 0600", path, mode)
        path.chmod(0o600)
    for _ in range(50):
        token = path.read_text(encoding="utf-8").strip()
        if token:
            return token
        # Another process created the file an instant ago and has not written the token yet.
        time.sleep(0.02)
    raise ValueError(f"{path} is empty: delete it to have a new internal token generated, or write "
                     "the token into it")
