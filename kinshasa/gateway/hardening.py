"""Hostile-request defences: size, depth, alias, token and cost limits, fairness, no introspection in
production, caches.

Every limit here acts during parsing or validation, or before the body reaches Strawberry at all,
so a hostile document is refused before any resolver runs and can never produce a command. After
validation, each operation's cost is estimated (kinshasa/gateway/cost.py): over `max_query_cost` it is
QUERY_TOO_COSTLY; otherwise the principal's bucket pays it and the request counts in flight
(kinshasa/gateway/fairness.py) until it has answered, or it is RATE_LIMITED.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from functools import lru_cache
from typing import Any

from graphql import ASTValidationRule, DocumentNode, GraphQLError, GraphQLSchema, parse
from graphql.validation import NoSchemaIntrospectionCustomRule
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from strawberry.extensions import MaxAliasesLimiter, QueryDepthLimiter, SchemaExtension
from strawberry.schema.schema import validate_document
from strawberry.types.graphql import OperationType

from kinshasa.gateway.cost import CostWeights, estimate, size_variables
from kinshasa.gateway.errors import VALIDATION, GatewayError, QueryTooCostly
from kinshasa.gateway.fairness import Fairness
from kinshasa.gateway.settings import GatewayConfig

log = logging.getLogger(__name__)


ExtensionFactory = Callable[[], SchemaExtension]


def document_cache(settings: GatewayConfig) -> DocumentCache:
    """The gateway's parse, validation and cost caches, with its limiters' rules (built once, here)."""
    rules = [
        *QueryDepthLimiter(max_depth=settings.max_depth).validation_rules,
        *MaxAliasesLimiter(max_alias_count=settings.max_aliases).validation_rules,
    ]
    if not settings.dev_mode:
        rules.append(NoSchemaIntrospectionCustomRule)
    return DocumentCache(
        max_tokens=settings.max_tokens, rules=tuple(rules), maxsize=1024, max_cost=settings.max_query_cost
    )


def schema_extensions(
    settings: GatewayConfig, fairness: Fairness | None = None, cache: DocumentCache | None = None
) -> list[ExtensionFactory]:
    """Factories, so each request gets a fresh extension instance (Strawberry's supported form).

    `fairness` outlives the schema (it is rebuilt when the catalogue changes), so the gateway passes its
    own; without one, cost is still limited but no principal is rate limited. So does `cache`, which the
    gateway also reads to send costly reads to its readers (kinshasa/gateway/readers.py).

    One extension does what MaxTokensLimiter, AddValidationRules, ParserCache and ValidationCache
    would do as four: Strawberry sets up every extension's hooks anew on each request, and four of them
    cost the hot path more than the parsing they save.
    """
    documents = cache if cache is not None else document_cache(settings)
    return [lambda: HardenedDocuments(documents, fairness)]


class DocumentCache:
    """Each distinct document is parsed (token-limited) and validated (with the extra rules) once.

    Agents send the same few documents over and over. Both caches are LRU and keyed by the query text,
    which is what the parse depends on; validation also depends on the schema and the rule set, so
    those are part of its key. Keying validation by the text rather than the parsed document (as
    Strawberry's ValidationCache does) matters: hashing a document walks its whole syntax tree.
    A document that fails to parse raises every time, uncached, as it would without the cache.
    The cost depends on the text, the operation and the values of the variables that size lists, so
    those are its key.
    """

    def __init__(
        self,
        max_tokens: int,
        rules: tuple[type[ASTValidationRule], ...],
        maxsize: int,
        max_cost: float = math.inf,
        weights: CostWeights | None = None,
    ) -> None:
        self.max_tokens = max_tokens
        self.rules = rules
        self.max_cost = max_cost
        self.weights = weights or CostWeights()
        self.parse: Callable[[str], DocumentNode] = lru_cache(maxsize=maxsize)(self._parse)
        self.validate: Callable[
            [GraphQLSchema, str, tuple[type[ASTValidationRule], ...]], list[GraphQLError]
        ] = lru_cache(maxsize=maxsize)(self._validate)
        self._size_variables: Callable[[str], tuple[str, ...]] = lru_cache(maxsize=maxsize)(self._sizes)
        self._cost: Callable[[GraphQLSchema, str, str | None, tuple[Any, ...]], float] = lru_cache(
            maxsize=maxsize
        )(self._estimate)

    def _parse(self, query: str) -> DocumentNode:
        # Tokens are limited while parsing, so a huge document is cut off before it is even built.
        return parse(query, max_tokens=self.max_tokens)

    def _validate(
        self, schema: GraphQLSchema, query: str, rules: tuple[type[ASTValidationRule], ...]
    ) -> list[GraphQLError]:
        return validate_document(schema, self.parse(query), rules)

    def cost(
        self,
        schema: GraphQLSchema,
        query: str,
        operation_name: str | None,
        variables: Mapping[str, Any] | None,
    ) -> float:
        """The estimated cost of a parsed and validated operation with these variables."""
        names = self._size_variables(query)
        given = variables or {}
        sizes = tuple(_size(given.get(name)) for name in names)
        return self._cost(schema, query, operation_name, sizes)

    def _sizes(self, query: str) -> tuple[str, ...]:
        return tuple(sorted(size_variables(self.parse(query))))

    def _estimate(
        self, schema: GraphQLSchema, query: str, operation_name: str | None, sizes: tuple[Any, ...]
    ) -> float:
        variables = {n: v for n, v in zip(self._size_variables(query), sizes, strict=True) if v is not None}
        return estimate(schema, self.parse(query), operation_name, variables, self.weights)


def _size(value: Any) -> int | None:
    # Only an integer sizes a list; anything else fails coercion later and costs the field's default.
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class HardenedDocuments(SchemaExtension):
    """Parse with the token limit and validate with the depth, alias (and introspection) rules, cached;
    then refuse an operation over the cost limit, and admit the rest through the principal's fairness."""

    def __init__(self, documents: DocumentCache, fairness: Fairness | None = None) -> None:
        self.documents = documents
        self.fairness = fairness
        self._admitted: str | None = None

    def on_operation(self) -> Iterator[None]:
        try:
            yield
        finally:
            if self._admitted is not None and self.fairness is not None:
                self.fairness.release(self._admitted)
                self._admitted = None

    def on_parse(self) -> Iterator[None]:
        context = self.execution_context
        context.graphql_document = self.documents.parse(context.query or "")
        yield

    def on_validate(self) -> Iterator[None]:
        context = self.execution_context
        errors = self.documents.validate(
            context.schema._schema, context.query or "", context.validation_rules + self.documents.rules
        )
        if not errors:
            try:
                self._admit()
            except GatewayError as refusal:
                errors = [GraphQLError(refusal.message, original_error=refusal)]
        context.pre_execution_errors = errors
        yield

    def _admit(self) -> None:
        context = self.execution_context
        query = context.query or ""
        cost = self.documents.cost(context.schema._schema, query, context.operation_name, context.variables)
        if cost > self.documents.max_cost:
            limit = self.documents.max_cost
            raise QueryTooCostly(
                f"this operation may cost {math.ceil(cost)}, over the limit of {limit:g} per request: ask "
                "for fewer items (a smaller `first`), nest fewer lists, or split it into several requests",
                cost=math.ceil(cost),
                limit=limit,
            )
        principal = getattr(context.context, "principal", None)
        if self.fairness is None or principal is None:
            return
        self.fairness.admit(principal.id, cost)
        if context.operation_type is OperationType.SUBSCRIPTION:
            # Charged like any request, but not counted in flight for as long as an operator watches.
            self.fairness.release(principal.id)
            return
        self._admitted = principal.id


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
