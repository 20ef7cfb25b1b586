"""A service's HTTP read API: `GET /entities/{type}/{id}`, `.../versions` and `?<field>=`, plus extra routes.

Reads go straight to the service's database on a plain connection: current state is a query over
the append-only version rows, so a read never blocks a writer for long and never changes anything.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Path, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncEngine

from kinshasa.services.kit.declarations import ReadModel, Service
from kinshasa.services.kit.fields import ENTITY_ID_MAX


def _not_found(code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=404)


def read_router(service: Service, engine: AsyncEngine) -> APIRouter:
    """The entity routes for every read model the service declared."""
    router = APIRouter()
    models = service.read_models

    def model_for(entity_type: str) -> ReadModel | JSONResponse:
        model = models.get(entity_type)
        if model is None:
            return _not_found("UNKNOWN_ENTITY_TYPE",
                              f"{service.name} has no entities of type {entity_type!r}; "
                              f"it serves: {', '.join(models) or '(none)'}")
        return model

    entity_id_path = Path(..., min_length=1, max_length=ENTITY_ID_MAX)

    @router.get("/entities/{entity_type}")
    async def listed(entity_type: str, request: Request) -> Any:
        """Entities of a type whose declared list field has the given value, e.g. `?run_id=...`."""
        model = model_for(entity_type)
        if isinstance(model, JSONResponse):
            return model
        asked = dict(request.query_params)
        if len(asked) != 1 or next(iter(asked)) not in model.lists:
            return JSONResponse({"error": {"code": "BAD_LIST_FIELD", "message": (
                f"list {entity_type} entities by exactly one of: {', '.join(model.lists) or '(none)'}, "
                f"e.g. /entities/{entity_type}?"
                f"{next(iter(model.lists), 'run_id')}=<value>")}}, status_code=400)
        field, value = next(iter(asked.items()))
        if not value or len(value) > 256:
            return JSONResponse({"error": {"code": "BAD_LIST_VALUE",
                                           "message": f"{field} must be 1-256 characters"}}, status_code=400)
        async with engine.connect() as conn:
            found = await model.lists[field](conn, value)
        return jsonable_encoder(list(found))

    @router.get("/entities/{entity_type}/{entity_id}")
    async def current(entity_type: str, entity_id: str = entity_id_path) -> Any:
        """Current state; 404 if it never existed or was deleted (its history stays readable)."""
        model = model_for(entity_type)
        if isinstance(model, JSONResponse):
            return model
        async with engine.connect() as conn:
            state = await model.current(conn, entity_id)
        if state is None:
            return _not_found("NOT_FOUND",
                              f"no current {entity_type} {entity_id} in {service.name}: check the id; if it "
                              f"was deleted, its history is at /entities/{entity_type}/{entity_id}/versions")
        return jsonable_encoder(state)

    @router.get("/entities/{entity_type}/{entity_id}/versions")
    async def versions(entity_type: str, entity_id: str = entity_id_path) -> Any:
        """Every version of the entity, oldest first; 404 if it never existed."""
        model = model_for(entity_type)
        if isinstance(model, JSONResponse):
            return model
        async with engine.connect() as conn:
            history = [dict(row) for row in await model.versions(conn, entity_id)]
            # Which operation wrote each version, from the service's own record of its steps.
            operations = await service.store.operations_of(
                conn, [str(row["command_id"]) for row in history if row.get("command_id")])
        for row in history:
            row.setdefault("operation", operations.get(str(row.get("command_id"))))
        if not history:
            return _not_found("NOT_FOUND", f"{service.name} has never had a {entity_type} {entity_id}")
        return jsonable_encoder({"entity_type": entity_type, "id": entity_id, "versions": history})

    return router


def mount_reads(app: FastAPI, service: Service, engine: AsyncEngine) -> FastAPI:
    """Add the service's read routes to `app` (the kernel admin app, so one port serves both)."""
    app.include_router(read_router(service, engine))
    for factory in service.routers:
        app.include_router(factory(engine))
    return app
