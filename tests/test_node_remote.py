"""The node API (cove.node.remote) with real parts: a LocalNode on this host, served by a NodeServer on
loopback, driven through a RemoteNode as an API server would drive it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar, cast

import pytest

from cove.config import Settings
from cove.devserver import Server, leaks
from cove.network.sandbox_socket import PortNotOpen, SandboxGone
from cove.node.base import NodeError, SandboxSpec
from cove.node.guest_client import GuestClient, GuestUnavailable
from cove.node.local import LocalNode
from cove.node.remote import server as server_module
from cove.node.remote import wire
from cove.node.remote.client import RemoteNode
from cove.node.remote.server import NodeServer
from cove.node.runtimes import NAMES

T = TypeVar("T")
TOKEN = "node-token-" + os.urandom(8).hex()


@dataclass
class Env:
    loop: asyncio.AbstractEventLoop
    node: LocalNode
    server: NodeServer
    remote: RemoteNode
    made: list[str] = field(default_factory=list)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    async def sandbox(self, **fields: Any) -> tuple[str, dict[str, Any]]:
        """A sandbox made through the remote node (killed at the end of the module)."""
        sid = "rn" + os.urandom(7).hex()
        spec = SandboxSpec(id=sid, template=await self.remote.base_template(), **fields)
        self.made.append(sid)
        return sid, await self.remote.create(spec)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    home = Path(tempfile.mkdtemp(prefix="cove-test-remote-"))
    home.chmod(0o711)  # sandboxes' unprivileged init traverses it
    cgroup_parent = f"cove-test-remote-{os.getpid()}"
    settings = Settings(home=home, cgroup_parent=cgroup_parent, api_key=None, kernel=False)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    node = LocalNode(settings)
    server = NodeServer(node, TOKEN)
    e = Env(loop, node, server, RemoteNode("node-a", "127.0.0.1:1", TOKEN))
    try:
        e.run(node.start(), 120)
        e.run(server.start())
        e.remote = RemoteNode("node-a", server.address, TOKEN)
        e.run(e.remote.start())
        yield e
    finally:
        for sid in e.made:
            e.run(node.kill(sid))
        e.run(e.remote.close())
        e.run(server.close())
        e.run(node.close())
        storage = home / "storage"
        if os.path.ismount(storage):
            subprocess.run(["umount", str(storage)], check=False)
        leftovers = leaks(cast(Server, SimpleNamespace(home=home, cgroup_parent=cgroup_parent, proc=None)))
        shutil.rmtree(home, ignore_errors=True)
        loop.close()
        asyncio.set_event_loop(None)
        assert not leftovers, f"sandbox resources leaked: {leftovers}"


async def sh(guest: GuestClient, cmd: str, **fields: Any) -> tuple[bytes, bytes, int]:
    out, err, code = bytearray(), bytearray(), -1
    async for kind, data in guest.exec(cmd, **fields):
        if kind == "stdout":
            out += cast(bytes, data)
        elif kind == "stderr":
            err += cast(bytes, data)
        else:
            code = cast(dict[str, Any], data)["exit_code"]
    return bytes(out), bytes(err), code


async def raw_request(
    address: str, payload: bytes, closes: bool = True
) -> tuple[dict[str, Any] | None, bool]:
    """Send `payload` on a new connection; (the reply line, whether the node then closed the
    connection: only looked at if it `closes`, as a call's connection stays open after an error)."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(payload)
        await writer.drain()
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
        except ConnectionResetError:
            return None, True
        if not closes:
            return (json.loads(line) if line else None), False
        try:
            rest = await asyncio.wait_for(reader.read(), 5)
            closed = rest == b""
        except ConnectionResetError:
            closed = True
        return (json.loads(line) if line else None), closed
    finally:
        writer.close()


async def until_open(remote: RemoteNode, sid: str, handle: dict[str, Any], port: int) -> socket.socket:
    deadline = time.monotonic() + 10
    while True:
        try:
            return await remote.network.connect(sid, handle, port)
        except PortNotOpen:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def recv_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while chunk := await loop.sock_recv(sock, 65536):
        data += chunk
    return bytes(data)


# A server that speaks first (its banner must not be lost behind the tunnel's reply line), then
# answers what it read once the client has half-closed (or, with "line", sent a newline).
BANNER_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
while True:
    c, _ = s.accept()
    c.sendall(b"banner\\n")
    got = b""
    while chunk := c.recv(65536):
        got += chunk
        if sys.argv[2:] == ["line"] and got.endswith(b"\\n"):
            break
    c.sendall(b"got:" + got)
    c.close()
"""


async def banner_exchange(
    remote: RemoteNode, sid: str, handle: dict[str, Any], port: int, half_close: bool = True
) -> bytes:
    loop = asyncio.get_running_loop()
    sock = await until_open(remote, sid, handle, port)
    try:
        assert not sock.getblocking()
        first = await loop.sock_recv(sock, 7)
        await loop.sock_sendall(sock, b"hello " * 1000 + (b"" if half_close else b"\n"))
        if half_close:
            sock.shutdown(socket.SHUT_WR)  # the half-close must reach the server in the sandbox
        return first + await recv_all(sock)
    finally:
        sock.close()


# -- tests ----------------------------------------------------------------------------------------
def test_describe_answers_as_the_local_node(env: Env) -> None:
    node, remote = env.node, env.remote
    for runtime in (*NAMES, "nope"):
        assert remote.runtime_problem(runtime) == node.runtime_problem(runtime)
        assert remote.egress(runtime) == node.egress(runtime)
        assert remote.checkpoints.available(runtime) == node.checkpoints.available(runtime)
    assert remote.volumes.buckets_available() == node.volumes.buckets_available()
    assert remote.volumes.limits == node.volumes.limits
    assert remote.contexts.status == node.contexts.status == "disabled (COVE_KERNEL=0)"
    assert remote.generation == node.generation
    assert env.run(remote.base_template()) == env.run(node.base_template())
    with pytest.raises(NodeError, match="template builds run on the API server's own node"):
        _ = remote.snapshots.templates


def test_sandbox_lifecycle_and_guest_through_the_tunnel(env: Env) -> None:
    remote = env.remote

    async def go() -> None:
        sid, handle = await env.sandbox(env={"GREETING": "hi"})
        assert isinstance(handle["pid"], int)
        assert await remote.alive(sid, handle)
        guest = remote.guest(sid)
        assert await sh(guest, "echo $GREETING") == (b"hi\n", b"", 0)
        assert remote.guest_key(sid) in remote.idle._conns  # the tunnel is kept, as locally

        entry = await guest.write("/home/user/f.txt", b"data through the node API" * 1000)
        assert entry["entry"]["size"] == 25 * 1000
        got = b"".join([chunk async for chunk in guest.read("/home/user/f.txt")])
        assert got == b"data through the node API" * 1000
        assert await sh(guest, "wc -c", stdin=b"x" * 300_000) == (b"300000\n", b"", 0)
        blob = os.urandom(8 << 20)  # many splice reads each way, in order and complete
        await guest.write("/home/user/blob", blob)
        assert b"".join([chunk async for chunk in guest.read("/home/user/blob")]) == blob

        # Output streams as it is produced, not at the end.
        seen: list[tuple[float, bytes]] = []
        t0 = time.monotonic()
        async for kind, data in guest.exec("for i in 1 2 3; do echo $i; sleep 0.3; done"):
            if kind == "stdout":
                seen.append((time.monotonic() - t0, cast(bytes, data)))
        assert b"".join(d for _, d in seen) == b"1\n2\n3\n"
        assert seen[0][0] < 0.25 and seen[-1][0] > 0.5, seen

        # A terminal: a background process in a PTY, its input and output through the tunnel.
        proc = await guest.spawn(
            argv=["/bin/bash", "--norc", "--noprofile", "-i"], pty={"rows": 24, "cols": 80}
        )
        await guest.input(proc["id"], b"stty size; echo has-$((6*7))\n")
        out = bytearray()
        async for kind, data in guest.attach(proc["id"], 0):
            if kind == "stdout":
                out += cast(bytes, data)
                if b"has-42\r\n" in out:
                    break
        assert b"24 80\r\n" in out
        await guest.input(proc["id"], b"exit 3\n")
        assert await guest.wait(proc["id"], 5) == {"running": False, "exit_code": 3}

        stats = await remote.stats(sid)
        assert stats == {**stats, "pids": stats["pids"]} and stats["memory_bytes"] > 0

        # Pause drops the kept tunnels first (their handlers exit), as LocalNode does its own.
        await remote.pause(sid)
        assert remote.guest_key(sid) not in remote.idle._conns
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(sh(guest, "true"), 0.5)  # frozen: the command cannot run
        await remote.resume(sid)
        assert await sh(guest, "echo back") == (b"back\n", b"", 0)

        assert await remote.dead([(sid, handle)]) == []
        await remote.kill(sid, handle)
        assert not await remote.alive(sid, handle)
        assert await remote.dead([(sid, handle)]) == [sid]
        await remote.kill(sid, handle)  # idempotent
        await remote.kill(sid, None)
        with pytest.raises(GuestUnavailable, match="guest_unavailable"):
            await sh(guest, "true")

    env.run(go())


def test_ports_through_the_tunnel(env: Env) -> None:
    remote = env.remote

    async def go() -> None:
        sid, handle = await env.sandbox()
        guest = remote.guest(sid)
        await guest.spawn(
            argv=["python3", "-m", "http.server", "8000", "--bind", "127.0.0.1"], cwd="/home/user"
        )
        await guest.write("/home/user/index.html", b"<p>served in the sandbox</p>")
        sock = await until_open(remote, sid, handle, 8000)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(sock, b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
            response = await recv_all(sock)
        finally:
            sock.close()
        assert response.startswith(b"HTTP/1.0 200") and response.endswith(b"<p>served in the sandbox</p>")

        await guest.spawn(argv=["python3", "-c", BANNER_SERVER, "9000"])
        assert await banner_exchange(remote, sid, handle, 9000) == b"banner\ngot:" + b"hello " * 1000

        with pytest.raises(PortNotOpen, match="nothing listens on port 9999"):
            await remote.network.connect(sid, handle, 9999)
        with pytest.raises(SandboxGone):
            await remote.network.connect(sid, {"pid": 1, "start_time": 1}, 8000)
        with pytest.raises(
            NodeError, match=r"node-a at .*: bad_request: port must be an integer from 1 to 65535"
        ):
            await remote.network.connect(sid, handle, 70000)

        # Egress through the node's proxy: attach, status, policy, detach.
        await remote.network.attach(sid, handle, {"mode": "none"})
        status = await remote.network.status(sid)
        assert status == await env.node.network.status(sid)
        await remote.network.set_policy(sid, {"mode": "open"})
        await remote.network.detach(sid, forget=True)

    env.run(go())


BRIDGE = """
import json, socket, struct, sys
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen()
c, _ = s.accept()
kind, n = struct.unpack(">cI", c.recv(5, socket.MSG_WAITALL))
op = json.loads(c.recv(n, socket.MSG_WAITALL))["op"]
body = json.dumps({"ok": True, "echo": op}).encode()
c.sendall(struct.pack(">cI", b"J", len(body)) + body)
c.close()
"""


def test_volumes_snapshots_checkpoints_and_contexts(env: Env) -> None:
    remote = env.remote

    async def go() -> None:
        await remote.volumes.create("vol-remote-1", 16)
        volumes, sealed = await remote.volumes.ids()
        assert "vol-remote-1" in volumes and isinstance(sealed, set)
        await remote.volumes.delete("vol-remote-1")
        await remote.volumes.delete("vol-remote-1")  # idempotent
        assert "vol-remote-1" not in (await remote.volumes.ids())[0]
        await remote.volumes.delete_sealed(["sealed-none"])

        sid, handle = await env.sandbox()
        guest = remote.guest(sid)
        await guest.write("/home/user/kept.txt", b"committed")
        layer = await remote.snapshots.commit(sid, "snap-remote-1")
        assert layer == "snap-remote-1"
        assert await remote.snapshots.commit(sid, "snap-remote-1") == layer  # a retry finds it
        base = (await remote.base_template()).layers
        assert await remote.snapshots.collect({*base, layer}) == []
        assert await remote.checkpoints.keys() == set()
        assert not await remote.checkpoints.has("nope")
        await remote.checkpoints.drop("nope")
        assert await remote.volumes.buckets_healthy(sid, []) == []
        assert await remote.sweep(set(env.made)) == []

        # A code context's bridge, reached through its own tunnel.
        path = await remote.contexts.prepare(sid, "ctx-1", "user")
        await guest.spawn(argv=["python3", "-c", BRIDGE, path], user="user")
        bridge = remote.contexts.client(sid, "ctx-1")
        deadline = time.monotonic() + 10
        while True:
            try:
                reply = await bridge.call("ping")
                break
            except GuestUnavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        assert reply == {"ok": True, "echo": "ping"}
        await remote.kill(sid, handle)
        assert await remote.snapshots.collect(set(base)) == [layer]

    env.run(go())


def test_node_errors_round_trip(env: Env) -> None:
    remote, node = env.remote, env.node

    async def go() -> None:
        template = await remote.base_template()
        with pytest.raises(NodeError) as raised:
            await remote.create(SandboxSpec(id="rn-microvm", template=template, runtime="microvm"))
        assert str(raised.value) == node.runtime_problem("microvm")
        sid, _ = await env.sandbox()
        with pytest.raises(NodeError, match=f"sandbox {sid} already exists on this node"):
            await remote.create(SandboxSpec(id=sid, template=template))
        with pytest.raises(ValueError, match="bad volume id"):  # the node's own check, raised again
            await remote.volumes.create("-leading-dash", None)

    env.run(go())
    assert not env.node.host.exists("rn-microvm")


def test_unexpected_failures_are_answered(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(sandbox_id: str) -> dict[str, Any]:
        raise RuntimeError("a bug in the node")

    async def disk(sandbox_id: str) -> dict[str, Any]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(env.node, "stats", broken)
    with pytest.raises(NodeError, match="stats: internal: RuntimeError: a bug in the node"):
        env.run(env.remote.stats("abc"))
    monkeypatch.setattr(env.node, "stats", disk)
    with pytest.raises(NodeError, match=r"^\[Errno 28\] No space left on device$"):
        env.run(env.remote.stats("abc"))
    assert env.run(env.remote.call("generation")) == env.node.generation  # the connection goes on


def test_wrong_or_missing_token_is_refused(env: Env) -> None:
    async def go() -> None:
        sid = "rn-refused"
        intruder = RemoteNode("node-a", env.server.address, "wrong-" + TOKEN)
        with pytest.raises(NodeError, match="unauthorized"):
            await intruder.start()
        spec = SandboxSpec(id=sid, template=await env.remote.base_template())
        with pytest.raises(NodeError, match="unauthorized"):
            await intruder.create(spec)
        with pytest.raises(GuestUnavailable, match="unauthorized"):
            await intruder.guest(sid).ping()
        with pytest.raises(NodeError, match="unauthorized"):
            await intruder.network.connect(sid, {"pid": 1, "start_time": 1}, 80)
        request = {"call": "create", "args": {"spec": wire.encode(spec)}}
        for doc in (request, {**request, "token": None}, {**request, "token": ""}, {**request, "token": 7}):
            reply, closed = await raw_request(env.server.address, wire.line(doc))
            assert reply is not None and reply["code"] == "unauthorized" and closed
        assert not env.node.host.exists(sid)

    env.run(go())


def test_bad_requests_are_refused_and_the_server_goes_on(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    remote, address = env.remote, env.server.address

    async def go() -> None:
        for name in (
            "nosuch",
            "start",
            "close",
            "guest",
            "snapshots.templates",
            "volumes.__init__",
            "__class__",
        ):
            with pytest.raises(NodeError, match=f"bad_request: unknown call '{name}'"):
                await remote.call(name)
        for args, why in (
            ({"sandbox_id": "../etc"}, "sandbox_id must be a string of 1 to 64"),
            ({"sandbox_id": "a" * 65}, "sandbox_id must be"),
            ({}, "missing a required argument"),
            ({"sandbox_id": "abc", "extra": 1}, "unexpected argument 'extra'"),
        ):
            with pytest.raises(NodeError, match=why):
                await remote.call("stats", **args)
        with pytest.raises(NodeError, match="keep must be a set of ids"):
            await remote.call("sweep", keep=["a"])
        with pytest.raises(NodeError, match="size_mb must be a non-negative integer"):
            await remote.call("volumes.create", volume_id="v", size_mb=True)

        def req(doc: dict[str, Any]) -> bytes:
            return wire.line({"token": TOKEN, **doc})

        bad_spec = {"$t": "SandboxSpec", "v": {"id": 5}}
        for payload, why in (
            (b"{not json\n", "not a JSON line"),
            (b"[1, 2]\n", "one JSON object"),
            (b"\xff\xfe\n", "not a JSON line"),
            (b"[" * 100_000 + b"\n", "not a JSON line"),
            (req({"call": "create", "args": {"spec": bad_spec}}), "SandboxSpec.id must be str"),
            (req({"call": "create", "args": {"spec": {"$t": "Popen", "v": {}}}}), "unknown or malformed"),
            (req({"call": "stats", "args": []}), "args must be an object"),
            (req({"cal": "stats"}), "a request names a call or a tunnel"),
            (req({"tunnel": "nope", "sandbox": "abc"}), "unknown tunnel 'nope'"),
            (req({"tunnel": "guest", "sandbox": "../x"}), "sandbox must be"),
            (req({"tunnel": "context", "sandbox": "abc", "context": "a/b"}), "context must be"),
            (req({"tunnel": "port", "sandbox": "abc", "handle": {}, "port": 0}), "port must be"),
            (req({"tunnel": "port", "sandbox": "abc", "handle": [], "port": 80}), "handle must be an object"),
        ):
            call = b'"call"' in payload or b'"cal"' in payload  # a call's error leaves the connection open
            reply, closed = await raw_request(address, payload, closes=not call)
            assert call or closed
            assert reply is not None and reply["code"] == "bad_request" and why in reply["message"], (
                payload,
                reply,
            )
        # An over-long line: refused (the reply may be lost to the reset of the unread rest).
        reply, closed = await raw_request(address, b"x" * (wire.LINE_LIMIT + 4096))
        assert closed and (reply is None or reply["code"] == "bad_request")
        # A connection that never says anything is dropped.
        monkeypatch.setattr(server_module, "FIRST_LINE_TIMEOUT", 0.2)
        reply, closed = await raw_request(address, b"")
        assert reply is None and closed
        # Several calls on one kept connection, and the server still answers after all of the above.
        for _ in range(3):
            assert remote.generation == env.node.generation
            await remote.refresh()
        assert len(remote._pool) == 1

    env.run(go())


def test_a_closed_server_makes_calls_fail_naming_the_node(env: Env) -> None:
    async def go() -> None:
        sid, _ = await env.sandbox()
        second = NodeServer(env.node, TOKEN)
        await second.start()
        other = RemoteNode("node-b", second.address, TOKEN)
        await other.start()
        assert await other.stats(sid)
        guest = other.guest(sid)
        started = asyncio.Event()

        async def long_command() -> None:
            async for kind, _ in guest.exec("echo started; sleep 30"):
                if kind == "stdout":
                    started.set()

        running = asyncio.create_task(long_command())
        await asyncio.wait_for(started.wait(), 10)
        await second.close()  # ends the open tunnel too
        with pytest.raises(GuestUnavailable):
            await asyncio.wait_for(running, 5)
        with pytest.raises(NodeError, match=f"node node-b at {second.address} unreachable"):
            await other.stats(sid)
        with pytest.raises(GuestUnavailable, match="node node-b"):
            await other.guest(sid).ping()
        with pytest.raises(NodeError, match="node node-b"):
            await other.network.connect(sid, {"pid": 1, "start_time": 1}, 80)
        await other.close()
        assert await sh(env.remote.guest(sid), "echo still") == (b"still\n", b"", 0)

    env.run(go())


def test_tls(env: Env, tmp_path: Path) -> None:
    if not shutil.which("openssl"):
        pytest.skip("no openssl to make a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=node"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))

    async def go() -> None:
        tls = NodeServer(env.node, TOKEN, ssl=server_ctx)
        await tls.start()
        remote = RemoteNode("node-tls", tls.address, TOKEN, ssl=client_ctx)
        try:
            await remote.start()
            sid, handle = await env.sandbox()
            guest = remote.guest(sid)
            assert await sh(guest, "echo secure") == (b"secure\n", b"", 0)
            assert remote.guest_key(sid) in remote.idle._conns
            await remote.pause(sid)  # no half-close over TLS: the node waits for the handler instead
            await remote.resume(sid)
            assert await sh(guest, "echo again") == (b"again\n", b"", 0)
            # TLS has no half-close here (asyncio's TLS transport cannot write_eof): the server ends the
            # exchange itself.
            await guest.spawn(argv=["python3", "-c", BANNER_SERVER, "9001", "line"])
            expected = b"banner\ngot:" + b"hello " * 1000 + b"\n"
            assert await banner_exchange(remote, sid, handle, 9001, half_close=False) == expected
            with pytest.raises(PortNotOpen):
                await remote.network.connect(sid, handle, 9999)
            plain = RemoteNode("node-tls", tls.address, TOKEN)  # a client without TLS gets nowhere
            with pytest.raises(NodeError, match="unreachable"):
                await plain.start()
        finally:
            await remote.close()
            await tls.close()

    env.run(go())
