"""Egress: the one way out of a sandbox, an HTTP proxy that enforces the sandbox's policy host-side.

A sandbox's network namespace has only loopback and no route, so nothing inside can reach anything
outside by itself (a raw connect fails at once with ENETUNREACH). The server opens a listening socket
*inside* each sandbox's namespace (127.0.0.1:`egress_port`, made the way `sandbox_socket` makes its
sockets) and serves it from its own event loop. Processes find it through the usual proxy variables
(`proxy_env`, set in every sandbox), so curl, pip, git, npm, requests and urllib use it unchanged.

The proxy speaks HTTP CONNECT (any TCP, TLS stays end to end) and plain-HTTP forwarding with absolute
URLs, one request per connection. Names are resolved here, by the server (first from the operator's
host map `COVE_EGRESS_HOSTS="name=ip,..."`), and the policy (`egress_policy`) is checked on the name,
each address it resolved to, and the port. A refused connection is a 403 whose status line and body
say why; it is logged and counted per sandbox. Connections are made from the server's own namespace,
which is why loopback, private and the host's own addresses need an explicit rule. Plain-HTTP
requests to a host the policy injects headers for (`Policy.inject`) get them added here, host-side.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import socket
import ssl
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from cove.network.egress_policy import IPAddress, Policy, normal_host, parse_ip
from cove.network.sandbox_socket import NamespaceStuck, SandboxGone, in_new_thread, open_sockets

log = logging.getLogger("cove.egress")

HEAD_LIMIT = 64 << 10  # request line and headers
HEAD_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0
READ_SIZE = 1 << 18
LINGER = 30.0
MAX_CONNECTIONS = 256  # open at once per sandbox: each costs the server two file descriptors
NO_PROXY = "localhost,127.0.0.1,::1"
_HOST_CHARS = re.compile(r"^[a-z0-9._\-:\[\]]{1,255}$")
_DROP = {"connection", "proxy-connection", "keep-alive", "proxy-authorization"}


def proxy_env(port: int) -> dict[str, str]:
    """The variables that send a sandbox's HTTP clients through its egress proxy."""
    url = f"http://127.0.0.1:{port}"
    env = {name: url for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")}
    env.update({k.lower(): v for k, v in env.items()})
    env.update(NO_PROXY=NO_PROXY, no_proxy=NO_PROXY, NODE_USE_ENV_PROXY="1")
    return env


def parse_hosts(text: str | None) -> dict[str, list[IPAddress]]:
    """`name=ip,name=ip` (a name may repeat) as a map; ValueError names the bad entry."""
    out: dict[str, list[IPAddress]] = {}
    for entry in (text or "").replace(";", ",").split(","):
        if not entry.strip():
            continue
        name, sep, addr = entry.partition("=")
        ip = parse_ip(addr.strip())
        if not sep or not name.strip() or ip is None:
            raise ValueError(f"COVE_EGRESS_HOSTS: expected name=ip, got {entry.strip()!r}")
        out.setdefault(normal_host(name), []).append(ip)
    return out


class Refused(Exception):
    """The proxy answers the client with `status` and `message` instead of connecting."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Sandbox:
    policy: Policy
    server: asyncio.Server | None = None
    conns: set[asyncio.Task[Any]] = field(default_factory=set)
    # Client sides, also those still flushing after their handler ended: they live in the sandbox's
    # namespace and keep it (weak: a closed one goes by itself).
    clients: weakref.WeakSet[asyncio.WriteTransport] = field(default_factory=weakref.WeakSet)
    allowed: int = 0
    denied: int = 0
    last_denied: dict[str, Any] | None = None
    error: str | None = None  # why there is no listener
    bytes_out: int = 0  # sent by the sandbox through the proxy (its requests' bytes, tunnels included)
    bytes_in: int = 0  # received by it from the outside

    def sent(self, n: int) -> None:
        self.bytes_out += n

    def received(self, n: int) -> None:
        self.bytes_in += n


class Egress:
    """The egress proxies of every running sandbox of this server."""

    def __init__(
        self,
        port: int,
        hosts: dict[str, list[IPAddress]],
        api_port: int,
        on_result: Callable[[str], None] | None = None,
    ) -> None:
        self.port = port
        self.hosts = hosts
        self.api_port = api_port
        self.on_result = on_result or (lambda result: None)
        self._boxes: dict[str, _Sandbox] = {}
        self._local: dict[IPAddress, tuple[bool, float]] = {}  # address -> (is the host's, checked at)

    # -- lifecycle ---------------------------------------------------------------------------------
    async def attach(self, sandbox_id: str, handle: dict[str, Any], policy: Policy) -> None:
        """(Re)open the proxy's listener in the namespace of the sandbox started with `handle`.
        A sandbox whose port is taken keeps running without egress; `status` says why."""
        await self.detach(sandbox_id)
        box = self._boxes.setdefault(sandbox_id, _Sandbox(policy))
        box.policy, box.error = policy, None
        try:
            pid, start_time = int(handle["pid"]), int(handle["start_time"])
            socks = await in_new_thread(
                lambda: open_sockets(pid, start_time, (socket.AF_INET,)), lambda ss: [s.close() for s in ss]
            )
        except (KeyError, TypeError, ValueError, SandboxGone, NamespaceStuck, OSError) as e:
            box.error = f"the egress proxy cannot reach the sandbox's network: {e}"
            log.warning("egress proxy unavailable", extra={"sandbox": sandbox_id, "error": str(e)})
            return
        sock = socks[0]
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
            sock.listen(256)
            sock.setblocking(False)
            box.server = await asyncio.start_server(
                lambda r, w: self._handle(sandbox_id, box, r, w), sock=sock, limit=HEAD_LIMIT
            )
        except OSError as e:
            sock.close()
            box.error = f"the egress proxy cannot listen on 127.0.0.1:{self.port} in the sandbox: {e}"
            log.warning("egress proxy unavailable", extra={"sandbox": sandbox_id, "error": str(e)})

    async def detach(self, sandbox_id: str, forget: bool = False) -> None:
        """Close the listener and every connection through it (they hold the sandbox's namespace)."""
        box = self._boxes.pop(sandbox_id, None) if forget else self._boxes.get(sandbox_id)
        if box is None:
            return
        server, box.server = box.server, None
        if server is not None:
            server.close()
        conns = list(box.conns)
        for task in conns:
            task.cancel()
        await asyncio.gather(*conns, return_exceptions=True)
        for transport in list(box.clients):
            _abort(transport)

    def set_policy(self, sandbox_id: str, policy: Policy) -> None:
        """Applies to connections opened from now on."""
        box = self._boxes.get(sandbox_id)
        if box is not None:
            box.policy = policy

    def status(self, sandbox_id: str) -> dict[str, Any]:
        box = self._boxes.get(sandbox_id)
        if box is None:
            return {"proxy": None, "allowed": 0, "denied": 0, "last_denied": None, "bytes_out": 0, "bytes_in": 0}
        return {
            "proxy": f"http://127.0.0.1:{self.port}" if box.server is not None else None,
            "error": box.error,
            "allowed": box.allowed,
            "denied": box.denied,
            "last_denied": box.last_denied,
            "bytes_out": box.bytes_out,
            "bytes_in": box.bytes_in,
        }

    async def close(self) -> None:
        for sandbox_id in list(self._boxes):
            await self.detach(sandbox_id, forget=True)

    # -- one client connection ---------------------------------------------------------------------
    async def _handle(
        self, sandbox_id: str, box: _Sandbox, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        box.conns.add(task)
        box.clients.add(writer.transport)
        cancelled = False
        try:
            if len(box.conns) > MAX_CONNECTIONS:
                await _answer(writer, 503, f"cove egress proxy: over {MAX_CONNECTIONS} open connections")
                return
            await self._serve(sandbox_id, box, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except asyncio.CancelledError:  # the sandbox is going away: drop everything now
            cancelled = True
            raise
        except Exception:
            log.exception("egress proxy failed", extra={"sandbox": sandbox_id})
        finally:
            box.conns.discard(task)
            _close(writer, abort=cancelled)

    async def _serve(
        self, sandbox_id: str, box: _Sandbox, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            await _answer(writer, 431, "cove egress proxy: request headers too large")
            return
        lines = head.decode("latin-1").split("\r\n")[:-2]
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await _answer(writer, 400, "cove egress proxy: not an HTTP/1.x proxy request")
            return
        method, target, _ = parts
        try:
            if method == "CONNECT":
                host, port = _authority(target)
                upstream = await self._open(sandbox_id, box, host, port)
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                host, port, first = _forward_head(method, target, lines[1:], box.policy.injected)
                entry = box.policy.injection(host, port)
                if entry is not None and entry.tls and entry.upstream:  # TLS made here, host-side
                    upstream = await self._open(sandbox_id, box, host, entry.upstream, tls=True)
                else:
                    upstream = await self._open(sandbox_id, box, host, port)
                upstream[1].write(first)
                box.sent(len(first))
        except Refused as e:
            await _answer(writer, e.status, str(e))
            return
        await _relay(reader, writer, *upstream, box)

    async def _open(
        self, sandbox_id: str, box: _Sandbox, host: str, port: int, tls: bool = False
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to `host:port` if the policy allows it (checked on every address); `tls`:
        wrapped in TLS to `host`, verified against this server's CAs."""
        policy = box.policy
        target = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        reason = None
        ip = parse_ip(host)
        if ip is None and not _may_resolve(policy, host, port):
            # Resolving would itself send the name out (DNS): only for names a rule could allow.
            reason = "the sandbox's network mode is none" if policy.mode == "none" else None
            reason = reason or "it is not in the allow list"
        candidates: list[IPAddress] = []
        if reason is None:
            ips, trusted = [ip], False
            if ip is None:
                ips, trusted = await self._resolve(host)
            for addr in ips:
                why = policy.decide(
                    host,
                    addr,
                    port,
                    protected=self._protected(addr),
                    trusted_name=trusted,
                    cove_api=port == self.api_port and (addr.is_loopback or self._protected(addr)),
                )
                if why is None:
                    candidates.append(addr)
                else:
                    reason = reason or why
        if not candidates:
            self._deny(sandbox_id, box, target, str(reason))
            raise Refused(403, f"cove egress policy: {target} is not allowed (mode {policy.mode}): {reason}")
        errors = []
        for addr in candidates:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    if tls:
                        r, w = await asyncio.open_connection(
                            str(addr), port, limit=READ_SIZE, ssl=_tls_context(), server_hostname=host
                        )
                    else:
                        r, w = await asyncio.open_connection(str(addr), port, limit=READ_SIZE)
            except TimeoutError:
                errors.append(f"{addr}: timed out")
                continue
            except OSError as e:
                errors.append(f"{addr}: {e.strerror or e}")
                continue
            with contextlib.suppress(OSError):
                w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            box.allowed += 1
            self.on_result("allowed")
            return r, w
        self.on_result("failed")
        raise Refused(502, f"cove egress proxy: cannot connect to {target} ({'; '.join(errors)})")

    def _deny(self, sandbox_id: str, box: _Sandbox, target: str, reason: str) -> None:
        box.denied += 1
        box.last_denied = {"target": target, "reason": reason, "at": time.time()}
        self.on_result("denied")
        log.info(
            "egress denied",
            extra={"sandbox": sandbox_id, "target": target, "reason": reason, "mode": box.policy.mode},
        )

    async def _resolve(self, host: str) -> tuple[list[IPAddress], bool]:
        """The addresses of `host` (the operator's map first, then the host's resolver) and whether
        they came from the map."""
        if host in self.hosts:
            return self.hosts[host], True
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            raise Refused(502, f"cove egress proxy: cannot resolve {host}: {e}") from None
        out: list[IPAddress] = []
        for info in infos:
            addr = parse_ip(str(info[4][0]).split("%")[0])
            if addr is not None and addr not in out:
                out.append(addr)
        return out, False

    def _protected(self, ip: IPAddress) -> bool:
        """Loopback, private, link-local, multicast, or one of this host's own addresses."""
        if not ip.is_global or ip.is_multicast or ip.is_unspecified:
            return True
        now = time.monotonic()
        cached = self._local.get(ip)
        if cached is None or now - cached[1] > 60:
            family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            try:
                with socket.socket(family, socket.SOCK_STREAM) as s:
                    s.bind((str(ip), 0))  # only an address of this host binds
                local = True
            except OSError:
                local = False
            cached = self._local[ip] = (local, now)
        return cached[0]


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """The system's CAs (SSL_CERT_FILE / SSL_CERT_DIR are honoured), as for any client here."""
    return ssl.create_default_context()


def _may_resolve(policy: Policy, host: str, port: int) -> bool:
    if policy.mode == "none":
        return False
    if policy.mode != "allow":
        return True
    for rule in policy.allow:
        if rule.network is not None:
            if rule.ports is None or rule.ports[0] <= port <= rule.ports[1]:
                return True
        elif rule.matches(host, None, port):
            return True
    return False


def _authority(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise Refused(400, f"cove egress proxy: CONNECT needs host:port, got {target[:200]!r}")
    return _host(host), int(port)


def _host(host: str) -> str:
    name = normal_host(host)
    if not _HOST_CHARS.match(name) or (":" in name and parse_ip(name) is None):
        raise Refused(400, f"cove egress proxy: invalid host {host[:200]!r}")
    return name


def _forward_head(
    method: str,
    target: str,
    headers: list[str],
    injected: Callable[[str, int], tuple[tuple[str, str], ...]] = lambda host, port: (),
) -> tuple[str, int, bytes]:
    """Host, port and the request to send for a plain-HTTP request with an absolute URL, with the
    headers the policy injects for that host (replacing any of the same name the sandbox sent)."""
    url = urlsplit(target)
    if url.scheme != "http" or not url.hostname:
        raise Refused(
            400,
            "cove egress proxy: expected an absolute http:// URL (https goes through CONNECT); "
            "this port is the sandbox's egress proxy",
        )
    try:
        port = url.port or 80
    except ValueError:
        raise Refused(400, f"cove egress proxy: invalid port in {target[:200]!r}") from None
    host = _host(url.hostname)
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    added = injected(host, port)
    drop = _DROP | {name.lower() for name, _ in added}
    kept = [h for h in headers if h.split(":", 1)[0].strip().lower() not in drop]
    if not any(h.lower().startswith("host:") for h in kept):
        kept.insert(0, f"Host: {url.netloc.rpartition('@')[2]}")
    kept += [f"{name}: {value}" for name, value in added]
    lines = [f"{method} {path} HTTP/1.1", *kept, "Connection: close", "", ""]
    return host, port, "\r\n".join(lines).encode("latin-1")


async def _answer(writer: asyncio.StreamWriter, status: int, message: str) -> None:
    reason = {400: "Bad Request", 403: "Forbidden", 431: "Too Large", 503: "Busy"}.get(status, "Bad Gateway")
    # The reason phrase carries the message too: clients show it for a refused CONNECT
    # ("Tunnel connection failed: 403 ..."), where they never show the body.
    phrase = re.sub(r"[^\x20-\x7e]", "?", message)[:400]
    body = (message + "\n").encode()
    writer.write(
        f"HTTP/1.1 {status} {phrase or reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nX-Cove-Egress: {'denied' if status == 403 else 'error'}\r\n"
        "Connection: close\r\n\r\n".encode()
        + body
    )
    with contextlib.suppress(ConnectionError):
        await writer.drain()


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: Callable[[int], None]) -> bool:
    """Copy until EOF (True) or a broken connection (False), counting the bytes."""
    try:
        while data := await src.read(READ_SIZE):
            dst.write(data)
            count(len(data))
            await dst.drain()
    except (ConnectionError, OSError):
        return False
    return True


async def _relay(
    cr: asyncio.StreamReader,
    cw: asyncio.StreamWriter,
    ur: asyncio.StreamReader,
    uw: asyncio.StreamWriter,
    box: _Sandbox,
) -> None:
    """Bytes both ways until the upstream side ends; the client's EOF is passed on as a half-close."""

    async def client_to_upstream() -> None:
        if await _pump(cr, uw, box.sent) and uw.can_write_eof():
            with contextlib.suppress(OSError):
                uw.write_eof()
                return
        _abort(uw.transport)  # the client is gone: stop waiting for the upstream

    up = asyncio.create_task(client_to_upstream())
    done = False
    try:
        await _pump(ur, cw, box.received)
        done = True
    finally:
        up.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await up
        _close(uw, abort=not done)


def _abort(transport: asyncio.BaseTransport) -> None:
    # A selector transport whose close() drained its buffer drops its loop without counting the
    # connection as lost, so a later abort() raises AttributeError (CPython); it is closed already.
    with contextlib.suppress(AttributeError):
        transport.abort()  # type: ignore[attr-defined]


def _close(writer: asyncio.StreamWriter, abort: bool) -> None:
    """Close after sending what is still buffered (abort: at once); a peer that never reads is cut
    off after LINGER seconds."""
    if abort:
        _abort(writer.transport)
        return
    if not writer.transport.is_closing():
        writer.close()
    asyncio.get_running_loop().call_later(LINGER, _abort, writer.transport)
