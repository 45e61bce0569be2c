"""The API server's side of the node API: `RemoteNode`, a `NodeAgent` whose node is elsewhere.

Every contract method is a call on a kept connection (a small pool per node); `guest`,
`contexts.client` and `network.connect` open tunnels. The contract's sync methods and attributes
(`runtime_problem`, `egress`, `generation`, `checkpoints.available`, `volumes.buckets_available`,
`volumes.limits`, `contexts.status`) cannot wait for the network, so they answer from the node's
`describe` snapshot, fetched by `start()` and again by `refresh()`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from ssl import SSLContext
from typing import Any, NoReturn

from cove.network.sandbox_socket import PortNotOpen, SandboxGone
from cove.node.base import Handle, NodeAgent, NodeError, SandboxSpec, Seal, TemplateSpec
from cove.node.guest_client import READ_LIMIT, GuestClient, GuestUnavailable, Idle
from cove.node.remote import wire
from cove.node.remote.server import splice

log = logging.getLogger("cove.node.remote")

CONNECT_TIMEOUT = 10.0  # to open a connection to the node (a call's own wait is RemoteNode.timeout)


def split_address(address: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6]:port"."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"a node address is host:port, not {address!r}")
    return host.strip("[]"), int(port)


class _CallConn:
    __slots__ = ("reader", "since", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.since = 0.0


class RemoteNode(NodeAgent):
    """The node `node_id` at `address` ("host:port"), reached with `token` (over TLS with `ssl`).
    `timeout`: the longest wait for one call's answer."""

    # Idle call connections kept (and for how long): a call on a kept connection saves a connect and,
    # with TLS, a handshake. Expiry is well inside the server's IDLE_TIMEOUT.
    POOL_MOST = 4
    POOL_EXPIRY = 30.0

    def __init__(
        self, node_id: str, address: str, token: str, ssl: SSLContext | None = None, timeout: float = 60.0
    ) -> None:
        self.node_id = node_id
        self.address = address
        self.host, self.port = split_address(address)
        self._token = token
        self.ssl = ssl
        self.timeout = timeout
        self.connect_timeout = min(CONNECT_TIMEOUT, timeout)
        self.idle = Idle()  # guest connections (tunnels) kept between operations, as LocalNode does
        self._pool: list[_CallConn] = []
        self._described: dict[str, Any] | None = None
        self._relays: set[asyncio.Task[None]] = set()  # TLS port tunnels' local ends
        self.volumes = RemoteVolumes(self)
        self.snapshots = RemoteSnapshots(self)
        self.checkpoints = RemoteCheckpoints(self)
        self.contexts = RemoteContexts(self)
        self.network = RemoteNetwork(self)
        self.durable = RemoteDurable(self)

    # -- transport -------------------------------------------------------------------------------
    def unreachable(self, exc: BaseException) -> NodeError:
        why = str(exc) or ("no answer in time" if isinstance(exc, TimeoutError) else type(exc).__name__)
        return NodeError(f"node {self.node_id} at {self.address} unreachable: {why}")

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=self.ssl, limit=READ_LIMIT),
            self.connect_timeout,
        )

    async def _lease(self) -> tuple[_CallConn, bool]:
        """A kept call connection (True) or a new one (False)."""
        now = time.monotonic()
        while self._pool:
            conn = self._pool.pop()
            if (
                now - conn.since < self.POOL_EXPIRY
                and not conn.reader.at_eof()
                and not conn.writer.is_closing()
            ):
                return conn, True
            conn.writer.close()
        try:
            return _CallConn(*await self._connect()), False
        except (OSError, TimeoutError) as e:
            raise self.unreachable(e) from e

    def _release(self, conn: _CallConn) -> None:
        if len(self._pool) >= self.POOL_MOST:
            conn.writer.close()
            return
        conn.since = time.monotonic()
        self._pool.append(conn)

    async def call(self, name: str, *, wait: float | None = None, **args: Any) -> Any:
        """Run `name` (a dotted contract name) on the node; returns its result, raises its NodeError.
        `wait`: the longest wait for its answer, where longer than `timeout` (a transfer)."""
        request = wire.line(
            {"token": self._token, "call": name, "args": {k: wire.encode(v) for k, v in args.items()}}
        )
        while True:
            conn, kept = await self._lease()
            try:
                conn.writer.write(request)
                await conn.writer.drain()
                raw = await asyncio.wait_for(conn.reader.readuntil(b"\n"), max(wait or 0, self.timeout))
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
                conn.writer.close()
                # A kept connection the node closed meanwhile (it restarted): nothing of the request
                # was answered, so it goes again on a new connection (the contract's calls are made
                # to be retried: ids chosen by the caller, idempotent removals).
                silent = isinstance(e, asyncio.IncompleteReadError) and not e.partial
                if kept and (silent or isinstance(e, ConnectionResetError | BrokenPipeError)):
                    continue
                raise self.unreachable(e) from e
            except BaseException:
                conn.writer.close()  # cancelled mid-call: the connection's state is unknown
                raise
            try:
                reply = wire.parse(raw)
            except wire.WireError as e:
                conn.writer.close()
                raise NodeError(f"node {self.node_id} at {self.address} sent a malformed reply: {e}") from e
            if reply.get("ok") is True:
                self._release(conn)
                try:
                    return wire.decode(reply.get("result"))
                except wire.WireError as e:
                    raise NodeError(f"node {self.node_id} sent a malformed result for {name}: {e}") from e
            code, message = str(reply.get("code", "internal")), str(reply.get("message", ""))
            if code == "unauthorized":
                conn.writer.close()  # the node closes it
            else:
                self._release(conn)
            self._raise(name, code, message)

    def _raise(self, name: str, code: str, message: str) -> NoReturn:
        if code == "node_error":
            raise NodeError(message)
        if code == "value_error":
            raise ValueError(message)
        raise NodeError(f"node {self.node_id} at {self.address}: {name}: {code}: {message}")

    async def _open_tunnel(
        self, request: dict[str, Any]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection whose node end is spliced to what `request` names; raises GuestUnavailable
        (naming the node) or, for the reply's error code, `_TunnelRefused`."""
        try:
            reader, writer = await self._connect()
        except (OSError, TimeoutError) as e:
            raise GuestUnavailable(str(self.unreachable(e))) from e
        try:
            writer.write(wire.line({"token": self._token, **request}))
            await writer.drain()
            # The StreamReader keeps whatever follows the reply line: it is the tunnel's first bytes.
            reply = wire.parse(await asyncio.wait_for(reader.readuntil(b"\n"), self.timeout))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, wire.WireError) as e:
            writer.close()
            raise GuestUnavailable(str(self.unreachable(e))) from e
        except BaseException:
            writer.close()
            raise
        if reply.get("ok") is not True:
            writer.close()
            raise _TunnelRefused(str(reply.get("code")), str(reply.get("message", "")))
        return reader, writer

    async def _guest_tunnel(
        self, request: dict[str, Any]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await self._open_tunnel(request)
        except _TunnelRefused as e:
            raise GuestUnavailable(f"node {self.node_id} at {self.address}: {e.code}: {e.message}") from None

    def guest_key(self, sandbox_id: str) -> str:
        return f"remote:{self.node_id}:{sandbox_id}"

    async def forget_connections(self, sandbox_id: str, wait: bool = True) -> None:
        """Close the sandbox's kept tunnels before it is frozen, dumped, stopped or killed, as LocalNode
        does. `wait`: until each handler closed its end, which the half-close through the tunnel tells;
        TLS has no half-close, so there the node waits for them before it freezes (NodeServer)."""
        await self.idle.drop(self.guest_key(sandbox_id), wait and self.ssl is None)

    # -- NodeAgent -------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.refresh()

    async def refresh(self) -> None:
        """Fetch the node's answers to the contract's sync methods again (generation, contexts' status…)."""
        described = await self.call("describe")
        if not isinstance(described, dict):
            raise NodeError(f"node {self.node_id} sent a malformed description")
        self._described = described

    def described(self, key: str) -> Any:
        if self._described is None:
            raise NodeError(f"node {self.node_id} is not started (RemoteNode.start)")
        return self._described.get(key)

    @property
    def generation(self) -> str:  # type: ignore[override]
        return str(self.described("generation"))

    def runtime_problem(self, runtime: str) -> str | None:
        problems: dict[str, str | None] = self.described("runtimes") or {}
        return problems.get(runtime, f"unknown runtime {runtime!r}")

    def egress(self, runtime: str) -> bool:
        return bool((self.described("egress") or {}).get(runtime, False))

    async def create(self, spec: SandboxSpec) -> Handle:
        result: Handle = await self.call("create", spec=spec)
        return result

    async def restart(self, spec: SandboxSpec) -> Handle:
        result: Handle = await self.call("restart", spec=spec)
        return result

    async def stop(self, sandbox_id: str) -> None:
        await self.forget_connections(sandbox_id, wait=False)
        await self.call("stop", sandbox_id=sandbox_id)

    async def kill(self, sandbox_id: str, handle: Handle | None = None) -> None:
        await self.forget_connections(sandbox_id, wait=False)
        await self.call("kill", sandbox_id=sandbox_id, handle=handle)

    async def alive(self, sandbox_id: str, handle: Handle) -> bool:
        return bool(await self.call("alive", sandbox_id=sandbox_id, handle=handle))

    async def dead(self, sandboxes: list[tuple[str, Handle]]) -> list[str]:
        result: list[str] = await self.call("dead", sandboxes=list(sandboxes))
        return result

    async def pause(self, sandbox_id: str) -> None:
        await self.forget_connections(sandbox_id)
        await self.call("pause", sandbox_id=sandbox_id)

    async def resume(self, sandbox_id: str) -> None:
        await self.call("resume", sandbox_id=sandbox_id)

    async def configure(self, spec: SandboxSpec, thaw: bool = False) -> None:
        await self.call("configure", spec=spec, thaw=thaw)

    async def stats(self, sandbox_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("stats", sandbox_id=sandbox_id)
        return result

    async def sweep(self, keep: set[str]) -> list[str]:
        result: list[str] = await self.call("sweep", keep=set(keep))
        return result

    def guest(self, sandbox_id: str) -> GuestClient:
        key = self.guest_key(sandbox_id)
        return GuestClient(
            key,
            idle=self.idle,
            opener=lambda: self._guest_tunnel({"tunnel": "guest", "sandbox": sandbox_id}),
            key=key,
        )

    async def base_template(self) -> TemplateSpec:
        result: TemplateSpec = await self.call("base_template")
        return result

    async def close(self) -> None:
        """Close the kept connections (calls' and tunnels'); the node and its sandboxes go on."""
        for conn in self._pool:
            conn.writer.close()
        self._pool.clear()
        self.idle.close()


class _TunnelRefused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RemoteVolumes:
    def __init__(self, node: RemoteNode) -> None:
        self.node = node

    @property
    def limits(self) -> bool:
        return bool(self.node.described("volume_limits"))

    async def create(self, volume_id: str, size_mb: int | None) -> None:
        await self.node.call("volumes.create", volume_id=volume_id, size_mb=size_mb)

    async def clone(self, sealed_id: str, volume_id: str, size_mb: int | None) -> None:
        await self.node.call("volumes.clone", sealed_id=sealed_id, volume_id=volume_id, size_mb=size_mb)

    async def delete(self, volume_id: str) -> None:
        await self.node.call("volumes.delete", volume_id=volume_id)

    async def delete_sealed(self, sealed_ids: list[str]) -> None:
        await self.node.call("volumes.delete_sealed", sealed_ids=list(sealed_ids))

    async def ids(self) -> tuple[set[str], set[str]]:
        volumes, sealed = await self.node.call("volumes.ids")
        return set(volumes), set(sealed)

    def content_path(self, volume_id: str) -> str | None:
        return None  # on another host

    def buckets_available(self) -> bool:
        return bool(self.node.described("buckets_available"))

    async def buckets_healthy(self, sandbox_id: str, indices: list[int]) -> list[bool]:
        result: list[bool] = await self.node.call(
            "volumes.buckets_healthy", sandbox_id=sandbox_id, indices=list(indices)
        )
        return result


class RemoteSnapshots:
    def __init__(self, node: RemoteNode) -> None:
        self.node = node

    @property
    def templates(self) -> NoReturn:
        # Template builds write layers through local paths (TemplateStorage): not a call to serve.
        raise NodeError("template builds run on the API server's own node")

    async def commit(self, sandbox_id: str, layer_id: str, seal: Seal = ()) -> str:
        return str(
            await self.node.call("snapshots.commit", sandbox_id=sandbox_id, layer_id=layer_id, seal=seal)
        )

    async def flatten(self, layers: list[str], layer_id: str) -> str:
        return str(await self.node.call("snapshots.flatten", layers=list(layers), layer_id=layer_id))

    async def collect(self, keep: set[str]) -> list[str]:
        result: list[str] = await self.node.call("snapshots.collect", keep=set(keep))
        return result


class RemoteCheckpoints:
    def __init__(self, node: RemoteNode) -> None:
        self.node = node

    def available(self, runtime: str = "namespaces") -> bool:
        return bool((self.node.described("checkpoints") or {}).get(runtime, False))

    async def hibernate(self, sandbox_id: str, handle: Handle) -> None:
        await self.node.forget_connections(sandbox_id)
        await self.node.call("checkpoints.hibernate", sandbox_id=sandbox_id, handle=handle)

    async def snapshot_with_memory(
        self, sandbox_id: str, handle: Handle, key: str, layer_id: str, seal: Seal = ()
    ) -> str:
        await self.node.forget_connections(sandbox_id)
        return str(
            await self.node.call(
                "checkpoints.snapshot_with_memory",
                sandbox_id=sandbox_id,
                handle=handle,
                key=key,
                layer_id=layer_id,
                seal=seal,
            )
        )

    async def restore(self, spec: SandboxSpec, key: str, resume: bool) -> Handle:
        result: Handle = await self.node.call("checkpoints.restore", spec=spec, key=key, resume=resume)
        return result

    async def has(self, key: str) -> bool:
        return bool(await self.node.call("checkpoints.has", key=key))

    async def drop(self, key: str) -> None:
        await self.node.call("checkpoints.drop", key=key)

    async def keys(self) -> set[str]:
        return set(await self.node.call("checkpoints.keys"))


class RemoteDurable:
    TRANSFER_WAIT = 3600.0  # a push or pull moves whole layers: minutes for large ones

    def __init__(self, node: RemoteNode) -> None:
        self.node = node

    def available(self) -> bool:
        return bool(self.node.described("durable"))

    async def seal(self, sandbox_id: str, layer_id: str) -> str:
        return str(await self.node.call("durable.seal", sandbox_id=sandbox_id, layer_id=layer_id))

    async def push(
        self,
        layers: list[str],
        checkpoint: str | None = None,
        store_as: str | None = None,
        parent_layer: str | None = None,
        parent_checkpoint: str | None = None,
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self.node.call(
            "durable.push",
            wait=self.TRANSFER_WAIT,
            layers=list(layers),
            checkpoint=checkpoint,
            store_as=store_as,
            parent_layer=parent_layer,
            parent_checkpoint=parent_checkpoint,
        )
        return result

    async def pull(self, layers: list[str], checkpoint: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = await self.node.call(
            "durable.pull", wait=self.TRANSFER_WAIT, layers=list(layers), checkpoint=checkpoint
        )
        return result

    async def forget(self, layers: list[str], keys: list[str]) -> None:
        await self.node.call("durable.forget", layers=list(layers), keys=list(keys))

    async def collect(self, layers: list[str], keys: list[str], older_than_s: float) -> dict[str, Any]:
        result: dict[str, Any] = await self.node.call(
            "durable.collect",
            wait=self.TRANSFER_WAIT,
            layers=list(layers),
            keys=list(keys),
            older_than_s=older_than_s,
        )
        return result


class RemoteContexts:
    def __init__(self, node: RemoteNode) -> None:
        self.node = node

    @property
    def status(self) -> str:
        return str(self.node.described("contexts_status"))

    async def prepare(self, sandbox_id: str, context_id: str, user: str) -> str:
        return str(
            await self.node.call("contexts.prepare", sandbox_id=sandbox_id, context_id=context_id, user=user)
        )

    def client(self, sandbox_id: str, context_id: str) -> GuestClient:
        request = {"tunnel": "context", "sandbox": sandbox_id, "context": context_id}
        return GuestClient(
            f"remote:{self.node.node_id}:{sandbox_id}:context:{context_id}",
            opener=lambda: self.node._guest_tunnel(request),
        )


class RemoteNetwork:
    def __init__(self, node: RemoteNode) -> None:
        self.node = node

    async def attach(self, sandbox_id: str, handle: Handle, network: dict[str, Any]) -> None:
        await self.node.call("network.attach", sandbox_id=sandbox_id, handle=handle, network=network)

    async def detach(self, sandbox_id: str, forget: bool = False) -> None:
        await self.node.call("network.detach", sandbox_id=sandbox_id, forget=forget)

    async def set_policy(self, sandbox_id: str, network: dict[str, Any]) -> None:
        await self.node.call("network.set_policy", sandbox_id=sandbox_id, network=network)

    async def status(self, sandbox_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.node.call("network.status", sandbox_id=sandbox_id)
        return result

    async def connect(self, sandbox_id: str, handle: Handle, port: int) -> socket.socket:
        """A non-blocking socket whose peer is `port` in the sandbox: the tunnel's own TCP socket, its
        preamble already read (plain TCP), or one end of a socket pair relayed through TLS."""
        request = {"tunnel": "port", "sandbox": sandbox_id, "handle": handle, "port": port}
        try:
            if self.node.ssl is None:
                return await self._plain(request)
            return await self._relayed(request)
        except _TunnelRefused as e:
            raise self._error(e) from None

    def _error(self, e: _TunnelRefused) -> Exception:
        """What `network.connect` raises locally for the node's error code (with the node's message)."""
        if e.code == "port_not_open":
            return PortNotOpen(e.message)
        if e.code == "sandbox_gone":
            return SandboxGone(e.message)
        if e.code == "timeout":
            return TimeoutError(e.message)
        return NodeError(f"node {self.node.node_id} at {self.node.address}: {e.code}: {e.message}")

    async def _plain(self, request: dict[str, Any]) -> socket.socket:
        node = self.node
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(node.host, node.port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise node.unreachable(e) from e
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            try:
                async with asyncio.timeout(node.connect_timeout):
                    await loop.sock_connect(sock, address)
            except (OSError, TimeoutError) as e:
                raise node.unreachable(e) from e
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                await loop.sock_sendall(sock, wire.line({"token": node._token, **request}))
                async with asyncio.timeout(node.timeout):
                    raw = await _reply_line(loop, sock)
                reply = wire.parse(raw)
            except (OSError, TimeoutError, wire.WireError) as e:
                raise node.unreachable(e) from e
            if reply.get("ok") is not True:
                raise _TunnelRefused(str(reply.get("code")), str(reply.get("message", "")))
            return sock
        except BaseException:
            sock.close()
            raise

    async def _relayed(self, request: dict[str, Any]) -> socket.socket:
        # A TLS connection is not a socket the caller can use: relay it to a local socket pair.
        try:
            tunnel = await self.node._open_tunnel(request)
        except GuestUnavailable as e:
            raise NodeError(str(e)) from e
        mine, theirs = socket.socketpair()
        try:
            mine.setblocking(False)
            theirs.setblocking(False)
            local = await asyncio.open_connection(sock=mine, limit=READ_LIMIT)
        except BaseException:
            mine.close()
            theirs.close()
            tunnel[1].close()
            raise
        relay = asyncio.create_task(splice(local, tunnel))
        self.node._relays.add(relay)
        relay.add_done_callback(self.node._relays.discard)
        return theirs


async def _reply_line(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """The tunnel's reply line, read a byte at a time: the bytes after it are the port's own (a server
    that speaks first), and they must stay in the socket for the caller."""
    raw = bytearray()
    while not raw.endswith(b"\n"):
        if len(raw) > wire.LINE_LIMIT:
            raise wire.WireError("the node's reply line is too long")
        byte = await loop.sock_recv(sock, 1)
        if not byte:
            raise ConnectionResetError("the node closed the tunnel before its reply")
        raw += byte
    return bytes(raw)
