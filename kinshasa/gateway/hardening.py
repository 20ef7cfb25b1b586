"""Hostile-request defences: size, depth, alias and token limits, no introspection in production, caches.

Every limit here acts during parsing or validation, or before the body reaches Strawberry at all,
so a hostile document is refused before any resolver runs and can never produce a command.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

from graphql import ASTValidationRule, DocumentNode, GraphQLError, GraphQLSchema, parse
from graphql.validation import NoSchemaIntrospectionCustomRule
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from strawberry.extensions import MaxAliasesLimiter, QueryDepthLimiter, SchemaExtension
from strawberry.schema.schema import validate_document

from kinshasa.gateway.errors import VALIDATION
from kinshasa.gateway.settings import GatewayConfig

log = logging.getLogger(__name__)


ExtensionFactory = Callable[[], SchemaExtension]


def schema_extensions(settings: GatewayConfig) -> list[ExtensionFactory]:
    """Factories, so each request gets a fresh extension instance (Strawberry's supported form).

    One extension does what MaxTokensLimiter, AddValidationRules, ParserCache and ValidationCache
    would do as four: Strawberry sets up every extension's hooks anew on each request, and four of them
    cost the hot path more than the parsing they save. The limiters' rules are built once, here.
    """
    rules = [
        *QueryDepthLimiter(max_depth=settings.max_depth).validation_rules,
        *MaxAliasesLimiter(max_alias_count=settings.max_aliases).validation_rules,
    ]
    if not settings.dev_mode:
        rules.append(NoSchemaIntrospectionCustomRule)
    documents = DocumentCache(max_tokens=settings.max_tokens, rules=tuple(rules), maxsize=1024)
    return [lambda: HardenedDocuments(documents)]


class DocumentCache:
    """Each distinct document is parsed (token-limited) and validated (with the extra rules) once.

    Agents send the same few documents over and over. Both caches are LRU and keyed by the query text,
    which is what the parse depends on; validation also depends on the schema and the rule set, so
    those are part of its key. Keying validation by the text rather than the parsed document (as
    Strawberry's ValidationCache does) matters: hashing a document walks its whole syntax tree.
    A document that fails to parse raises every time, uncached, as it would without the cache.
    """

    def __init__(self, max_tokens: int, rules: tuple[type[ASTValidationRule], ...], maxsize: int) -> None:
        self.max_tokens = max_tokens
        self.rules = rules
        self.parse: Callable[[str], DocumentNode] = lru_cache(maxsize=maxsize)(self._parse)
        self.validate: Callable[
            [GraphQLSchema, str, tuple[type[ASTValidationRule], ...]], list[GraphQLError]
        ] = lru_cache(maxsize=maxsize)(self._validate)

    def _parse(self, query: str) -> DocumentNode:
        # Tokens are limited while parsing, so a huge document is cut off before it is even built.
        return parse(query, max_tokens=self.max_tokens)

    def _validate(
        self, schema: GraphQLSchema, query: str, rules: tuple[type[ASTValidationRule], ...]
    ) -> list[GraphQLError]:
        return validate_document(schema, self.parse(query), rules)


class HardenedDocuments(SchemaExtension):
    """Parse with the token limit and validate with the depth, alias (and introspection) rules, cached."""

    def __init__(self, documents: DocumentCache) -> None:
        self.documents = documents

    def on_parse(self) -> Iterator[None]:
        context = self.execution_context
        context.graphql_document = self.documents.parse(context.query or "")
        yield

    def on_validate(self) -> Iterator[None]:
        context = self.execution_context
        context.pre_execution_errors = self.documents.validate(
            context.schema._schema, context.query or "", context.validation_rules + self.documents.rules
        )
        yield


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
