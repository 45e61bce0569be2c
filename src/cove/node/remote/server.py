"""The node's side of the node API: serves one `NodeAgent` to API servers over TCP (cove.node.remote).

Each connection begins with one request line carrying the node's token. A call's connection then
carries more request lines, each answered by one reply line; a tunnel's carries the spliced bytes of
the guest agent's socket, a context bridge's, or a port inside a sandbox once its `{"ok": true}` line
is sent. Everything the client sends is checked here (the call's name against an allow-list built from
the contract, each argument's type, ids' charset, ports' range) before the node sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ssl import SSLContext
from typing import Any

from cove.network.sandbox_socket import PortNotOpen, SandboxGone
from cove.node.base import NodeAgent, NodeError, SandboxSpec
from cove.node.guest_client import DROP_WAIT, READ_LIMIT, GuestClient, GuestUnavailable
from cove.node.remote import wire
from cove.node.runtimes import NAMES

log = logging.getLogger("cove.node.remote")

ID = re.compile(r"[a-z0-9-]{1,64}")
SHORT = 256  # longest runtime or user name accepted
SPLICE_CHUNK = 256 * 1024  # one read per chunk: large, so a bulk transfer costs few wakeups
FIRST_LINE_TIMEOUT = 10.0  # a connection that says nothing is dropped
# How long a call connection waits for its next request: well above the client's pool expiry, so the
# node never closes a connection the client is about to reuse.
IDLE_TIMEOUT = 120.0
# Calls that freeze or dump a sandbox: a guest tunnel whose client has finished must have closed its
# handler's socket first (CRIU refuses a socket whose peer is outside the sandbox).
FREEZES = {"pause", "checkpoints.hibernate", "checkpoints.snapshot_with_memory"}


class BadRequest(Exception):
    """A request that does not fit the API (its message says what is wrong)."""


# -- the allow-list ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    part: str | None  # None: the node itself; else volumes, snapshots, checkpoints, contexts, network
    name: str
    params: tuple[str, ...]
    kind: str  # "async" (awaited), "sync" (called), "attr" (read), "describe"


def _calls() -> dict[str, Call]:
    table: dict[str, Call] = {}

    def add(dotted: str, *params: str, kind: str = "async") -> None:
        part, _, name = dotted.rpartition(".")
        table[dotted] = Call(part or None, name, params, kind)

    # NodeAgent's abstract methods, less start/close (the node's own process runs them) and guest
    # (a tunnel); plus `generation` and `describe` (the sync answers, fetched at once).
    add("create", "spec")
    add("restart", "spec")
    add("stop", "sandbox_id")
    add("kill", "sandbox_id", "handle")
    add("alive", "sandbox_id", "handle")
    add("dead", "sandboxes")
    add("pause", "sandbox_id")
    add("resume", "sandbox_id")
    add("configure", "spec", "thaw")
    add("stats", "sandbox_id")
    add("sweep", "keep")
    add("base_template")
    add("runtime_problem", "runtime", kind="sync")
    add("egress", "runtime", kind="sync")
    add("generation", kind="attr")
    add("describe", kind="describe")
    add("volumes.create", "volume_id", "size_mb")
    add("volumes.clone", "sealed_id", "volume_id", "size_mb")
    add("volumes.delete", "volume_id")
    add("volumes.delete_sealed", "sealed_ids")
    add("volumes.ids")
    add("volumes.buckets_available", kind="sync")
    add("volumes.buckets_healthy", "sandbox_id", "indices")
    add("volumes.limits", kind="attr")
    add("snapshots.commit", "sandbox_id", "layer_id", "seal")  # not templates: builds stay on the API server
    add("snapshots.flatten", "layers", "layer_id")
    add("snapshots.collect", "keep")
    add("checkpoints.available", "runtime", kind="sync")
    add("checkpoints.hibernate", "sandbox_id", "handle")
    add("checkpoints.snapshot_with_memory", "sandbox_id", "handle", "key", "layer_id", "seal")
    add("checkpoints.restore", "spec", "key", "resume")
    add("checkpoints.has", "key")
    add("checkpoints.drop", "key")
    add("checkpoints.keys")
    add("durable.seal", "sandbox_id", "layer_id")
    add("durable.push", "layers", "checkpoint", "store_as", "parent_layer", "parent_checkpoint")
    add("durable.pull", "layers", "checkpoint")
    add("durable.forget", "layers", "keys")
    add("durable.collect", "layers", "keys", "older_than_s")
    add("contexts.prepare", "sandbox_id", "context_id", "user")  # contexts.client: a tunnel
    add("contexts.status", kind="attr")
    add("network.attach", "sandbox_id", "handle", "network")
    add("network.detach", "sandbox_id", "forget")
    add("network.set_policy", "sandbox_id", "network")
    add("network.status", "sandbox_id")  # network.connect: a tunnel
    return table


CALLS = _calls()


# -- argument checks, by parameter name (the contract names its parameters consistently) ----------
def ident(value: Any, what: str) -> str:
    if not isinstance(value, str) or not ID.fullmatch(value):
        raise BadRequest(f"{what} must be a string of 1 to 64 of a-z, 0-9 and -")
    return value


def _maybe_ident(value: Any, what: str) -> None:
    if value is not None:
        ident(value, what)


def _short(value: Any, what: str) -> None:
    if not isinstance(value, str) or not 0 < len(value) <= SHORT:
        raise BadRequest(f"{what} must be a string of 1 to {SHORT} characters")


def _bool(value: Any, what: str) -> None:
    if not isinstance(value, bool):
        raise BadRequest(f"{what} must be true or false")


def _count(value: Any, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadRequest(f"{what} must be a non-negative integer")


def _object(value: Any, what: str) -> None:
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be an object")


def _spec(value: Any, what: str) -> None:
    if not isinstance(value, SandboxSpec):
        raise BadRequest(f"{what} must be a SandboxSpec")
    ident(value.id, f"{what}.id")
    for layer in value.template.layers:
        ident(layer, f"{what}.template.layers[]")
    _short(value.runtime, f"{what}.runtime")


def _handle(value: Any, what: str) -> None:
    if value is not None:
        _object(value, what)


def _size(value: Any, what: str) -> None:
    if value is not None:
        _count(value, what)


def _ids(value: Any, what: str, kinds: tuple[type, ...] = (list,)) -> None:
    if not isinstance(value, kinds):
        raise BadRequest(f"{what} must be a {' or '.join(k.__name__ for k in kinds)} of ids")
    for item in value:
        ident(item, f"{what}[]")


def _sandboxes(value: Any, what: str) -> None:
    if not isinstance(value, list):
        raise BadRequest(f"{what} must be a list of (id, handle) pairs")
    for pair in value:
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise BadRequest(f"{what} must be a list of (id, handle) pairs")
        ident(pair[0], f"{what}[][0]")
        _object(pair[1], f"{what}[][1]")


def _seal(value: Any, what: str) -> None:
    if not isinstance(value, tuple):
        raise BadRequest(f"{what} must be a tuple of (volume id, sealed id) pairs")
    for pair in value:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise BadRequest(f"{what} must be a tuple of (volume id, sealed id) pairs")
        ident(pair[0], f"{what}[][0]")
        ident(pair[1], f"{what}[][1]")


def _seconds(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e9:
        raise BadRequest(f"{what} must be a number of seconds, 0 or more")


def _indices(value: Any, what: str) -> None:
    if not isinstance(value, list):
        raise BadRequest(f"{what} must be a list of integers")
    for i in value:
        _count(i, f"{what}[]")


CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "sandbox_id": ident,
    "volume_id": ident,
    "sealed_id": ident,
    "layer_id": ident,
    "key": ident,
    "context_id": ident,
    "spec": _spec,
    "handle": _handle,
    "network": _object,
    "runtime": _short,
    "user": _short,
    "thaw": _bool,
    "forget": _bool,
    "resume": _bool,
    "size_mb": _size,
    "sandboxes": _sandboxes,
    "keep": lambda v, what: _ids(v, what, (set,)),
    "sealed_ids": _ids,
    "layers": _ids,
    "keys": _ids,
    "parent_layer": _maybe_ident,
    "checkpoint": _maybe_ident,
    "store_as": _maybe_ident,
    "parent_checkpoint": _maybe_ident,
    "indices": _indices,
    "older_than_s": _seconds,
    "seal": _seal,
}


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "code": code, "message": message}


# -- splicing -----------------------------------------------------------------------------------------
Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def splice(a: Stream, b: Stream, a_done: Callable[[], None] | None = None) -> None:
    """Copy bytes both ways between two connections until both directions have ended. The end of one
    direction is passed on as a half-close (write_eof) where the transport has one (TCP, unix; not
    TLS: there the other end is closed), so a peer that finishes sending still gets its answer;
    an error on either side closes both. `a_done`: called once `a` has sent all it will send."""

    def abort() -> None:
        a[1].close()
        b[1].close()

    async def pump(
        src: asyncio.StreamReader, dst: asyncio.StreamWriter, done: Callable[[], None] | None
    ) -> None:
        try:
            while data := await src.read(SPLICE_CHUNK):
                dst.write(data)
                await dst.drain()
        except OSError:  # reset, broken pipe: nothing more can pass either way
            abort()
            return
        if done is not None:
            done()
        if dst.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                dst.write_eof()
        else:
            dst.close()

    tasks = [
        asyncio.create_task(pump(a[0], b[1], a_done)),
        asyncio.create_task(pump(b[0], a[1], None)),
    ]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        abort()


@dataclass(eq=False)
class _GuestTunnel:
    """A guest tunnel, known per sandbox, so that a freeze can wait for the ones whose client left."""

    finished: bool = False  # the client sent all it will: the handler behind is about to exit
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


# -- the server -------------------------------------------------------------------------------------
class NodeServer:
    """Serves `node` on host:port (0: any free port) to clients that present `token`; TLS with `ssl`."""

    def __init__(
        self,
        node: NodeAgent,
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl: SSLContext | None = None,
    ) -> None:
        if not token:
            raise ValueError("a node server needs a token")
        self.node = node
        self._token = token.encode()
        self.host = host
        self._port = port
        self.ssl = ssl
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()  # one per open connection
        self._guest_tunnels: dict[str, set[_GuestTunnel]] = {}

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve,
            self.host,
            self._port,
            ssl=self.ssl,
            limit=wire.LINE_LIMIT,
            ssl_handshake_timeout=FIRST_LINE_TIMEOUT if self.ssl else None,
        )
        self._port = int(self._server.sockets[0].getsockname()[1])  # the one bound, if 0 was asked
        log.info("node API listening", extra={"address": self.address, "tls": self.ssl is not None})

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the node server is not started")
        return self._port

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def close(self) -> None:
        """Stop listening and end every connection, calls in progress and tunnels alike."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # -- connections -----------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = str(writer.get_extra_info("peername"))
        try:
            timeout = FIRST_LINE_TIMEOUT
            while (request := await self._request(reader, writer, timeout, peer)) is not None:
                if "tunnel" in request:
                    await self._tunnel(request, (reader, writer), peer)
                    return
                writer.write(self._encoded(await self._call(request, peer)))
                await writer.drain()
                timeout = IDLE_TIMEOUT
        except OSError:
            pass  # the client went away
        except Exception:
            log.exception("node API connection failed", extra={"peer": peer})
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float, peer: str
    ) -> dict[str, Any] | None:
        """The next authorized request line, or None when the connection is to end (answered if
        there is anything to say)."""
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\n"), timeout)
        except asyncio.IncompleteReadError as e:
            if e.partial:
                log.info("node API: connection closed inside a request line", extra={"peer": peer})
            return None
        except asyncio.LimitOverrunError:
            log.warning("node API: request line too long", extra={"peer": peer})
            await self._refuse(writer, "bad_request", f"a request line has at most {wire.LINE_LIMIT} bytes")
            return None
        except TimeoutError:
            if timeout == FIRST_LINE_TIMEOUT:
                log.info("node API: no request in time", extra={"peer": peer})
            return None
        try:
            request = wire.parse(raw)
        except wire.WireError as e:
            log.warning("node API: malformed request line", extra={"peer": peer, "error": str(e)})
            await self._refuse(writer, "bad_request", str(e))
            return None
        token = request.get("token")
        if not isinstance(token, str) or not hmac.compare_digest(token.encode(), self._token):
            log.warning("node API: refused a request without the node's token", extra={"peer": peer})
            await self._refuse(writer, "unauthorized", "the node's token is missing or wrong")
            return None
        return request

    async def _refuse(self, writer: asyncio.StreamWriter, code: str, message: str) -> None:
        with contextlib.suppress(OSError):
            writer.write(wire.line(_error(code, message)))
            await writer.drain()

    @staticmethod
    def _encoded(reply: dict[str, Any]) -> bytes:
        try:
            return wire.line(reply)
        except wire.WireError as e:
            log.error("node API: a result could not be encoded", extra={"error": str(e)})
            return wire.line(_error("internal", f"the node's answer could not be sent: {e}"))

    # -- calls -----------------------------------------------------------------------------------
    async def _call(self, request: dict[str, Any], peer: str) -> dict[str, Any]:
        name = request.get("call")
        if not isinstance(name, str):
            return _error("bad_request", "a request names a call or a tunnel")
        call = CALLS.get(name)
        if call is None:
            return _error("bad_request", f"unknown call {name[:100]!r}")
        try:
            run = self._prepare(call, request.get("args", {}))
        except (BadRequest, wire.WireError, RecursionError) as e:
            log.info("node API: bad call", extra={"peer": peer, "call": name, "error": str(e)})
            return _error("bad_request", f"{name}: {e}")
        started = time.perf_counter()
        try:
            if name in FREEZES:
                await self._finished_tunnels(run.keywords["sandbox_id"])
            result = await run()
        except NodeError as e:
            return _error("node_error", str(e))
        except ValueError as e:  # the node's own check of a value (e.g. a volume id)
            return _error("value_error", str(e))
        except OSError as e:
            return _error("node_error", str(e) or type(e).__name__)
        except Exception as e:
            log.exception("node API: call failed", extra={"call": name})
            return _error("internal", f"{type(e).__name__}: {e}")
        log.debug(
            "node API call", extra={"call": name, "ms": round((time.perf_counter() - started) * 1000, 2)}
        )
        try:
            return {"ok": True, "result": wire.encode(result)}
        except wire.WireError as e:
            log.error("node API: a result could not be encoded", extra={"call": name, "error": str(e)})
            return _error("internal", f"the node's answer to {name} could not be sent: {e}")

    def _prepare(self, call: Call, raw_args: Any) -> _Run:
        """The call, its arguments decoded and checked; raises BadRequest."""
        if not isinstance(raw_args, dict):
            raise BadRequest("args must be an object")
        args = {k: wire.decode(v) for k, v in raw_args.items()}
        for key, value in args.items():
            if key not in call.params:
                raise BadRequest(f"unexpected argument {key[:64]!r}")
            CHECKS[key](value, key)
        if call.kind == "describe":
            return _Run(self._describe, args, call.kind)
        target = self.node if call.part is None else getattr(self.node, call.part)
        if call.kind == "attr":
            return _Run(lambda: getattr(target, call.name), args, call.kind)
        method = getattr(target, call.name)
        try:
            inspect.signature(method).bind(**args)
        except TypeError as e:
            raise BadRequest(str(e)) from None
        return _Run(method, args, call.kind)

    def _describe(self) -> dict[str, Any]:
        """What the contract's sync methods and attributes answer now, for the client to answer from."""
        n = self.node
        return {
            "runtimes": {r: n.runtime_problem(r) for r in NAMES},
            "egress": {r: n.egress(r) for r in NAMES},
            "checkpoints": {r: n.checkpoints.available(r) for r in NAMES},
            "durable": n.durable.available(),
            "buckets_available": n.volumes.buckets_available(),
            "volume_limits": n.volumes.limits,
            "contexts_status": n.contexts.status,
            "generation": n.generation,
        }

    async def _finished_tunnels(self, sandbox_id: str) -> None:
        """Wait (briefly) for the guest tunnels whose client is done to close their handlers' sockets."""
        waiting = [
            t.done for t in self._guest_tunnels.get(sandbox_id, ()) if t.finished and not t.done.done()
        ]
        if waiting:
            await asyncio.wait(waiting, timeout=DROP_WAIT)

    # -- tunnels ---------------------------------------------------------------------------------
    async def _tunnel(self, request: dict[str, Any], client: Stream, peer: str) -> None:
        writer = client[1]
        kind = request.get("tunnel")
        try:
            sandbox_id = ident(request.get("sandbox"), "sandbox")
            opening = self._opener(kind, sandbox_id, request)
        except BadRequest as e:
            log.info("node API: bad tunnel", extra={"peer": peer, "error": str(e)})
            await self._refuse(writer, "bad_request", str(e))
            return
        try:
            inside = await opening
        except GuestUnavailable as e:
            await self._refuse(writer, "guest_unavailable", str(e))
            return
        except PortNotOpen as e:
            await self._refuse(writer, "port_not_open", str(e))
            return
        except SandboxGone as e:
            await self._refuse(writer, "sandbox_gone", str(e))
            return
        except TimeoutError as e:
            await self._refuse(
                writer, "timeout", str(e) or f"connecting inside sandbox {sandbox_id} timed out"
            )
            return
        except (NodeError, OSError) as e:
            await self._refuse(writer, "node_error", str(e))
            return
        except Exception as e:
            log.exception("node API: opening a tunnel failed", extra={"tunnel": kind})
            await self._refuse(writer, "internal", f"{type(e).__name__}: {e}")
            return
        tunnel = _GuestTunnel()
        tunnels = self._guest_tunnels.setdefault(sandbox_id, set()) if kind == "guest" else set()
        tunnels.add(tunnel)
        try:
            writer.write(b'{"ok":true}\n')
            await writer.drain()

            def finished() -> None:
                tunnel.finished = True

            await splice(client, inside, finished)
        finally:
            inside[1].close()
            tunnel.done.set_result(None)
            tunnels.discard(tunnel)
            if not tunnels and self._guest_tunnels.get(sandbox_id) is tunnels:
                del self._guest_tunnels[sandbox_id]

    def _opener(self, kind: Any, sandbox_id: str, request: dict[str, Any]) -> Awaitable[Stream]:
        """The connection a tunnel leads to, opening (raises BadRequest before anything is opened)."""
        if kind == "guest":
            # As the node's own guest client opens it (a checked O_PATH handle on the agent's socket).
            return self._open_guest(self.node.guest(sandbox_id))
        if kind == "context":
            context_id = ident(request.get("context"), "context")
            return self._open_guest(self.node.contexts.client(sandbox_id, context_id))
        if kind == "port":
            handle, port = request.get("handle"), request.get("port")
            _object(handle, "handle")
            if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
                raise BadRequest("port must be an integer from 1 to 65535")
            return self._open_port(sandbox_id, handle, port)
        raise BadRequest(f"unknown tunnel {str(kind)[:40]!r} (guest, context or port)")

    @staticmethod
    async def _open_guest(client: GuestClient) -> Stream:
        return await client._open()

    async def _open_port(self, sandbox_id: str, handle: dict[str, Any], port: int) -> Stream:
        sock = await self.node.network.connect(sandbox_id, handle, port)
        try:
            return await asyncio.open_connection(sock=sock, limit=READ_LIMIT)
        except BaseException:
            sock.close()
            raise


@dataclass
class _Run:
    """A checked call, ready to run."""

    fn: Callable[..., Any]
    keywords: dict[str, Any]
    kind: str

    async def __call__(self) -> Any:
        result = self.fn(**self.keywords)
        if self.kind == "async":
            result = await result
        return result
