"""A run as a Python object: `run.rename_document(...)` per catalogued operation, and its lifecycle."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from kinshasa.client.acknowledgements import Receipt
from kinshasa.client.errors import RunClosed, UnknownOperation, Validation
from kinshasa.client.operations import Operation, find

if TYPE_CHECKING:
    from kinshasa.client.client import Kinshasa

log = logging.getLogger(__name__)


class Run:
    """One run of the agent: `id`, the generic `call`, and one method per operation of the catalogue
    as it was read (`await run.rename_document(document_id, title="Q4")`): the target entity's id is
    the first positional argument, every other field a keyword."""

    def __init__(self, client: Kinshasa, run_id: str) -> None:
        self.client = client
        self.id = run_id

    def __repr__(self) -> str:
        return f"Run({self.id!r})"

    async def call(self, operation: str, idempotency_key: str | None = None, **fields: Any) -> Receipt:
        """Any operation by name, with its snake_case payload fields: for a service registered after
        the catalogue was read, or a name chosen at run time."""
        return await self.client.call(self.id, operation, fields, idempotency_key=idempotency_key)

    async def finish(self) -> dict[str, Any]:
        return await self.client.finish_run(self.id)

    async def get(self) -> dict[str, Any]:
        """The run as the gateway knows it now: status, breaker, counts."""
        return await self.client.get_run(self.id)

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Receipt]]:
        if name.startswith("_"):
            raise AttributeError(name)
        known = self.client.cached_operations
        if known is None:
            raise AttributeError(
                f"{name}: the operation catalogue has not been read; await client.operations() first, or "
                "use run.call(operation, **fields)"
            )
        try:
            op = find(known, name)
        except UnknownOperation:
            raise AttributeError(
                f"no operation {name!r} in the catalogue (read when the run started); for a service "
                f"registered since, use run.call({name!r}, **fields)"
            ) from None
        return bound_method(self, op)

    def __dir__(self) -> list[str]:
        names = set(super().__dir__())
        names.update(op.method_name for op in self.client.cached_operations or [])
        return sorted(names)


def bound_method(run: Run, op: Operation) -> Callable[..., Awaitable[Receipt]]:
    """`run.<op.method_name>`: the entity id positional (for non-create operations), fields by keyword."""
    id_field = None if op.creates else op.entity_id_field

    async def method(*args: Any, idempotency_key: str | None = None, **fields: Any) -> Receipt:
        if len(args) > (1 if id_field else 0):
            takes = f"one positional argument ({id_field})" if id_field else "no positional argument"
            raise TypeError(f"{op.method_name}() takes {takes}; pass the other fields by keyword")
        if args:
            assert id_field is not None
            if id_field in fields:
                raise Validation(
                    "VALIDATION",
                    f"{op.method_name}() got {id_field} both as the first argument and by keyword",
                    {"code": "VALIDATION", "fields": [{"path": id_field, "message": "given twice"}],
                     "clientSide": True},
                )
            fields[id_field] = args[0]
        return await run.client.call(run.id, op.operation, fields, idempotency_key=idempotency_key)

    method.__name__ = method.__qualname__ = op.method_name
    method.__doc__ = op.describe()
    method.__signature__ = _signature(op, id_field)  # type: ignore[attr-defined]
    return method


def _signature(op: Operation, id_field: str | None) -> inspect.Signature:
    params: list[inspect.Parameter] = []
    if id_field:
        params.append(inspect.Parameter(id_field, inspect.Parameter.POSITIONAL_OR_KEYWORD))
    for name in op.properties:
        if name == id_field or not name.isidentifier():
            continue
        default = inspect.Parameter.empty if name in op.required else None
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default))
    params.append(inspect.Parameter("idempotency_key", inspect.Parameter.KEYWORD_ONLY, default=None))
    return inspect.Signature(params)


class RunScope:
    """`async with client.run(entry_point, purpose=...) as run:`: start on entry, finish on a clean exit.

    An exception in the block leaves the run RUNNING on purpose: the SDK cannot tell a crash an
    operator should look at from one the agent will recover from, and a finished run cannot be
    written to again. It logs a warning naming the run and re-raises. If the run was closed meanwhile
    (its breaker tripped and the agent caught BreakerOpen), the clean exit logs that instead.

    With `owns_client` (the client was made for this block alone: `Kinshasa(url, key).run(...)`), the
    scope closes the client when it ends, whichever way it ends, including a failed start.
    """

    def __init__(self, client: Kinshasa, entry_point: str, purpose: str | None, *,
                 owns_client: bool = False) -> None:
        self.client = client
        self.entry_point = entry_point
        self.purpose = purpose
        self.owns_client = owns_client
        self.run: Run | None = None
        self.finished: dict[str, Any] | None = None

    async def __aenter__(self) -> Run:
        try:
            await self.client.operations()
            run_id = await self.client.start_run(self.entry_point, self.purpose)
        except BaseException:
            # __aexit__ is not called when entering fails: close an owned client here.
            await self._release()
            raise
        self.run = Run(self.client, run_id)
        return self.run

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self._end(exc)
        finally:
            await self._release()

    async def _release(self) -> None:
        if self.owns_client:
            await self.client.aclose()

    async def _end(self, exc: BaseException | None) -> None:
        assert self.run is not None
        if exc is not None:
            log.warning(
                "run %s (%s) left open: the block raised %s: %s; finish it with finishRun once "
                "done, or an operator can revert it",
                self.run.id, self.entry_point, type(exc).__name__, exc,
            )
            return
        try:
            self.finished = await self.client.finish_run(self.run.id)
        except RunClosed as closed:
            log.warning("run %s was not finished: it is already closed (%s)", self.run.id, closed.message)
