"""SyncKinshasa: the async client for code without an event loop, run on a loop of its own.

One daemon thread per SyncKinshasa runs an event loop; each call submits the async client's coroutine
to it and blocks on the answer. The async client stays the one implementation (retries, errors,
receipts), and a sync caller inside a thread pool or a notebook with a running loop works the same:
the calls never touch the caller's loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Mapping
from types import TracebackType
from typing import Any, TypeVar

import httpx

from kinshasa.client.acknowledgements import Receipt
from kinshasa.client.client import Kinshasa
from kinshasa.client.operations import Operation
from kinshasa.client.retries import Backoff
from kinshasa.client.runs import Run, RunScope

T = TypeVar("T")


class SyncReceipt:
    """A Receipt (every field readable as an attribute) whose `applied()` blocks."""

    def __init__(self, receipt: Receipt, portal: _Portal) -> None:
        self.receipt = receipt
        self._portal = portal

    def __getattr__(self, name: str) -> Any:
        return getattr(self.receipt, name)

    def __repr__(self) -> str:
        return f"Sync{self.receipt!r}"

    def applied(self, timeout: float = 30.0) -> SyncReceipt:
        return SyncReceipt(self._portal.run(self.receipt.applied(timeout)), self._portal)

    def refresh(self) -> SyncReceipt:
        return SyncReceipt(self._portal.run(self.receipt.refresh()), self._portal)


class _Portal:
    """An event loop on its own thread, and a way to run a coroutine on it from any other thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="kinshasa-client", daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            coroutine.close()
            raise RuntimeError("a SyncKinshasa call from inside its own loop would wait forever")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class SyncRun:
    """The blocking twin of Run: `run.rename_document(doc_id, title=...)` returns a SyncReceipt."""

    def __init__(self, run: Run, portal: _Portal) -> None:
        self._run = run
        self._portal = portal
        self.id = run.id

    def __repr__(self) -> str:
        return f"SyncRun({self.id!r})"

    def call(self, operation: str, idempotency_key: str | None = None, **fields: Any) -> SyncReceipt:
        receipt = self._portal.run(self._run.call(operation, idempotency_key=idempotency_key, **fields))
        return SyncReceipt(receipt, self._portal)

    def finish(self) -> dict[str, Any]:
        return self._portal.run(self._run.finish())

    def get(self) -> dict[str, Any]:
        return self._portal.run(self._run.get())

    def __getattr__(self, name: str) -> Callable[..., SyncReceipt]:
        if name.startswith("_"):
            raise AttributeError(name)
        method = getattr(self._run, name)

        def blocking(*args: Any, **fields: Any) -> SyncReceipt:
            return SyncReceipt(self._portal.run(method(*args, **fields)), self._portal)

        blocking.__name__ = name
        blocking.__doc__ = method.__doc__
        blocking.__signature__ = getattr(method, "__signature__", None)  # type: ignore[attr-defined]
        return blocking

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(dir(self._run)))


class SyncRunScope:
    """`with client.run(entry_point, purpose=...) as run:`, with RunScope's rules."""

    def __init__(self, scope: RunScope, portal: _Portal) -> None:
        self._scope = scope
        self._portal = portal

    def __enter__(self) -> SyncRun:
        return SyncRun(self._portal.run(self._scope.__aenter__()), self._portal)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._portal.run(self._scope.__aexit__(kind, exc, tb))

    @property
    def finished(self) -> dict[str, Any] | None:
        return self._scope.finished


class SyncKinshasa:
    """Kinshasa with blocking methods, for scripts and frameworks without asyncio.

    Same arguments as Kinshasa (a `transport` must be an httpx.AsyncBaseTransport: the work runs on the
    client's own loop). Close it with `close()` or a `with` block: that stops its thread.
    """

    def __init__(
        self,
        url: str,
        key: str,
        *,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        retry_rate_limited: bool = False,
        backoff: Backoff | None = None,
    ) -> None:
        self._portal = _Portal()

        async def build() -> Kinshasa:
            # Entered: this facade closes the client (close()), so a run scope must not.
            return await Kinshasa(url, key, timeout=timeout, transport=transport,
                                  retry_rate_limited=retry_rate_limited, backoff=backoff).__aenter__()

        self.client = self._portal.run(build())

    def __enter__(self) -> SyncKinshasa:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._portal.loop.is_closed():
            return
        self._portal.run(self.client.aclose())
        self._portal.close()

    def query(self, document: str, variables: Mapping[str, Any] | None = None, *,
              retry: bool | None = None) -> dict[str, Any]:
        return self._portal.run(self.client.query(document, variables, retry=retry))

    def operations(self, refresh: bool = False) -> list[Operation]:
        return self._portal.run(self.client.operations(refresh))

    def start_run(self, entry_point: str, purpose: str | None = None, *,
                  idempotency_key: str | None = None) -> str:
        return self._portal.run(self.client.start_run(entry_point, purpose, idempotency_key=idempotency_key))

    def finish_run(self, run_id: str) -> dict[str, Any]:
        return self._portal.run(self.client.finish_run(run_id))

    def call(self, run_id: str, operation: str, fields: Mapping[str, Any] | None = None, *,
             idempotency_key: str | None = None) -> SyncReceipt:
        call = self.client.call(run_id, operation, fields, idempotency_key=idempotency_key)
        return SyncReceipt(self._portal.run(call), self._portal)

    def command(self, command_id: str) -> SyncReceipt:
        return SyncReceipt(self._portal.run(self.client.command(command_id)), self._portal)

    def get_run(self, run_id: str) -> dict[str, Any]:
        return self._portal.run(self.client.get_run(run_id))

    def commands(self, run_id: str, first: int = 100) -> list[SyncReceipt]:
        return [SyncReceipt(r, self._portal) for r in self._portal.run(self.client.commands(run_id, first))]

    def entity(self, service: str, type: str, id: str) -> dict[str, Any] | None:
        return self._portal.run(self.client.entity(service, type, id))

    def run(self, entry_point: str, purpose: str | None = None) -> SyncRunScope:
        return SyncRunScope(self.client.run(entry_point, purpose), self._portal)

    def attach(self, run_id: str) -> SyncRun:
        return SyncRun(self._portal.run(self.client.attach(run_id)), self._portal)
