"""Hostile-request defences: size, depth, alias and token limits, no introspection in production, caches.

Every limit here acts during parsing or validation, or before the body reaches Strawberry at all,
so a hostile document is refused before any resolver runs and can never produce a command.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from graphql.validation import NoSchemaIntrospectionCustomRule
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from strawberry.extensions import (
    AddValidationRules,
    MaxAliasesLimiter,
    MaxTokensLimiter,
    ParserCache,
    QueryDepthLimiter,
    SchemaExtension,
    ValidationCache,
)

from kinshasa.gateway.errors import VALIDATION
from kinshasa.gateway.settings import GatewayConfig

log = logging.getLogger(__name__)


ExtensionFactory = Callable[[], SchemaExtension]


def schema_extensions(settings: GatewayConfig) -> list[ExtensionFactory]:
    """Factories, so each request gets fresh extension instances (Strawberry's supported form).

    The limiters' validation rules are built once and shared: the validation cache is keyed by the
    rule classes, so rules rebuilt per request would never hit it and every request would pay for
    a full validation.
    """
    rules = [
        *QueryDepthLimiter(max_depth=settings.max_depth).validation_rules,
        *MaxAliasesLimiter(max_alias_count=settings.max_aliases).validation_rules,
    ]
    if not settings.dev_mode:
        rules.append(NoSchemaIntrospectionCustomRule)
    max_tokens = settings.max_tokens
    return [
        # Tokens are limited while parsing, so a huge document is cut off before it is even built.
        lambda: MaxTokensLimiter(max_token_count=max_tokens),
        lambda: AddValidationRules(rules),
        # Agents send the same few documents over and over: parse and validate each once (Strawberry keeps
        # these LRU caches process-wide, keyed by size, so a fresh instance per request still hits them).
        lambda: ParserCache(maxsize=1024),
        lambda: ValidationCache(maxsize=1024),
    ]


def error_body(message: str, code: str = VALIDATION, **extra: Any) -> bytes:
    return json.dumps(
        {"data": None, "errors": [{"message": message, "extensions": {"code": code, **extra}}]}
    ).encode()


class RequestGuard:
    """Refuse bodies over `limit` bytes (413) and give every refusal of /graphql GraphQL's JSON shape.

    Strawberry answers malformed JSON or a batch with a plain-text 400; clients parsing `errors`
    deserve the same shape and a stable code for those too.
    """

    def __init__(self, app: ASGIApp, limit: int, graphql_path: str = "/graphql") -> None:
        self.app = app
        self.limit = limit
        self.graphql_path = graphql_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = True
                if too_big:
                    await self._refuse(send)
                    return
        received = 0
        refused = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    refused = True
                    raise _TooLarge()
            return message

        rewriting: dict[str, Any] = {}

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = dict(message.get("headers", []))
                if (
                    scope.get("path", "").startswith(self.graphql_path)
                    and 400 <= message["status"] < 500
                    and headers.get(b"content-type", b"").startswith(b"text/plain")
                ):
                    rewriting["status"] = message["status"]
                    rewriting["body"] = b""
                    return
            if rewriting and message["type"] == "http.response.body":
                rewriting["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                text = rewriting["body"].decode("utf-8", "replace")[:500] or "bad request"
                await _send_json(send, rewriting["status"], error_body(text))
                return
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)
        except Exception:
            if refused and not started:
                await self._refuse(send)
            else:
                raise

    async def _refuse(self, send: Send) -> None:
        body = error_body(
            f"request body is larger than {self.limit} bytes: send a smaller document", maxBytes=self.limit
        )
        await _send_json(send, 413, body)


async def _send_json(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass
