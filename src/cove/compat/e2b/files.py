"""envd's plain HTTP routes: `GET /files` (download), `POST /files` (upload) and `GET /health`.

Uploads stream through the guest agent as they arrive (multipart with one or several files, or a
raw `application/octet-stream` body with `path`; either may be gzip-encoded), and nothing larger
than cove's upload limit is written, however well it compresses. Downloads stream back, gzipped
when the client accepts it. A request presents the sandbox's envd token (`X-Access-Token`) or a
signature made with it (e2b's `download_url` / `upload_url`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import mimetypes
import os
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from cove.node.guest_client import GuestError, GuestUnavailable

from . import fsops
from .fsops import EnvdError, Session
from .routing import envd_token, signature, target

if TYPE_CHECKING:
    from cove.controlplane.app import Cove

_UNAUTHORIZED_DRAIN = 1 << 20  # what we read of a refused upload from a caller without a token
_PIECE = 256 * 1024  # most bytes one step of gunzip may produce (bounds a compression bomb's burst)


class _TooLarge(Exception):
    pass


class _Malformed(Exception):
    pass


class _ClientGone(Exception):
    pass


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _json(send: Send, status: int, obj: Any) -> None:
    body = json.dumps(obj).encode()
    await _respond(
        send,
        status,
        body,
        [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    )


async def _error(send: Send, err: EnvdError) -> None:
    await _json(send, err.status, {"code": err.status, "message": err.message})


# --- authorization ---------------------------------------------------------------------------


def _authorize(cove: Cove, scope: Scope, request: Request, operation: str) -> None:
    tgt = target(scope)
    if "x-access-token" in request.headers:
        if not tgt.envd_token:
            raise EnvdError(401, "unauthenticated", "access token present in header but does not match")
        return
    q = request.query_params
    sig = q.get("signature")
    if sig is None:
        raise EnvdError(
            401,
            "unauthenticated",
            "unauthorized access, please provide a valid access token or method signing if supported",
        )
    expiration: int | None = None
    if q.get("signature_expiration"):
        try:
            expiration = int(q["signature_expiration"])
        except ValueError:
            raise EnvdError(400, "invalid_argument", "signature_expiration must be an integer") from None
    token = envd_token(cove, tgt.sandbox.id)
    expected = signature(q.get("path", ""), operation, q.get("username", ""), token, expiration)
    if not hmac.compare_digest(expected, sig):
        raise EnvdError(401, "unauthenticated", "invalid signature")
    if expiration is not None and expiration < time.time():
        raise EnvdError(401, "unauthenticated", "signature is already expired")


def _user(request: Request) -> str | None:
    return request.query_params.get("username") or fsops.basic_user(request.headers)


# --- request bodies --------------------------------------------------------------------------


class _Body:
    """The request body as it arrives, once; `drain` discards what is left of it (bounded)."""

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.done = False
        self.drain_budget = _UNAUTHORIZED_DRAIN  # raised once the caller is authorized

    async def chunks(self) -> AsyncIterator[bytes]:
        while not self.done:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone()
            self.done = not message.get("more_body", False)
            if message.get("body"):
                yield message["body"]

    async def drain(self) -> None:
        """Read the rest of an upload we refuse, so the client sees our answer rather than a reset;
        an upload larger than `drain_budget` gets the reset."""
        budget = self.drain_budget
        try:
            async for chunk in self.chunks():
                budget -= len(chunk)
                if budget < 0:
                    return
        except _ClientGone:
            return


async def _limited(source: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in source:
        seen += len(chunk)
        if seen > limit:
            raise _TooLarge()
        yield chunk


async def _gunzip(source: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Decompress gzip (one or several members) in bounded steps, so a limit downstream stops a bomb."""
    d = zlib.decompressobj(wbits=31)
    started = False
    async for chunk in source:
        pending = chunk
        while pending:
            started = True
            try:
                out = d.decompress(pending, _PIECE)
            except zlib.error as exc:
                raise _Malformed(f"invalid gzip body: {exc}") from None
            if out:
                yield out
            if d.eof:
                pending = d.unused_data
                if pending:
                    d = zlib.decompressobj(wbits=31)
            else:
                pending = d.unconsumed_tail
    if not started or not d.eof:
        raise _Malformed("invalid gzip body: it ends before the end of its data")


class _Multipart:
    """A streaming multipart/form-data reader: parts one at a time, each part's data as it arrives."""

    def __init__(self, boundary: bytes, source: AsyncIterator[bytes]) -> None:
        self.source = source
        self.events: deque[tuple[str, Any]] = deque()
        self.ended = False
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[str, str] = {}
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_header_field": lambda b, s, e: self._field.extend(b[s:e]),
                "on_header_value": lambda b, s, e: self._value.extend(b[s:e]),
                "on_header_end": self._header_end,
                "on_headers_finished": lambda: self.events.append(("headers", self._headers)),
                "on_part_data": lambda b, s, e: self.events.append(("data", bytes(b[s:e]))),
                "on_part_end": lambda: self.events.append(("end", None)),
                "on_end": lambda: self.events.append(("done", None)),
            },
        )

    def _begin(self) -> None:
        self._headers = {}

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").lower()] = self._value.decode("latin-1")
        self._field.clear()
        self._value.clear()

    async def _next(self) -> tuple[str, Any]:
        while not self.events:
            if self.ended:
                raise _Malformed("malformed multipart body: it ends before its closing boundary")
            chunk = await anext(self.source, None)
            if chunk is None:
                self.ended = True
                continue
            try:
                self.parser.write(chunk)
            except MultipartParseError as exc:
                raise _Malformed(f"malformed multipart body: {exc}") from None
        return self.events.popleft()

    async def next_part(self) -> dict[str, str] | None:
        """The next part's headers, or None after the last part."""
        while True:
            kind, value = await self._next()
            if kind == "headers":
                return value
            if kind == "done":
                return None

    async def data(self) -> AsyncIterator[bytes]:
        """The current part's bytes, up to its end."""
        while True:
            kind, value = await self._next()
            if kind == "data":
                if value:
                    yield value
            elif kind == "end":
                return
            else:
                raise _Malformed(f"malformed multipart body: unexpected {kind} inside a part")


# --- routes ----------------------------------------------------------------------------------


