"""The benchmarks' HTTP/1.1 client: keep-alive connections over asyncio streams, nothing else.

A benchmark's load generator shares the machine with the stack it measures, so it should cost as little
as it can: a request here is one write of prepared bytes and a read up to its Content-Length (about a
tenth of what a general client such as httpx spends per request). Only what the benchmarks send and the
stack answers is handled: JSON bodies, `Content-Length` responses, no redirects, no TLS; anything else
raises rather than being misread.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

# uvicorn closes a connection idle for 5 s; one kept idle about as long races that close and loses its
# next request, so a pool reuses only connections idle for less than this.
IDLE_S = 2.0
# A response not whole within this is a failure, not a wait without end.
TIMEOUT_S = 60.0


class Connection:
    """One keep-alive connection to 127.0.0.1:`port`, one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.reusable = True  # False once the server said it closes the connection

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """The response's status code and body."""
        async with asyncio.timeout(TIMEOUT_S):
            self.writer.write(request)
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    raise ValueError(f"a {value.strip().decode()} response: this client reads "
                                     "Content-Length bodies only")
                elif name == b"connection" and value.strip().lower() == b"close":
                    self.reusable = False
            return status, await self.reader.readexactly(length)

    async def post(self, request: bytes) -> bytes:
        return (await self.send(request))[1]

    def close(self) -> None:
        self.writer.close()


def request_bytes(port: int, body: dict[str, Any], key: str | None, path: str = "/graphql") -> bytes:
    """A POST of `body` as JSON, with the Bearer `key` when given."""
    payload = json.dumps(body).encode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n{auth}"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload


def get_bytes(port: int, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()


class Pool:
    """Keep-alive connections to one port, each reused for one request at a time; as many are opened as
    requests are in flight at once (an open-loop load keeps issuing while earlier requests wait)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._idle: list[tuple[Connection, float]] = []  # with when each was last used, oldest first

    async def send(self, request: bytes) -> tuple[int, Any]:
        """The status and the JSON body of the response to `request` (bytes from `request_bytes`)."""
        conn = await self._take()
        try:
            status, body = await conn.send(request)
        except BaseException:
            conn.close()  # a connection whose response was not read whole cannot be reused
            raise
        if conn.reusable:
            self._idle.append((conn, time.monotonic()))
        else:
            conn.close()
        return status, json.loads(body) if body else None

    async def _take(self) -> Connection:
        while self._idle:
            conn, used = self._idle.pop()
            if conn.reader.at_eof() or conn.writer.is_closing():
                conn.close()  # the server closed it while it was idle
                continue
            if time.monotonic() - used < IDLE_S:
                return conn
            conn.close()  # the rest are older still
            for old, _ in self._idle:
                old.close()
            self._idle.clear()
        return await Connection.open(self.port)

    async def post(self, body: dict[str, Any], key: str | None) -> tuple[int, Any]:
        return await self.send(request_bytes(self.port, body, key))

    async def get(self, path: str) -> tuple[int, Any]:
        return await self.send(get_bytes(self.port, path))

    def close(self) -> None:
        for conn, _ in self._idle:
            conn.close()
        self._idle.clear()
