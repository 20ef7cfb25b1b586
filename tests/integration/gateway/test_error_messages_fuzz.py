"""Fuzz over the live schema: no error message a caller gets says where a component lives or how code failed.

Every query and mutation field of the gateway's live schema (the generated agent mutations and entity
reads included) is called, once per example, with argument values drawn from hostile strategies (empty,
huge, out-of-range, wrong-typed, injection-shaped), as each kind of principal. The gateway's backends
are all broken in telling ways: a host name that does not resolve, closed ports on 127.0.0.1 and
localhost, and a server that answers 500 or garbage with URLs and a traceback in its body. No error
(message or extensions) may contain a URL, an address or host name, or a stack frame, unless the caller
sent that very text itself. Deterministic (derandomized) and bounded: it runs in well under a minute.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from graphql import (
    GraphQLEnumType,
    GraphQLField,
    GraphQLInputObjectType,
    GraphQLInputType,
    GraphQLList,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLScalarType,
    get_named_type,
    is_leaf_type,
    is_required_argument,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kinshasa.gateway.app import Gateway
from kinshasa.gateway.settings import GatewayConfig
from kinshasa.infra.process import free_port
from kinshasa.settings import StackSettings
from tests.integration.gateway.conftest import AGENT_KEY, OPERATOR_KEY, OTHER_AGENT_KEY, Client, registry

UNRESOLVABLE = "kinshasa-coordinator.invalid"
LEAK = (
    'Traceback (most recent call last):\n  File "/srv/app/read_api.py", line 12, in read\n'
    "ConnectionError: http://10.1.2.3:8080/entities at db.internal.example:5432"
)
KEYS = {
    "agent": AGENT_KEY,
    "scoped agent": OTHER_AGENT_KEY,
    "operator": OPERATOR_KEY,
    "nobody": None,
    "bad key": "not-a-key-" + "z" * 40,
}
FORBIDDEN = [
    re.compile(r"[a-z][a-z0-9+.-]*://[^\s'\"]*", re.IGNORECASE),  # a URL
    re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"),  # an IPv4 address
    re.compile(r"\blocalhost\b|\.invalid\b|\.internal\b", re.IGNORECASE),  # host names we configured
    re.compile(r"Traceback|File \""),  # a stack frame
]
HOSTILE = [
    "",
    " ",
    "\t\n",
    "\x00",
    "a" * 300,
    "x" * 3000,
    "../../etc/passwd",
    "%2e%2e%2f",
    "'; DROP TABLE runs; --",
    "\u202e\U0001f4a5",
    "${jndi:ldap://127.0.0.1/a}",
    "<script>alert(1)</script>",
    "-1",
    "0",
    "null",
    "documents",
    "document",
    "documents:d1",
    "*",
    "http://localhost:1/",
    "gateway",
    "coordinator",
]


async def _answer(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: str, body: bytes
) -> None:
    try:
        await reader.readuntil(b"\r\n\r\n")
        head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        writer.write(head.encode() + body)
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


@dataclass
class Fuzzed:
    client: Client
    gateway: Gateway
    useful: list[str]


@pytest.fixture
async def fuzzed(tmp_path: Path, kafka: Any, examples_catalogue: str) -> AsyncIterator[Fuzzed]:
    leaky = await asyncio.start_server(
        lambda r, w: _answer(r, w, "500 Internal Server Error", LEAK.encode()), "127.0.0.1", 0
    )
    garbage = await asyncio.start_server(
        lambda r, w: _answer(r, w, "200 OK", b"<html>see http://10.1.2.3/ " + LEAK.encode() + b"</html>"),
        "127.0.0.1",
        0,
    )
    leaky_url = f"http://127.0.0.1:{leaky.sockets[0].getsockname()[1]}"
    garbage_url = f"http://127.0.0.1:{garbage.sockets[0].getsockname()[1]}"
    config = GatewayConfig(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'gateway.sqlite3'}",
        dev_mode=False,
        background=False,
        catalogue_topic=examples_catalogue,
        coordinator_url=f"http://{UNRESOLVABLE}:7001",
        service_urls={
            "documents": f"http://127.0.0.1:{free_port()}",
            "ledger": f"http://localhost:{free_port()}",
            "links": leaky_url,
            "notifier": garbage_url,
        },
        admin_urls={"documents": leaky_url, "ledger": garbage_url, "coordinator": f"http://{UNRESOLVABLE}:1"},
        internal_token="fuzz-token-" + "t" * 30,
        http_timeout_s=2.0,
        # Every example's requests served, not refused for their rate: the rate's refusal is tested apart.
        rate_per_s=1e9,
        rate_burst=1e9,
    )
    stack = StackSettings(data_dir=tmp_path / "data", kafka_bootstrap=kafka.bootstrap)
    gateway = Gateway(config, stack, registry=registry())
    await gateway.start()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gateway.app), base_url="http://gateway", timeout=30
        ) as http:
            client = Client(http)
            run_id = await client.start_run(entry_point="fuzz")
            created = await client.create_document(run_id)
            useful = [run_id, "d1", "agent-1"]
            if created.get("data"):
                useful.append(created["data"]["createDocument"]["commandId"])
            yield Fuzzed(client, gateway, useful)
    finally:
        await gateway.stop()
        leaky.close()
        garbage.close()


def _json() -> st.SearchStrategy[Any]:
    leaves = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=12)
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
        max_leaves=6,
    )


def _strings(useful: list[str]) -> st.SearchStrategy[str]:
    return st.sampled_from(useful + HOSTILE) | st.text(max_size=40)


SCALARS: dict[str, st.SearchStrategy[Any]] = {
    "Int": st.sampled_from([0, -1, 1, 50, 200, 201, 2**31 - 1, -(2**31)]) | st.integers(-(2**31), 2**31 - 1),
    "Float": st.sampled_from([0.0, -1.0, 1e308, 0.001]) | st.floats(allow_nan=False, allow_infinity=False),
    "Boolean": st.booleans(),
    "Long": st.sampled_from([0, -1, 2**53 - 1, -(2**53 - 1), 2**53]) | st.integers(-(2**60), 2**60),
    "DateTime": st.sampled_from(["2025-01-01T00:00:00Z", "2025-01-01T00:00:00", "yesterday", "", "9999-9"]),
}


def value_for(kind: GraphQLInputType, useful: list[str]) -> st.SearchStrategy[Any]:
    """A value for a variable of this input type: mostly well-shaped with hostile contents, at times not."""
    if isinstance(kind, GraphQLNonNull):
        return value_for(kind.of_type, useful)
    shaped: st.SearchStrategy[Any]
    if isinstance(kind, GraphQLList):
        shaped = st.lists(value_for(kind.of_type, useful), max_size=3)
    elif isinstance(kind, GraphQLEnumType):
        shaped = st.sampled_from(list(kind.values))
    elif isinstance(kind, GraphQLInputObjectType):
        fields = kind.fields.items()
        required = {n: value_for(f.type, useful) for n, f in fields if isinstance(f.type, GraphQLNonNull)}
        optional = {n: value_for(f.type, useful) for n, f in fields if n not in required}
        shaped = st.fixed_dictionaries(required, optional=optional)
    elif isinstance(kind, GraphQLScalarType) and kind.name in SCALARS:
        shaped = SCALARS[kind.name]
    elif isinstance(kind, GraphQLScalarType) and kind.name == "JSON":
        shaped = _json()
    else:
        shaped = _strings(useful)
    return st.one_of(shaped, shaped, shaped, _json())


def selection(kind: Any, depth: int = 0) -> str:
    """Every leaf without required arguments, and objects below to depth 2."""
    named = get_named_type(kind)
    if is_leaf_type(named):
        return ""
    if not isinstance(named, GraphQLObjectType):
        return "{ __typename }"
    parts = []
    for name, field in named.fields.items():
        if any(is_required_argument(a) for a in field.args.values()):
            continue
        inner = get_named_type(field.type)
        if is_leaf_type(inner):
            parts.append(name)
        elif depth < 2:
            parts.append(f"{name} {selection(field.type, depth + 1)}")
    return "{ " + " ".join(parts or ["__typename"]) + " }"


def request(operation: str, name: str, field: GraphQLField, draw: Any, useful: list[str]) -> dict[str, Any]:
    declared, passed, variables = [], [], {}
    for index, (arg_name, arg) in enumerate(field.args.items()):
        if not is_required_argument(arg) and draw(st.booleans()):
            continue
        variable = f"v{index}"
        declared.append(f"${variable}: {arg.type}")
        passed.append(f"{arg_name}: ${variable}")
        variables[variable] = draw(value_for(arg.type, useful))
    head = f"{operation} Fuzz({', '.join(declared)})" if declared else operation
    call = f"{name}({', '.join(passed)})" if passed else name
    return {"query": f"{head} {{ {call} {selection(field.type)} }}", "variables": variables}


def leaks(body: Any, sent: str) -> list[str]:
    """Forbidden text in the errors that the request did not contain itself."""
    found = []
    for error in body.get("errors") or [] if isinstance(body, dict) else []:
        text = json.dumps(error, ensure_ascii=False)
        for pattern in FORBIDDEN:
            found += [m.group(0) for m in pattern.finditer(text) if m.group(0) not in sent]
    return found


@settings(
    max_examples=8,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(draw=st.data())
async def test_no_error_says_where_a_component_lives_or_how_code_failed(fuzzed: Fuzzed, draw: Any) -> None:
    schema = fuzzed.gateway.schema._schema
    roots = [("query", schema.query_type), ("mutation", schema.mutation_type)]
    for operation, root in roots:
        for name, field in root.fields.items():
            who = draw.draw(st.sampled_from(list(KEYS)), label="principal")
            body = request(operation, name, field, draw.draw, fuzzed.useful)
            response = await fuzzed.client.raw(body, KEYS[who])
            assert response.status_code < 500, (name, response.text[:500])
            answer = response.json()
            sent = json.dumps(body, ensure_ascii=False) + json.dumps(body)
            assert not leaks(answer, sent), (name, who, body, answer)
            for error in answer.get("errors") or []:
                assert (error.get("extensions") or {}).get("code"), (name, error)
