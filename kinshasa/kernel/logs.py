"""Structured JSON logging for every component, with run, actor and message context on each record.

`configure_logging(component, level)` is called once from a process's bootstrap. Code that handles a
message wraps its work in `log_context(run_id=..., actor=..., message_id=...)`; every record logged
inside it, by any module and any task spawned inside it, carries those fields, because they live in
contextvars (asyncio copies the context into each new task).
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

run_id_var: ContextVar[str | None] = ContextVar("kinshasa_run_id", default=None)
actor_var: ContextVar[str | None] = ContextVar("kinshasa_actor", default=None)
message_id_var: ContextVar[str | None] = ContextVar("kinshasa_message_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged too.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _actor_text(actor: object) -> str | None:
    """An actor as `kind:id`, whether given as text, a mapping or the envelope's Actor model."""
    if actor is None:
        return None
    if isinstance(actor, str):
        return actor
    if isinstance(actor, Mapping):
        kind, ident = actor.get("kind"), actor.get("id")
    else:
        kind, ident = getattr(actor, "kind", None), getattr(actor, "id", None)
    if kind is None and ident is None:
        return str(actor)
    kind = getattr(kind, "value", kind)  # an Enum member logs as its value
    return f"{kind}:{ident}"


@contextmanager
def log_context(*, run_id: object = None, actor: object = None,
                message_id: object = None) -> Iterator[None]:
    """Attach run/actor/message fields to every record logged inside the block.

    Only the fields given are set; the others keep the enclosing block's values, so a handler can
    add a message id inside a run's context.
    """
    tokens = []
    if run_id is not None:
        tokens.append((run_id_var, run_id_var.set(str(run_id))))
    if actor is not None:
        tokens.append((actor_var, actor_var.set(_actor_text(actor))))
    if message_id is not None:
        tokens.append((message_id_var, message_id_var.set(str(message_id))))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def current_context() -> dict[str, str]:
    """The context fields that are set right now (for passing into a thread or an error report)."""
    values = {"run_id": run_id_var.get(), "actor": actor_var.get(), "message_id": message_id_var.get()}
    return {key: value for key, value in values.items() if value is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, component, logger, message, context, extras, error."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "component": self.component,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(current_context())
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_") and key not in entry:
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = {
                "type": record.exc_info[0].__name__,
                "message": str(record.exc_info[1]),
                "traceback": "".join(traceback.format_exception(*record.exc_info)),
            }
        elif record.exc_text:
            entry["error"] = {"traceback": record.exc_text}
        if record.stack_info:
            entry["stack"] = record.stack_info
        # default=str: a stray datetime or UUID in `extra=` must never make logging itself fail.
        return json.dumps(entry, ensure_ascii=False, default=str)


class _KinshasaHandler(logging.StreamHandler[TextIO]):
    """Marker type so reconfiguring replaces our handler and leaves others (pytest's) alone."""


class ConsoleFormatter(logging.Formatter):
    """One short human line per record, for `make run`'s prefixed terminal; the context stays on it."""

    def format(self, record: logging.LogRecord) -> str:
        context = " ".join(f"{k}={v}" for k, v in current_context().items() if v)
        line = f"{record.levelname:<7} {record.getMessage()}"
        if context:
            line = f"{line}  [{context}]"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


def configure_logging(component: str, level: str | int = "INFO", *,
                      stream: TextIO | None = None, fmt: str = "json") -> logging.Handler:
    """Send every log record of this process as JSON lines (or console lines) to stderr (or `stream`).

    Idempotent: calling it again (a test, a reload) swaps the handler instead of doubling output.
    """
    if isinstance(level, str):
        resolved = logging.getLevelName(level.upper())
        if not isinstance(resolved, int):
            raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING, ERROR or CRITICAL")
        level = resolved
    root = logging.getLogger()
    for existing in [h for h in root.handlers if isinstance(h, _KinshasaHandler)]:
        root.removeHandler(existing)
    handler = _KinshasaHandler(stream if stream is not None else sys.stderr)
    if fmt not in ("json", "console"):
        raise ValueError(f"unknown log format {fmt!r}; use 'json' or 'console'")
    handler.setFormatter(JsonFormatter(component) if fmt == "json" else ConsoleFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    # The HTTP client logs every request at INFO; its warnings still come through.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    return handler