def build(cove: Cove) -> Any:
    """The ASGI app for /files and /health (the envd app sends those paths here)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        path, method = scope["path"], scope["method"]
        if path == "/health":
            if method not in ("GET", "HEAD"):
                await _error(send, EnvdError(405, "unimplemented", f"method {method} not allowed"))
                return
            await _respond(send, 204, b"", [(b"cache-control", b"no-store")])
            return
        if method == "GET":
            await _download(cove, scope, request, send)
        elif method == "POST":
            await _upload(cove, scope, request, receive, send)
        else:
            await _error(send, EnvdError(405, "unimplemented", f"method {method} not allowed on /files"))

    return app


def _wants_gzip(accept: str) -> bool:
    for item in accept.split(","):
        name, _, params = item.strip().partition(";")
        if name.strip().lower() in ("gzip", "x-gzip"):
            q = params.strip().lower()
            return not (q.startswith("q=") and q[2:].strip() in ("0", "0.0", "0.00", "0.000"))
    return False


async def _download(cove: Cove, scope: Scope, request: Request, send: Send) -> None:
    try:
        _authorize(cove, scope, request, "read")
        path = fsops.guest_path(request.query_params.get("path", ""))
        user = _user(request)
        s = await fsops.session(cove, target(scope))
    except EnvdError as err:
        await _error(send, err)
        return
    chunks = s.guest.read(path or ".", owner=user or s.rec.user)
    try:
        first = await anext(chunks, b"")  # errors (missing file, a directory) come before any byte
    except (GuestError, GuestUnavailable) as exc:
        await _error(send, await s.failed(exc))
        return
    # Every SDK download accepts gzip. Compress fast (level 1, off the event loop), and not at all
    # when the first chunk shows the data does not compress (Accept-Encoding is only a preference).
    z = None
    if _wants_gzip(request.headers.get("accept-encoding", "")) and (
        len(first) < 4096 or len(zlib.compress(first, 1)) < 0.9 * len(first)
    ):
        z = zlib.compressobj(1, wbits=31)
    head = z.compress(first) if z else first
    ctype = mimetypes.guess_type(path)[0] or "application/octet-stream"
    headers = [(b"content-type", ctype.encode()), (b"vary", b"Accept-Encoding")]
    if z is not None:
        headers.append((b"content-encoding", b"gzip"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    try:
        if head:
            await send({"type": "http.response.body", "body": head, "more_body": True})
        async for chunk in chunks:
            out = await asyncio.to_thread(z.compress, chunk) if z else chunk
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
        await send({"type": "http.response.body", "body": z.flush() if z else b""})
    except (GuestError, GuestUnavailable, OSError):
        # Headers are sent: end the response without its last chunk, so the client sees it broke.
        raise RuntimeError("the download broke off inside the sandbox") from None
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


async def _upload(cove: Cove, scope: Scope, request: Request, receive: Receive, send: Send) -> None:
    limit = cove.settings.max_upload_bytes
    body = _Body(receive)
    try:
        try:
            entries = await _store(cove, scope, request, body, limit)
        except _TooLarge:
            raise EnvdError(
                413, "failed_precondition", f"the upload exceeds cove's limit of {limit} bytes per request"
            ) from None
        except _Malformed as exc:
            raise EnvdError(400, "invalid_argument", str(exc)) from None
    except _ClientGone:
        return
    except EnvdError as err:
        await body.drain()
        await _error(send, err)
        return
    await _json(send, 200, entries)


async def _store(cove: Cove, scope: Scope, request: Request, body: _Body, limit: int) -> list[dict[str, Any]]:
    _authorize(cove, scope, request, "write")
    body.drain_budget = limit
    user = _user(request)
    metadata = {
        k[len(fsops.METADATA_HEADER) :]: v
        for k, v in request.headers.items()
        if k.startswith(fsops.METADATA_HEADER) and len(k) > len(fsops.METADATA_HEADER)
    }
    xattrs = fsops.metadata_xattrs(metadata)
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity", "gzip", "x-gzip"):
        raise EnvdError(400, "invalid_argument", f"unsupported Content-Encoding {encoding!r} (gzip only)")
    declared = request.headers.get("content-length", "")
    if not encoding.endswith("gzip") and declared.isdigit() and int(declared) > limit:
        raise _TooLarge()
    source = body.chunks()
    if encoding.endswith("gzip"):
        source = _gunzip(source)
    source = _limited(source, limit)
    media, params = parse_options_header(request.headers.get("content-type", ""))
    s = await fsops.session(cove, target(scope))
    query_path = request.query_params.get("path")
    if media == b"application/octet-stream":
        if not query_path:
            raise EnvdError(400, "invalid_argument", "the path query parameter is required for a raw upload")
        return [await _write(s, query_path, source, user, xattrs)]
    if not media.startswith(b"multipart/"):
        raise EnvdError(
            400,
            "invalid_argument",
            f"unsupported content type {media.decode('latin-1')!r}: "
            "expected multipart/form-data or application/octet-stream",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise EnvdError(400, "invalid_argument", "malformed multipart body: no boundary in its content type")
    form = _Multipart(boundary, source)
    written: list[dict[str, Any]] = []
    while (headers := await form.next_part()) is not None:
        _, disposition = parse_options_header(headers.get("content-disposition", ""))
        if disposition.get(b"name") != b"file":
            async for _ in form.data():
                pass
            continue
        filename = disposition.get(b"filename", b"").decode("utf-8", "replace")
        path = query_path or filename
        if not path:
            raise EnvdError(
                400, "invalid_argument", "a multipart file part has no file name and no path was given"
            )
        if any(os.path.normpath(w["_asked"]) == os.path.normpath(path) for w in written):
            raise EnvdError(
                400,
                "invalid_argument",
                f"you cannot upload multiple files to the same path {path!r} in one request; "
                "only the first was written",
            )
        entry = await _write(s, path, form.data(), user, xattrs)
        written.append({**entry, "_asked": path})
    return [{k: v for k, v in w.items() if k != "_asked"} for w in written]


async def _write(
    s: Session, path: str, data: AsyncIterator[bytes], user: str | None, xattrs: dict[str, str]
) -> dict[str, Any]:
    try:
        reply = await s.guest.write(fsops.guest_path(path), data, owner=user or s.rec.user, xattrs=xattrs)
    except (GuestError, GuestUnavailable) as exc:
        raise await s.failed(exc) from exc
    entry = reply["entry"]
    out: dict[str, Any] = {"name": entry["name"], "type": "file", "path": entry["path"]}
    metadata = fsops.metadata_of(entry)
    if metadata:
        out["metadata"] = metadata
    return out
