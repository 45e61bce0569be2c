"""A reverse proxy from an ASGI request to a TCP port inside a sandbox.

HTTP is relayed as HTTP/1.1 over a fresh connection per request (h11 frames it), with the request and
response bodies streamed both ways at once; a WebSocket is relayed message by message (the
`websockets` client on the sandbox-side connection). The caller decides who may reach the port and
how errors look; this module only moves bytes. A port nobody listens on is a 502 whose message says
"port is not open" (the wording e2b's SDK recognises).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import quote

import h11
from starlette.types import Message, Receive, Scope, Send
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from cove.store.base import SandboxRecord

from .sandbox_socket import PortNotOpen, SandboxGone

log = logging.getLogger("cove.proxy")

ErrorSender = Callable[[Send, int, str], Awaitable[None]]
# Connects to a port on the sandbox's loopback: on its node, wherever that is (NodeAgent.network.connect).
PortOpener = Callable[[int], Awaitable[socket.socket]]
READ_SIZE = 1 << 18
WS_MAX_MESSAGE = 64 << 20

# Headers that describe one hop, not the message (RFC 9110 §7.6.1), and the ones we set ourselves.
_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"expect",  # the ASGI server already answered 100-continue
    b"content-length",
}
# The ASGI server adds its own (uvicorn does not merge them with the app's).
_SET_BY_SERVER = {b"date", b"server"}
_WS_HANDSHAKE = {
    b"host",
    b"sec-websocket-key",
    b"sec-websocket-version",
    b"sec-websocket-extensions",
    b"sec-websocket-protocol",
    b"sec-websocket-accept",
}


async def json_error(send: Send, status: int, message: str) -> None:
    body = json.dumps({"code": status, "message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def serve(
    scope: Scope,
    receive: Receive,
    send: Send,
    sandbox: SandboxRecord,
    port: int,
    connect: PortOpener,
    *,
    path: bytes | None = None,
    host: str | None = None,
    drop_headers: Iterable[bytes] = (),
    error: ErrorSender = json_error,
) -> None:
    """Relay this HTTP request or WebSocket to `port` on the sandbox's loopback.

    `sandbox` must be running (its node handle names its init). `path` replaces the request's raw
    path (percent-encoded, without the query) for mounts under a prefix; `host` replaces the Host
    header; `drop_headers` are not forwarded, e.g. credentials meant for cove itself."""
    drop = {h.lower() for h in drop_headers}
    if host is not None:
        scope = {
            **scope,
            "headers": [
                *((k, v) for k, v in scope["headers"] if k.lower() != b"host"),
                (b"host", host.encode()),
            ],
        }
    target = (path if path is not None else _raw_path(scope)) or b"/"
    if scope.get("query_string"):
        target += b"?" + scope["query_string"]
    try:
        sock = await connect(port)
    except PortNotOpen:
        message = f"The sandbox {sandbox.id} is running but port is not open: nothing listens on port {port}"
        await refuse(scope, send, error, 502, message)
        return
    except SandboxGone:
        await refuse(scope, send, error, 502, f"The sandbox {sandbox.id} was not found")
        return
    except TimeoutError:
        await refuse(scope, send, error, 504, f"connecting to port {port} in sandbox {sandbox.id} timed out")
        return
    except ConnectionError as e:  # its node is out of reach
        await refuse(scope, send, error, 502, f"the sandbox {sandbox.id} cannot be reached: {e}")
        return
    if scope["type"] == "websocket":
        await _websocket(scope, receive, send, sock, target, drop, error)
    else:
        await _http(scope, receive, send, sock, port, target, drop, error)


def _raw_path(scope: Scope) -> bytes:
    raw = scope.get("raw_path")
    return raw if raw else quote(scope.get("path", "/")).encode()


async def refuse(scope: Scope, send: Send, error: ErrorSender, status: int, message: str) -> None:
    if scope["type"] == "http":
        await error(send, status, message)
    elif "websocket.http.response" in scope.get("extensions", {}):
        await error(_as_ws_response(send), status, message)
    else:
        await send({"type": "websocket.close", "code": 1011, "reason": message[:120]})


def _as_ws_response(send: Send) -> Send:
    """An HTTP response sent in place of the WebSocket handshake (ASGI's websocket.http.response)."""

    async def wrapped(message: Message) -> None:
        await send({**message, "type": "websocket." + message["type"]})

    return wrapped


def _forwarded(scope: Scope, drop: set[bytes], skip: set[bytes]) -> list[tuple[bytes, bytes]]:
    headers = [(k.lower(), v) for k, v in scope["headers"] if k.lower() not in skip and k.lower() not in drop]
    client = scope.get("client")
    if client:
        prior = [v for k, v in headers if k == b"x-forwarded-for"]
        headers = [(k, v) for k, v in headers if k != b"x-forwarded-for"]
        headers.append((b"x-forwarded-for", b", ".join([*prior, client[0].encode()])))
    if not any(k == b"x-forwarded-proto" for k, _ in headers):
        scheme = scope.get("scheme", "http").replace("ws", "http")
        headers.append((b"x-forwarded-proto", scheme.encode()))
    return headers


# -- HTTP ------------------------------------------------------------------------------------------


async def _http(
    scope: Scope,
    receive: Receive,
    send: Send,
    sock: socket.socket,
    port: int,
    target: bytes,
    drop: set[bytes],
    error: ErrorSender,
) -> None:
    reader, writer = await asyncio.open_connection(sock=sock, limit=READ_SIZE)
    original = {k.lower(): v for k, v in scope["headers"]}
    headers = _forwarded(scope, drop, _HOP)
    if not any(k == b"host" for k, _ in headers):
        headers.append((b"host", f"localhost:{port}".encode()))
    # The body keeps the framing it came with: a length, or chunks when its length is unknown.
    has_body = b"content-length" in original or b"transfer-encoding" in original
    if b"content-length" in original:
        headers.append((b"content-length", original[b"content-length"]))
    elif has_body:
        headers.append((b"transfer-encoding", b"chunked"))
    headers.append((b"connection", b"close"))
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 20)
    gone = asyncio.Event()  # the client went away: stop relaying
    pump: asyncio.Task[None] | None = None
    started = False
    try:
        writer.write(conn.send(h11.Request(method=scope["method"], target=target, headers=headers)))
        pump = asyncio.create_task(_pump_request(receive, writer, conn, has_body, gone))
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                read = asyncio.ensure_future(reader.read(READ_SIZE))
                waiter = asyncio.ensure_future(gone.wait())
                done, _ = await asyncio.wait({read, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if read not in done:
                    read.cancel()
                    return
                conn.receive_data(read.result())
            elif isinstance(event, h11.InformationalResponse):
                continue
            elif isinstance(event, h11.Response):
                out = [
                    (k, v)
                    for k, v in event.headers
                    if (k not in _HOP or k == b"content-length") and k not in _SET_BY_SERVER
                ]
                await send({"type": "http.response.start", "status": event.status_code, "headers": out})
                started = True
            elif isinstance(event, h11.Data):
                await send({"type": "http.response.body", "body": bytes(event.data), "more_body": True})
            elif isinstance(event, h11.EndOfMessage):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            else:  # ConnectionClosed before the response ended
                raise h11.RemoteProtocolError("the connection closed mid-response")
    except (h11.ProtocolError, OSError) as e:
        if gone.is_set():
            return
        if not started:
            await error(send, 502, f"the server on port {port} in the sandbox sent no valid response: {e}")
        # else: end without completing the response, so the client sees a cut body, not a whole one
        log.info("proxied response cut short", extra={"port": port, "error": str(e)})
    finally:
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(BaseException):
                await pump
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _pump_request(
    receive: Receive, writer: asyncio.StreamWriter, conn: h11.Connection, has_body: bool, gone: asyncio.Event
) -> None:
    """Send the request body upstream as it arrives, then wait for the client to disconnect."""
    ended = False
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
                return
            if ended:
                continue
            body = message.get("body", b"")
            if body and has_body:
                writer.write(conn.send(h11.Data(data=body)))
                await writer.drain()
            if not message.get("more_body", False):
                ended = True
                writer.write(conn.send(h11.EndOfMessage()))
                await writer.drain()
    except (OSError, h11.ProtocolError):
        return  # the server stopped reading (e.g. it answered early); its response still counts


# -- WebSocket -------------------------------------------------------------------------------------


async def _websocket(
    scope: Scope,
    receive: Receive,
    send: Send,
    sock: socket.socket,
    target: bytes,
    drop: set[bytes],
    error: ErrorSender,
) -> None:
    first = await receive()
    if first["type"] != "websocket.connect":
        sock.close()
        return
    host = next((v for k, v in scope["headers"] if k == b"host"), b"localhost").decode("latin-1")
    headers = _forwarded(scope, drop, _HOP | _WS_HANDSHAKE)
    try:
        upstream = await ws_connect(
            f"ws://{host}{target.decode('latin-1')}",
            sock=sock,
            additional_headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers],
            subprotocols=scope.get("subprotocols") or None,
            compression=None,
            proxy=None,
            user_agent_header=None,
            open_timeout=10,
            ping_interval=None,
            max_size=WS_MAX_MESSAGE,
        )
    except InvalidStatus as e:
        sock.close()
        await refuse(
            scope, send, error, e.response.status_code, "the server in the sandbox refused the WebSocket"
        )
        return
    except (InvalidHandshake, OSError, TimeoutError) as e:
        sock.close()
        await refuse(scope, send, error, 502, f"WebSocket handshake with the sandbox failed: {e}")
        return
    async with upstream:
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
        await _relay_ws(receive, send, upstream)


async def _relay_ws(receive: Receive, send: Send, upstream: ClientConnection) -> None:
    async def down_to_up() -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.receive":
                if message.get("bytes") is not None:
                    await upstream.send(message["bytes"])
                else:
                    await upstream.send(message.get("text") or "")
            elif message["type"] == "websocket.disconnect":
                await upstream.close(_close_code(message.get("code")))
                return

    async def up_to_down() -> None:
        try:
            async for data in upstream:
                if isinstance(data, bytes):
                    await send({"type": "websocket.send", "bytes": data})
                else:
                    await send({"type": "websocket.send", "text": data})
        except ConnectionClosed:
            pass
        with contextlib.suppress(Exception):
            await send(
                {
                    "type": "websocket.close",
                    "code": _close_code(upstream.close_code),
                    "reason": upstream.close_reason or "",
                }
            )

    tasks = [asyncio.create_task(down_to_up()), asyncio.create_task(up_to_down())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t


def _close_code(code: int | None) -> int:
    """A close code that may be sent on the wire (1005, 1006 and 1015 only describe closes)."""
    if code is not None and (
        code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1014 or 3000 <= code <= 4999
    ):
        return code
    return 1000
