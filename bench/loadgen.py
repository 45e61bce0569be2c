"""A lean HTTP/1.1 client for load runs: keep-alive connections over asyncio streams, JSON only.

The load generator shares the machine's two cores with the server it measures. httpx's async pool
costs far more CPU per request once thousands of requests wait for a connection (its CPU per
cycle grew about 7× in a backlog), so an overloaded run measured mostly the client. This one
hands connections out through a queue: O(1) per request, a few hundred µs of CPU.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlsplit


class HTTPError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body
        try:
            self.code = json.loads(body)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            self.code = ""
        super().__init__(f"{status} {self.code}: {body[:200].decode(errors='replace')}")


class Client:
    """`connections` kept-alive connections to `url`; a request waits for a free one."""

    def __init__(self, url: str, api_key: str, connections: int = 64, timeout: float = 120) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.auth = f"Authorization: Bearer {api_key}\r\nHost: {self.host}:{self.port}\r\n"
        self.timeout = timeout
        self.free: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None] = asyncio.Queue()
        for _ in range(connections):
            self.free.put_nowait(None)  # opened on first use

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        """The decoded JSON reply (None when empty); HTTPError for a status of 400 or more."""
        conn = await self.free.get()
        try:
            if conn is None:
                conn = await asyncio.open_connection(self.host, self.port)
            status, data = await asyncio.wait_for(self._exchange(conn, method, path, body), self.timeout)
        except BaseException:
            if conn is not None:
                conn[1].close()
            self.free.put_nowait(None)
            raise
        self.free.put_nowait(conn)
        if status >= 400:
            raise HTTPError(status, data)
        return json.loads(data) if data else None

    async def _exchange(
        self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], method: str, path: str, body: Any
    ) -> tuple[int, bytes]:
        reader, writer = conn
        payload = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\n{self.auth}Content-Length: {len(payload)}\r\n"
        if payload:
            head += "Content-Type: application/json\r\n"
        writer.write(head.encode() + b"\r\n" + payload)
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split()[1])
        length, chunked = 0, False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        if not chunked:
            return status, await reader.readexactly(length) if length else b""
        data = b""
        while size := int((await reader.readline()).split(b";")[0], 16):
            data += await reader.readexactly(size + 2)
            data = data[:-2]
        await reader.readline()
        return status, data

    async def close(self) -> None:
        while not self.free.empty():
            conn = self.free.get_nowait()
            if conn is not None:
                conn[1].close()
