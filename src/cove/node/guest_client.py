"""Host side of the guest protocol (docs/guest-protocol.md): an asyncio client for one sandbox's agent.

Every operation has a connection of its own to the agent's unix socket, so operations run
concurrently and closing a connection is how the host cancels: the agent kills a command whose
connection closes, and drops a half-written upload. A connection whose reply said `reuse` goes back
to the node's `Idle` connections for the next operation on that sandbox, which saves the agent a
fork and the host a connect (about a millisecond each way on these machines).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from cove import stages
from cove.guest import protocol
from cove.guest.protocol import (
    HEADER,
    HEADER_SIZE,
    KIND_DATA,
    KIND_JSON,
    KIND_STDERR,
    KIND_STDIN,
    KIND_STDOUT,
    MAX_PAYLOAD,
)

# Largest `0` frame we send: big enough to keep per-frame overhead low, small enough to stream.
SEND_CHUNK = 256 * 1024
# StreamReader buffer: a 64 KiB frame should not pause the transport half-way.
READ_LIMIT = 1024 * 1024
DROP_WAIT = 1.0  # seconds to wait for a kept connection's handler to close its end

ByteSource = bytes | bytearray | memoryview | AsyncIterable[bytes] | Iterable[bytes]
# Opens a connection that speaks the guest protocol to one agent some other way than its unix socket
# (a node's tunnel, cove.node.remote); it raises GuestUnavailable (or OSError) when it cannot.
Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class GuestError(Exception):
    """The agent answered `ok: false`; `code` is one of protocol.ERROR_CODES."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class GuestUnavailable(Exception):
    """The agent cannot be reached, or the connection broke before its reply."""


