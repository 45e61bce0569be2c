"""A small Connect RPC server (https://connectrpc.com/docs/protocol) for envd's services.

Usage::

    from cove.compat.e2b import connect

    app = connect.app(
        {
            "/pkg.Service/Get": connect.unary(GetRequest, GetResponse, get),
            "/pkg.Service/Watch": connect.server_stream(
                WatchRequest, WatchResponse, watch, keepalive=lambda: WatchResponse(keepalive=...)
            ),
            "/pkg.Service/Feed": connect.client_stream(FeedRequest, FeedResponse, feed),
        },
        before=check_access,  # optional: async (ctx) -> None, runs first (before the body is read)
    )

Handlers (message types are Google protobuf classes, e.g. from `cove.compat.e2b.proto`):

- unary: `async def get(req: GetRequest, ctx: Context) -> GetResponse`
- server stream: `async def watch(req: WatchRequest, ctx: Context) -> AsyncIterator[WatchResponse]`
  (an async generator). When the client sent `Keepalive-Ping-Interval: N` (seconds) and the method
  has a `keepalive` factory, its message is sent whenever the handler yielded nothing for N seconds.
  The generator is closed (`aclose`) when the client goes away or the deadline passes.
- client stream: `async def feed(reqs: AsyncIterator[FeedRequest], ctx: Context) -> FeedResponse`.

Errors: raise `ConnectError(code, message)` with a Connect code ("not_found", "invalid_argument",
"unauthenticated", "failed_precondition", ...; see `HTTP_STATUS`). Unary errors are JSON
`{"code", "message"}` with the HTTP status Connect maps the code to; stream errors end the stream
(HTTP 200) with an end-of-stream envelope `{"error": {...}}`. Any other exception is logged and
answered as "internal". An unknown path is 404 `unimplemented`; a body that does not decode is
`invalid_argument`.

`Context` gives the handler `scope`, `headers` (lower-case names), `method` (the path),
`timeout` (seconds from `Connect-Timeout-Ms`, or None), `keepalive` (seconds, or None) and `state`
(a dict, e.g. for what `before` looked up). The deadline is enforced here: past it, the call ends
with `deadline_exceeded`.

Codecs: JSON (`application/json`, `application/connect+json`; camelCase or proto field names,
unknown fields ignored, int64 as strings accepted) and binary protobuf (`application/proto`,
`application/connect+proto`). Requests may be gzip-compressed (`Content-Encoding` for unary,
`Connect-Content-Encoding` for streams); responses are not compressed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("cove.e2b.connect")

# Connect code -> HTTP status of a unary error (https://connectrpc.com/docs/protocol#error-codes).
HTTP_STATUS = {
    "canceled": 499,
    "unknown": 500,
    "invalid_argument": 400,
    "deadline_exceeded": 504,
    "not_found": 404,
    "already_exists": 409,
    "permission_denied": 403,
    "resource_exhausted": 429,
    "failed_precondition": 400,
    "aborted": 409,
    "out_of_range": 400,
    "unimplemented": 501,
    "internal": 500,
    "unavailable": 503,
    "data_loss": 500,
    "unauthenticated": 401,
}

MAX_MESSAGE = 32 * 1024 * 1024  # one request message (or unary body), decompressed
_FLAG_COMPRESSED = 0x01
_FLAG_END = 0x02
_ENVELOPE = struct.Struct(">BI")


class ConnectError(Exception):
    def __init__(self, code: str, message: str) -> None:
        if code not in HTTP_STATUS:
            raise ValueError(f"not a Connect code: {code!r}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass
class Context:
    scope: Scope
    headers: dict[str, str]
    method: str
    timeout: float | None
    keepalive: float | None
    state: dict[str, Any] = field(default_factory=dict)


Handler = Callable[..., Any]


@dataclass(frozen=True)
class Method:
    kind: str  # "unary" | "server_stream" | "client_stream"
    request: type[Message]
    response: type[Message]
    handler: Handler
    keepalive: Callable[[], Message] | None = None


def unary(request: type[Message], response: type[Message], handler: Handler) -> Method:
    return Method("unary", request, response, handler)


def server_stream(
    request: type[Message],
    response: type[Message],
    handler: Handler,
    keepalive: Callable[[], Message] | None = None,
) -> Method:
    return Method("server_stream", request, response, handler, keepalive)


def client_stream(request: type[Message], response: type[Message], handler: Handler) -> Method:
    return Method("client_stream", request, response, handler)


# --- codecs ---------------------------------------------------------------------------------------


def decode(data: bytes, cls: type[Message], codec: str) -> Message:
    msg = cls()
    try:
        if codec == "json":
            json_format.Parse(data.decode("utf-8") if data.strip() else "{}", msg, ignore_unknown_fields=True)
        else:
            msg.ParseFromString(data)
    except Exception as exc:  # ParseError, DecodeError, UnicodeDecodeError, RecursionError, ...
        raise ConnectError("invalid_argument", f"cannot decode {cls.DESCRIPTOR.full_name}: {exc}") from None
    return msg


def encode(msg: Message, codec: str) -> bytes:
    if codec == "json":
        return json.dumps(json_format.MessageToDict(msg), separators=(",", ":")).encode()
    return msg.SerializeToString()


def _decompress(data: bytes, encoding: str) -> bytes:
    if encoding == "identity":
        return data
    try:
        # Bounded: a small gzip body must not inflate past the message limit.
        out = zlib.decompressobj(wbits=31)
        result = out.decompress(data, MAX_MESSAGE + 1)
    except (zlib.error, gzip.BadGzipFile) as exc:
        raise ConnectError("invalid_argument", f"bad gzip data: {exc}") from None
    if len(result) > MAX_MESSAGE or out.unconsumed_tail:
        raise ConnectError("resource_exhausted", f"message larger than {MAX_MESSAGE} bytes")
    return result


def _encoding(headers: dict[str, str], name: str) -> str:
    value = headers.get(name, "identity").strip().lower() or "identity"
    if value not in ("identity", "gzip"):
        raise ConnectError("unimplemented", f"unsupported compression {value!r} (gzip and identity are)")
    return value


def _envelope(flags: int, data: bytes) -> bytes:
    return _ENVELOPE.pack(flags, len(data)) + data


def _end_stream(error: ConnectError | None) -> bytes:
    body = {"error": error.to_dict()} if error else {}
    return _envelope(_FLAG_END, json.dumps(body).encode())


# --- the ASGI app ---------------------------------------------------------------------------------


class _Disconnected(Exception):
    """The client went away: nothing more can be sent."""


def app(methods: dict[str, Method], before: Callable[[Context], Awaitable[None]] | None = None) -> ASGIApp:
    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1003})
            return
        method = methods.get(scope["path"])
        if method is None:
            err = ConnectError("unimplemented", f"{scope['path']} is not a method of this server")
            await _send_json(send, 404, err.to_dict())
            return
        if scope["method"] != "POST":
            err = ConnectError("unimplemented", f"{scope['method']} is not allowed; Connect calls are POST")
            await _send_json(send, 405, err.to_dict(), [(b"allow", b"POST")])
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        stream = method.kind != "unary"
        content_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        prefix = "application/connect+" if stream else "application/"
        codec = content_type[len(prefix) :] if content_type.startswith(prefix) else ""
        if codec not in ("json", "proto"):
            want = f"{prefix}json or {prefix}proto"
            err = ConnectError("invalid_argument", f"content-type {content_type!r} is not {want}")
            await _send_json(send, 415, err.to_dict())
            return
        call = _Call(method, scope, receive, send, headers, codec, stream)
        await call.run(before)

    return asgi


async def _send_json(send: Send, status: int, body: dict[str, Any], extra: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *(extra or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class _Call:
    def __init__(
        self,
        method: Method,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: dict[str, str],
        codec: str,
        stream: bool,
    ) -> None:
        self.method = method
        self.receive = receive
        self._send = send
        self.headers = headers
        self.codec = codec
        self.stream = stream
        self.started = False
        self.body_done = False
        self.body_read = asyncio.Event()
        self.ctx = Context(scope, headers, scope["path"], None, None)

    # -- plumbing ----------------------------------------------------------------------------
    async def send(self, message: dict[str, Any]) -> None:
        try:
            await self._send(message)
        except OSError as exc:  # the transport broke under us
            raise _Disconnected() from exc

    async def _start(self) -> None:
        if not self.started:
            self.started = True
            ctype = f"application/connect+{self.codec}".encode()
            await self.send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", ctype)]}
            )

    async def write(self, msg: Message) -> None:
        await self._start()
        data = _envelope(0, encode(msg, self.codec))
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def finish(self, error: ConnectError | None) -> None:
        """End the call: the unary response's error, or the stream's end-of-stream envelope."""
        if not self.stream:
            if error is not None:
                await _send_json(self.send, HTTP_STATUS[error.code], error.to_dict())
            return
        await self._start()
        await self.send({"type": "http.response.body", "body": _end_stream(error), "more_body": False})

    async def _chunks(self) -> AsyncIterator[bytes]:
        while not self.body_done:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected()
            self.body_done = not message.get("more_body", False)
            if self.body_done:
                self.body_read.set()
            if message.get("body"):
                yield message["body"]

    async def read_body(self) -> bytes:
        body = bytearray()
        async for chunk in self._chunks():
            body += chunk
            if len(body) > MAX_MESSAGE + 5:
                raise ConnectError("resource_exhausted", f"request larger than {MAX_MESSAGE} bytes")
        return bytes(body)

    async def envelopes(self, encoding: str) -> AsyncIterator[bytes]:
        """The request stream's messages (decompressed), as they arrive."""
        buf = bytearray()
        chunks = self._chunks()
        while True:
            while len(buf) < 5 or len(buf) < 5 + _ENVELOPE.unpack_from(buf)[1]:
                if len(buf) >= 5 and _ENVELOPE.unpack_from(buf)[1] > MAX_MESSAGE:
                    raise ConnectError("resource_exhausted", f"message larger than {MAX_MESSAGE} bytes")
                chunk = await anext(chunks, None)
                if chunk is None:
                    if buf:
                        raise ConnectError("invalid_argument", "the request ended inside a message envelope")
                    return
                buf += chunk
            flags, size = _ENVELOPE.unpack_from(buf)
            data = bytes(buf[5 : 5 + size])
            del buf[: 5 + size]
            if flags & _FLAG_END:
                raise ConnectError(
                    "invalid_argument", "a request stream cannot carry an end-of-stream envelope"
                )
            if flags & ~(_FLAG_COMPRESSED | _FLAG_END):
                raise ConnectError("invalid_argument", f"unknown envelope flags {flags:#x}")
            if flags & _FLAG_COMPRESSED:
                if encoding == "identity":
                    raise ConnectError(
                        "invalid_argument", "compressed message without Connect-Content-Encoding"
                    )
                data = _decompress(data, encoding)
            yield data

    async def requests(self, encoding: str) -> AsyncIterator[Message]:
        async for data in self.envelopes(encoding):
            yield decode(data, self.method.request, self.codec)

    async def one_request(self, encoding: str) -> Message:
        if not self.stream:
            body = await self.read_body()
            return decode(_decompress(body, encoding), self.method.request, self.codec)
        messages = [m async for m in self.envelopes(encoding)]
        if len(messages) != 1:
            raise ConnectError("invalid_argument", f"expected one request message, got {len(messages)}")
        return decode(messages[0], self.method.request, self.codec)

    def _parse_headers(self) -> str:
        version = self.headers.get("connect-protocol-version", "1")
        if version != "1":
            raise ConnectError("invalid_argument", f"connect-protocol-version must be '1', got {version!r}")
        timeout = self.headers.get("connect-timeout-ms")
        if timeout is not None:
            if not timeout.isdigit() or len(timeout) > 10:
                raise ConnectError("invalid_argument", f"invalid Connect-Timeout-Ms {timeout!r}")
            self.ctx.timeout = int(timeout) / 1000
        keepalive = self.headers.get("keepalive-ping-interval")
        if keepalive:
            try:
                value = float(keepalive)
            except ValueError:
                value = 0
            self.ctx.keepalive = value if value > 0 else None
        return _encoding(self.headers, "connect-content-encoding" if self.stream else "content-encoding")

    # -- the call ----------------------------------------------------------------------------
    async def run(self, before: Callable[[Context], Awaitable[None]] | None) -> None:
        work = asyncio.ensure_future(self._serve(before))
        body_read = asyncio.ensure_future(self.body_read.wait())
        watcher: asyncio.Future[Any] | None = None
        try:
            await asyncio.wait({work, body_read}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                # The request is read: the next ASGI message can only be the client going away.
                watcher = asyncio.ensure_future(self.receive())
                await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, body_read, watcher):
                if task is not None and not task.done():
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError, _Disconnected):
                    if task is not None:
                        await task

    async def _serve(self, before: Callable[[Context], Awaitable[None]] | None) -> None:
        error: ConnectError | None = None
        try:
            try:
                encoding = self._parse_headers()
                async with asyncio.timeout(self.ctx.timeout):
                    await self._dispatch(before, encoding)
            except TimeoutError:
                error = ConnectError(
                    "deadline_exceeded", f"the call's deadline ({self.ctx.timeout} s) passed"
                )
            await self.finish(None if error is None else error)
        except ConnectError as exc:
            await self.finish(exc)
        except _Disconnected:
            pass
        except Exception as exc:
            log.exception("Connect handler %s failed", self.ctx.method)
            with contextlib.suppress(_Disconnected):
                await self.finish(ConnectError("internal", f"internal error: {type(exc).__name__}: {exc}"))

    async def _dispatch(self, before: Callable[[Context], Awaitable[None]] | None, encoding: str) -> None:
        m = self.method
        if before is not None:  # access checks come before anything about the request's body
            await before(self.ctx)
        if m.kind == "client_stream":
            response = await m.handler(self.requests(encoding), self.ctx)
            await self.write(response)
            return
        request = await self.one_request(encoding)
        if m.kind == "unary":
            response = await m.handler(request, self.ctx)
            data = encode(response, self.codec)
            ctype = f"application/{self.codec}".encode()
            headers = [(b"content-type", ctype), (b"content-length", str(len(data)).encode())]
            await self.send({"type": "http.response.start", "status": 200, "headers": headers})
            await self.send({"type": "http.response.body", "body": data})
            return
        await self._pump(m.handler(request, self.ctx))

    async def _pump(self, messages: AsyncIterator[Message]) -> None:
        """Send a handler's messages, with keepalives while it is quiet; close it however this ends."""
        interval = self.ctx.keepalive if self.method.keepalive is not None else None
        pending: asyncio.Future[Message] | None = None
        try:
            while True:
                pending = asyncio.ensure_future(anext(messages))  # type: ignore[arg-type]
                while not (await asyncio.wait({pending}, timeout=interval))[0]:
                    assert self.method.keepalive is not None
                    await self.write(self.method.keepalive())
                try:
                    msg = pending.result()
                except StopAsyncIteration:
                    return
                finally:
                    pending = None
                await self.write(msg)
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
            with contextlib.suppress(Exception):
                await messages.aclose()  # type: ignore[attr-defined]