class _Conn:
    """One connection to the agent; `reuse` once its final reply said the agent keeps serving it."""

    __slots__ = ("reader", "reuse", "use", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reuse = False
        self.use: _Stream | None = None  # while leased


class _Stream:
    """A connection in use (a stream, or a call that may wait long); `done` once its user has
    finished with it; `cut` once a checkpoint ended it (it must not be kept then)."""

    __slots__ = ("cut", "done", "writer")

    def __init__(self, writer: asyncio.StreamWriter, done: asyncio.Event) -> None:
        self.writer = writer
        self.done = done
        self.cut = False


class Idle:
    """Connections the agents keep serving, by socket path, for at most EXPIRY seconds each (well
    inside the agent's own wait, so the agent never closes one the host is about to use)."""

    EXPIRY = 2.0
    MOST = 2  # kept per sandbox: each one holds a handler process in the sandbox

    def __init__(self) -> None:
        self._conns: dict[str, list[tuple[float, _Conn]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        # Connections in use (streams, calls) by socket path: a checkpoint must end them too.
        self._streams: dict[str, set[_Stream]] = {}

    def stream(self, path: str, writer: asyncio.StreamWriter) -> _Stream:
        s = _Stream(writer, asyncio.Event())
        self._streams.setdefault(path, set()).add(s)
        return s

    def unstream(self, path: str, s: _Stream) -> None:
        s.done.set()
        live = self._streams.get(path)
        if live is not None:
            live.discard(s)
            if not live:
                del self._streams[path]

    def take(self, path: str) -> _Conn | None:
        kept = self._conns.get(path)
        now = time.monotonic()
        while kept:
            since, conn = kept.pop()
            if now - since < self.EXPIRY and not conn.writer.is_closing() and not conn.reader.at_eof():
                return conn
            conn.writer.close()
        self._conns.pop(path, None)
        return None

    def give(self, path: str, conn: _Conn) -> None:
        kept = self._conns.setdefault(path, [])
        if len(kept) >= self.MOST:
            conn.writer.close()
            return
        conn.reuse = False  # until the next reply says so again
        kept.append((time.monotonic(), conn))
        if self._timer is None:  # so idle sandboxes keep no handler
            self._timer = asyncio.get_running_loop().call_later(self.EXPIRY, self.expire)

    async def drop(self, path: str, wait: bool = True, in_use: bool = False) -> None:
        """Close a sandbox's kept connections (before it is frozen, dumped or killed); their
        handlers then exit. `wait`: until each handler has closed its end, so that no frozen
        handler holds a socket whose peer is gone. `in_use` (before a dump, with `wait`): end the
        connections in use too (streams, long waits): CRIU refuses to dump a socket whose peer is
        outside the sandbox."""
        conns = [conn for _, conn in self._conns.pop(path, [])]
        if not wait:
            for conn in conns:
                conn.writer.close()
            return
        # Stopped or killed, connections in use break as the sandbox ends, and their users then
        # learn it ended (cut earlier, they would find it still running); frozen, they wait.
        streams = list(self._streams.pop(path, ())) if in_use else []
        for s in streams:
            s.cut = True
        # A handler in use (attach, watch, a wait relayed to a process) ends when the host closes
        # its side; the host's reader then sees the end (a call already sent is still answered).
        for s in streams:
            with contextlib.suppress(OSError, RuntimeError):
                s.writer.write_eof()
        if streams:
            await asyncio.wait([asyncio.create_task(s.done.wait()) for s in streams], timeout=DROP_WAIT)
            for s in streams:
                s.writer.close()
        for conn in conns:
            with contextlib.suppress(OSError, RuntimeError):
                conn.writer.write_eof()
        for conn in conns:
            with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
                await asyncio.wait_for(conn.reader.read(), DROP_WAIT)
            conn.writer.close()

    def expire(self) -> None:
        """Close the connections kept for EXPIRY seconds; runs while any are kept."""
        self._timer = None
        now = time.monotonic()
        for path in list(self._conns):
            kept = self._conns[path]
            for since, conn in [k for k in kept if now - k[0] >= self.EXPIRY]:
                kept.remove((since, conn))
                conn.writer.close()
            if not kept:
                del self._conns[path]
        if self._conns:
            self._timer = asyncio.get_running_loop().call_later(self.EXPIRY / 2, self.expire)

    def close(self) -> None:
        """Close every kept connection (the client that kept them is going away)."""
        for kept in self._conns.values():
            for _, conn in kept:
                conn.writer.close()
        self._conns.clear()


def _reply(payload: bytes, conn: _Conn | None = None) -> dict[str, Any]:
    try:
        reply = protocol.decode_json(payload)
    except protocol.ProtocolError as exc:
        raise GuestUnavailable(f"malformed reply from the guest agent: {exc}") from None
    reuse = reply.pop("reuse", None) is True  # a connection matter, not part of the result
    if conn is not None:
        conn.reuse = reuse
    if reply.get("ok") is True:
        return reply
    error = reply.get("error")
    if not isinstance(error, dict):
        raise GuestUnavailable(f"malformed reply from the guest agent: {reply!r}")
    raise GuestError(str(error.get("code", "internal")), str(error.get("message", "")))


async def _read_frame(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """The next frame, or None if the agent closed the connection between frames."""
    try:
        header = await reader.readexactly(HEADER_SIZE)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise GuestUnavailable("connection to the guest agent closed inside a frame") from None
        return None
    except OSError as exc:
        raise GuestUnavailable(f"connection to the guest agent failed: {exc}") from exc
    kind, length = HEADER.unpack(header)
    if length > MAX_PAYLOAD:
        raise GuestUnavailable(f"frame of {length} bytes from the guest agent exceeds the limit")
    if not length:
        return kind, b""
    try:
        return kind, await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise GuestUnavailable("connection to the guest agent closed inside a frame") from None
    except OSError as exc:
        raise GuestUnavailable(f"connection to the guest agent failed: {exc}") from exc


async def _final_reply(reader: asyncio.StreamReader, conn: _Conn | None = None) -> dict[str, Any]:
    """Skip data frames up to the final `J` frame and return it (or raise its error)."""
    while True:
        frame = await _read_frame(reader)
        if frame is None:
            raise GuestUnavailable("the guest agent closed the connection without a reply")
        if frame[0] == KIND_JSON:
            return _reply(frame[1], conn)


async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


async def _send_request(writer: asyncio.StreamWriter, op: str, fields: dict[str, Any]) -> None:
    """Send an operation's request frame; a broken connection is the guest being unavailable."""
    try:
        await _send(writer, _request(op, fields))
    except OSError as exc:
        raise GuestUnavailable(f"connection to the guest agent failed: {exc}") from exc


async def _chunks(source: ByteSource) -> AsyncIterator[bytes]:
    """Any byte source as an async iterator of pieces of at most SEND_CHUNK bytes, none empty."""
    if isinstance(source, bytes | bytearray | memoryview):
        items: AsyncIterable[bytes] | Iterable[bytes] = [bytes(source)]
    else:
        items = source
    if isinstance(items, AsyncIterable):
        async for chunk in items:
            for i in range(0, len(chunk), SEND_CHUNK):
                yield chunk[i : i + SEND_CHUNK]
    else:
        for chunk in items:
            for i in range(0, len(chunk), SEND_CHUNK):
                yield chunk[i : i + SEND_CHUNK]


def _request(op: str, fields: dict[str, Any]) -> bytes:
    # Omitted and null fields mean the same to the agent; leave them out.
    return protocol.encode_json({"op": op, **{k: v for k, v in fields.items() if v is not None}})


def _open_socket_inode(path: str) -> int:
    """An O_PATH handle on the agent's socket, refusing symlinks.

    The socket's directory belongs to the sandbox's root, who could swap the socket for a symlink to
    a host socket; connecting through /proc/self/fd/N of a checked O_PATH handle cannot be redirected.
    """
    flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
    parent = os.open(os.path.dirname(path) or ".", flags | os.O_DIRECTORY)
    try:
        fd = os.open(os.path.basename(path), flags, dir_fd=parent)
    finally:
        os.close(parent)
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EPROTOTYPE, "not a socket (refusing to follow a symlink or file)")
    return fd


class GuestClient:
    def __init__(
        self,
        socket_path: str,
        connect_timeout: float = 5.0,
        idle: Idle | None = None,
        *,
        opener: Opener | None = None,
        key: str | None = None,
    ) -> None:
        """`opener`: connect through it instead of the unix socket at `socket_path` (then only a name
        for messages). `key`: what `idle` keeps this agent's connections under (default `socket_path`)."""
        self.socket_path = socket_path
        self.connect_timeout = connect_timeout
        self.idle = idle  # the node's kept connections; None: one connection per operation
        self.opener = opener
        self.key = key if key is not None else socket_path

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.opener is not None:
            try:
                return await asyncio.wait_for(self.opener(), self.connect_timeout)
            except (OSError, TimeoutError) as exc:
                why = str(exc) or "timed out"
                raise GuestUnavailable(f"cannot reach the guest agent at {self.socket_path}: {why}") from exc
        try:
            fd = _open_socket_inode(self.socket_path)
        except OSError as exc:
            raise GuestUnavailable(f"cannot connect to the guest agent at {self.socket_path}: {exc}") from exc
        try:
            return await asyncio.wait_for(
                asyncio.open_unix_connection(f"/proc/self/fd/{fd}", limit=READ_LIMIT), self.connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            raise GuestUnavailable(f"cannot connect to the guest agent at {self.socket_path}: {exc}") from exc
        finally:
            os.close(fd)

    @contextlib.asynccontextmanager
    async def _streaming(
        self, kept: bool = False
    ) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        """A connection of its own for a streamed operation, known to `idle` while it lasts (so a
        checkpoint can end it: CRIU cannot dump a socket whose peer is outside the sandbox).
        `kept`: a kept connection if there is one (its handler is then used up: never given back)."""
        conn = self.idle.take(self.key) if kept and self.idle is not None else None
        reader, writer = (conn.reader, conn.writer) if conn is not None else await self._open()
        s = self.idle.stream(self.key, writer) if self.idle is not None else None
        try:
            yield reader, writer
        finally:
            writer.close()
            if s is not None and self.idle is not None:
                self.idle.unstream(self.key, s)

    async def _lease(self) -> _Conn:
        """A kept connection to this agent, or a new one (for operations the agent may keep serving);
        known to `idle` as in use until released."""
        conn = self.idle.take(self.key) if self.idle is not None else None
        if conn is None:
            conn = _Conn(*await self._open())
        if self.idle is not None:
            conn.use = self.idle.stream(self.key, conn.writer)
        return conn

    def _release(self, conn: _Conn) -> None:
        use, conn.use = conn.use, None
        if use is not None and self.idle is not None:
            self.idle.unstream(self.key, use)
            if use.cut:
                conn.reuse = False
        if conn.reuse and self.idle is not None:
            self.idle.give(self.key, conn)
        else:
            conn.writer.close()

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """One simple operation (ping, stat, list, mkdir, remove, rename); returns the `ok` reply."""
        conn = await self._lease()
        try:
            await _send_request(conn.writer, op, fields)
            return await _final_reply(conn.reader, conn)
        finally:
            self._release(conn)

    async def ping(self) -> dict[str, Any]:
        return await self.call("ping")

    async def events(self, op: str, **fields: Any) -> AsyncIterator[dict[str, Any]]:
        """A request answered by `J` events, the last of which has `ok` (used by code contexts)."""
        async with self._streaming() as (reader, writer):
            await _send_request(writer, op, fields)
            while True:
                frame = await _read_frame(reader)
                if frame is None:
                    raise GuestUnavailable("the connection closed before the final reply")
                kind, payload = frame
                if kind != KIND_JSON:
                    continue
                message = protocol.decode_json(payload)
                if "ok" in message:
                    yield _reply(payload)
                    return
                yield message

    async def exec(
        self,
        cmd: str | None = None,
        argv: list[str] | None = None,
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        user: str | int | None = None,
        timeout: float | None = None,
        stdin: ByteSource | None = None,
    ) -> AsyncIterator[tuple[str, bytes | dict[str, Any]]]:
        """Run a command: yields ("stdout", bytes) / ("stderr", bytes) as produced, then ("exit", {...}).

        Closing the iterator early (aclose, or dropping it) closes the connection, which kills the
        command. An error before the command starts (bad cwd, unknown user) raises GuestError.
        """
        fields = {"cmd": cmd, "argv": argv, "cwd": cwd, "env": env, "user": user, "timeout": timeout}
        conn = await self._lease()
        stages.mark("connection")
        reader, writer = conn.reader, conn.writer
        feeder: asyncio.Task[None] | None = None
        try:
            await _send_request(writer, "exec", {**fields, "stdin": stdin is not None})
            if stdin is not None:
                feeder = asyncio.create_task(self._feed(writer, stdin))
            while True:
                try:
                    frame = await _read_frame(reader)
                except GuestUnavailable:
                    _raise_feeder_error(feeder)
                    raise
                if frame is None:
                    _raise_feeder_error(feeder)
                    raise GuestUnavailable("the guest agent closed the connection before the command ended")
                kind, payload = frame
                if kind == KIND_STDOUT:
                    yield "stdout", payload
                elif kind == KIND_STDERR:
                    yield "stderr", payload
                elif kind == KIND_JSON:
                    stages.mark("guest")  # the request sent, the command run, its reply read
                    reply = _reply(payload, conn)
                    yield "exit", {"exit_code": reply["exit_code"], "timed_out": reply["timed_out"]}
                    return
        finally:
            if feeder is not None:
                if not feeder.done():
                    feeder.cancel()
                    conn.reuse = False
                elif not feeder.cancelled():
                    feeder.exception()  # retrieved (and re-raised above where it mattered)
            self._release(conn)

    @staticmethod
    async def _feed(writer: asyncio.StreamWriter, stdin: ByteSource) -> None:
        """Send stdin as `0` frames, then the empty `0` frame (end of input)."""
        try:
            async for piece in _chunks(stdin):
                await _send(writer, protocol.encode_frame(KIND_STDIN, piece))
            await _send(writer, protocol.encode_frame(KIND_STDIN, b""))
        except OSError:
            pass  # the command ended and the agent is gone; the reader reports what happened
        except Exception:
            # The stdin source itself failed: abort the command rather than feed it a truncated
            # input as if it were complete. The exec iterator re-raises this error.
            writer.close()
            raise

    async def read(
        self, path: str, user: str | int | None = None, owner: str | int | None = None
    ) -> AsyncIterator[bytes]:
        """A file's bytes in chunks of at most 64 KiB. Errors (not_found, is_a_directory, ...) are
        raised by the first iteration step, before any chunk. `owner` (on every file operation):
        act with root's permissions, resolve relative paths in the owner's home and give what is
        created to the owner (e2b's envd semantics)."""
        conn = await self._lease()
        try:
            await _send_request(conn.writer, "read", {"path": path, "user": user, "owner": owner})
            while True:
                frame = await _read_frame(conn.reader)
                if frame is None:
                    raise GuestUnavailable("the guest agent closed the connection during a download")
                kind, payload = frame
                if kind == KIND_DATA:
                    if payload:
                        yield payload
                elif kind == KIND_JSON:
                    _reply(payload, conn)
                    return
        finally:
            self._release(conn)

    async def write(
        self,
        path: str,
        chunks: ByteSource,
        user: str | int | None = None,
        mode: int | None = None,
        xattrs: dict[str, str] | None = None,
        owner: str | int | None = None,
    ) -> dict[str, Any]:
        """Upload a file from `chunks`; returns the reply (`{"ok": True, "entry": {...}}`). `xattrs`
        (names under `user.`) are set on the new file, and its entry then lists its `xattrs`.

        If `chunks` raises, the connection is closed before the end-of-input frame, so the agent
        discards the partial upload and the error propagates.
        """
        conn = await self._lease()
        writer = conn.writer
        # Read concurrently: the agent may answer with an error (e.g. permission_denied) before it
        # has taken the data, and then we stop sending.
        replied = asyncio.create_task(_final_reply(conn.reader, conn))
        try:
            try:
                fields = {"path": path, "user": user, "mode": mode, "xattrs": xattrs, "owner": owner}
                await _send(writer, _request("write", fields))
                async for piece in _chunks(chunks):
                    if replied.done():
                        break
                    await _send(writer, protocol.encode_frame(KIND_STDIN, piece))
                else:
                    await _send(writer, protocol.encode_frame(KIND_STDIN, b""))
            except OSError as exc:
                # Our send failed: an error reply may have been sent just before; prefer it.
                with contextlib.suppress(TimeoutError, GuestUnavailable):
                    return await asyncio.wait_for(asyncio.shield(replied), 1.0)
                raise GuestUnavailable(f"connection to the guest agent failed: {exc}") from exc
            return await replied
        finally:
            if not replied.done():
                replied.cancel()
                conn.reuse = False
            elif not replied.cancelled():
                replied.exception()  # mark any error as retrieved; it was raised above if relevant
            self._release(conn)

    # --- background processes (see "Background processes" in docs/guest-protocol.md) ---------

    async def spawn(self, **fields: Any) -> dict[str, Any]:
        """Start a background process: `cmd` or `argv`, `cwd`, `env`, `user`, `stdin` (bool),
        `pty` ({rows, cols} or None), `tag`, `hold` (bool: read no output until the first blocking
        attach, for a caller that attaches next and must miss nothing). Returns {"id", "pid"} as
        soon as it runs."""
        reply = await self.call("spawn", **fields)
        return {"id": reply["id"], "pid": reply["pid"]}

    async def processes(self) -> list[dict[str, Any]]:
        """The background processes, running and recently exited, oldest first."""
        return list((await self.call("list_processes"))["processes"])

    async def attach(
        self, id: str, offset: int | None = None, block: bool = False
    ) -> AsyncIterator[tuple[str, bytes | dict[str, Any]]]:
        """A process's output from `offset` (None: the oldest byte kept): yields ("attached", {offset,
        truncated}) first, then ("stdout" | "stderr", bytes), possibly ("truncated", {offset, dropped})
        if this reader fell more than the agent's buffer behind, and ("exit", {exit_code, end_offset})
        once the process has exited and all its output was sent. Closing the iterator detaches; the
        process is not touched. `offset=-1`: live output only. `block`: a reader that falls behind
        holds the process's output back (its writes block) instead of missing bytes.
        Unknown id: GuestError("not_found")."""
        fields: dict[str, Any] = {"id": id, "offset": offset, **({"block": True} if block else {})}
        async for item in self._attached("attach", fields):
            yield item

    async def spawn_attach(
        self, offset: int | None = None, block: bool = False, **fields: Any
    ) -> AsyncIterator[tuple[str, bytes | dict[str, Any]]]:
        """`spawn` and `attach` in one operation on one connection: yields ("spawned", {id, pid})
        first, then what `attach` yields. A spawn error (bad cwd, unknown user) is raised by the
        first iteration step; closing the iterator detaches (the process is not touched)."""
        attach = {"offset": offset, **({"block": True} if block else {})}
        async for kind, data in self._attached("spawn", {**fields, "attach": attach}):
            if kind == "spawn reply":  # an agent from before `attach` (a sealed template's): attach now
                spawned = {"id": data["id"], "pid": data["pid"]}  # type: ignore[index]
                yield "spawned", spawned
                async for item in self.attach(spawned["id"], offset=offset, block=block):
                    yield item
                return
            yield kind, data

    async def _attached(
        self, op: str, fields: dict[str, Any]
    ) -> AsyncIterator[tuple[str, bytes | dict[str, Any]]]:
        # A spawn's handler becomes the process's supervisor: a kept one saves forking a handler.
        async with self._streaming(kept=op == "spawn") as (reader, writer):
            await _send_request(writer, op, fields)
            while True:
                frame = await _read_frame(reader)
                if frame is None:
                    raise GuestUnavailable("the guest agent closed the connection before the process ended")
                kind, payload = frame
                if kind == KIND_STDOUT:
                    yield "stdout", payload
                elif kind == KIND_STDERR:
                    yield "stderr", payload
                elif kind == KIND_JSON:
                    event = _event(payload)
                    if event is not None:
                        yield str(event["event"]), event
                        continue
                    reply = _reply(payload)
                    if op == "spawn" and "exit_code" not in reply:
                        yield "spawn reply", reply
                        return
                    yield "exit", {"exit_code": reply["exit_code"], "end_offset": reply["end_offset"]}
                    return

    async def input(self, id: str, data: ByteSource) -> None:
        """Write to a process's stdin (or terminal). GuestError("conflict") if it has exited or its
        stdin is not open."""
        reader, writer = await self._open()
        replied = asyncio.create_task(_final_reply(reader))
        try:
            try:
                await _send(writer, _request("input", {"id": id}))
                async for piece in _chunks(data):
                    if replied.done():
                        break
                    await _send(writer, protocol.encode_frame(KIND_STDIN, piece))
                else:
                    await _send(writer, protocol.encode_frame(KIND_STDIN, b""))
            except OSError as exc:
                with contextlib.suppress(TimeoutError, GuestUnavailable):
                    await asyncio.wait_for(asyncio.shield(replied), 1.0)
                    return
                raise GuestUnavailable(f"connection to the guest agent failed: {exc}") from exc
            await replied
        finally:
            if not replied.done():
                replied.cancel()
            elif not replied.cancelled():
                replied.exception()
            writer.close()

    async def close_stdin(self, id: str) -> None:
        await self.call("close_stdin", id=id)

    async def signal(self, id: str, sig: str | int) -> None:
        """Send a signal ("SIGTERM", "SIGKILL", "SIGINT", ... or a number) to the process's group."""
        await self.call("signal", id=id, signal=sig)

    async def kill(self, id: str) -> None:
        await self.call("kill", id=id)

    async def resize(self, id: str, rows: int, cols: int) -> None:
        await self.call("resize", id=id, rows=rows, cols=cols)

    async def wait(self, id: str, timeout: float | None = None) -> dict[str, Any]:
        """{"running", "exit_code"} once the process exits or `timeout` seconds passed."""
        reply = await self.call("wait", id=id, timeout=timeout)
        return {"running": reply["running"], "exit_code": reply["exit_code"]}

    async def watch(
        self,
        path: str,
        recursive: bool = False,
        user: str | int | None = None,
        owner: str | int | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """File system events under a directory: yields {"event": "watching"} once the watch is in
        place, then {"event": "watch", "type", "path", "is_dir"[, "old_path"]} per change (and
        {"event": "overflow"} if events were lost). Ends when the directory itself is removed;
        closing the iterator stops watching. Errors (not_found, not_a_directory, ...) are raised by
        the first iteration step."""
        async with self._streaming() as (reader, writer):
            await _send_request(
                writer, "watch", {"path": path, "recursive": recursive, "user": user, "owner": owner}
            )
            while True:
                frame = await _read_frame(reader)
                if frame is None:
                    raise GuestUnavailable("the guest agent closed the connection during a watch")
                kind, payload = frame
                if kind != KIND_JSON:
                    continue
                event = _event(payload)
                if event is None:
                    _reply(payload)
                    return
                yield event


def _event(payload: bytes) -> dict[str, Any] | None:
    """A streamed event frame (`{"event": ...}`), or None for the final reply."""
    try:
        obj = protocol.decode_json(payload)
    except protocol.ProtocolError as exc:
        raise GuestUnavailable(f"malformed reply from the guest agent: {exc}") from None
    if "ok" not in obj and isinstance(obj.get("event"), str):
        return obj
    return None


def _raise_feeder_error(feeder: asyncio.Task[None] | None) -> None:
    """If the stdin source failed (and so the connection was aborted), raise its error."""
    if feeder is not None and feeder.done() and not feeder.cancelled():
        exc = feeder.exception()
        if exc is not None:
            raise exc
