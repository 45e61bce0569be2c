"""The node API's cost (cove.node.remote): the same operations on a LocalNode in this process, and
through a NodeServer on loopback driven by a RemoteNode, interleaved.

    .venv/bin/python bench/node_remote.py [--runs 200]   # as root

Rows: exec `/bin/true` through the guest client (kept connections, as the node keeps them; and a new
connection each time), a `stats` call (the pool of call connections, and a new connection per call),
a call the node answers without work (`generation`: the API's own round trip), reading a 32 MiB
file (throughput through the splice), and the same over TLS where openssl can make a certificate. The server and the client share this
process and its event loop, so every remote row pays both ends' CPU on one core: an upper bound on
what the network API adds on one host (the network's own round trip comes on top).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import ssl
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from cove.config import Settings
from cove.node.base import SandboxSpec
from cove.node.guest_client import GuestClient
from cove.node.local import LocalNode
from cove.node.remote.client import RemoteNode
from cove.node.remote.server import NodeServer

TOKEN = "bench-" + os.urandom(16).hex()


BLOB = 32 << 20  # bytes of the file read for throughput


async def read_all(guest: GuestClient) -> None:
    got = 0
    async for chunk in guest.read("/home/user/blob"):
        got += len(chunk)
    assert got == BLOB


async def exec_true(guest: GuestClient) -> None:
    async for kind, data in guest.exec(argv=["/bin/true"]):
        if kind == "exit":
            assert isinstance(data, dict) and data["exit_code"] == 0


def tls_contexts(work: Path) -> tuple[ssl.SSLContext, ssl.SSLContext] | None:
    if not shutil.which("openssl"):
        return None
    key, cert = work / "key.pem", work / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=node"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=str(cert))


def remote(name: str, server: NodeServer, ctx: ssl.SSLContext | None = None, pool: bool = True) -> RemoteNode:
    node = RemoteNode(name, server.address, TOKEN, ssl=ctx)
    if not pool:
        node.POOL_MOST = 0  # a new connection (and, with TLS, handshake) per call
    return node


async def bench(runs: int, home: Path) -> dict[str, list[float]]:
    settings = Settings(
        home=home, cgroup_parent=f"cove-bench-remote-{os.getpid()}", api_key=None, kernel=False
    )
    node = LocalNode(settings)
    await node.start()
    servers = [NodeServer(node, TOKEN)]
    contexts = tls_contexts(home)
    if contexts:
        servers.append(NodeServer(node, TOKEN, ssl=contexts[0]))
    for s in servers:
        await s.start()
    remotes = [remote("plain", servers[0]), remote("plain-new", servers[0], pool=False)]
    if contexts:
        remotes += [
            remote("tls", servers[1], contexts[1]),
            remote("tls-new", servers[1], contexts[1], pool=False),
        ]
    for r in remotes:
        await r.start()
    sid = "bench" + os.urandom(6).hex()
    await node.create(SandboxSpec(id=sid, template=await node.base_template()))
    try:
        plain = remotes[0]
        once = GuestClient(node.host.socket_path(sid))  # no kept connections: a connect and a fork each
        once_remote = GuestClient(plain.guest_key(sid), opener=plain.guest(sid).opener)
        cases: dict[str, Callable[[], Awaitable[object]]] = {
            "exec `true`: local guest client (kept connections)": lambda: exec_true(node.guest(sid)),
            "exec `true`: RemoteNode tunnel (kept tunnels)": lambda: exec_true(plain.guest(sid)),
            "exec `true`: local, new connection each": lambda: exec_true(once),
            "exec `true`: RemoteNode, new tunnel each": lambda: exec_true(once_remote),
            "stats: local node": lambda: node.stats(sid),
            "stats: RemoteNode (pooled connection)": lambda: plain.stats(sid),
            "stats: RemoteNode (new connection each)": lambda: remotes[1].stats(sid),
            # The API's own round trip: a call the node answers without any work.
            "call `generation`: RemoteNode (pooled connection)": lambda: plain.call("generation"),
            "call `generation`: RemoteNode (new connection each)": lambda: remotes[1].call("generation"),
        }
        if contexts:
            tls, tls_new = remotes[2], remotes[3]
            cases["exec `true`: RemoteNode over TLS (kept tunnels)"] = lambda: exec_true(tls.guest(sid))
            cases["stats: RemoteNode over TLS (pooled connection)"] = lambda: tls.stats(sid)
            cases["stats: RemoteNode over TLS (new connection each)"] = lambda: tls_new.stats(sid)
            cases["call `generation`: RemoteNode over TLS (pooled connection)"] = lambda: tls.call(
                "generation"
            )
            cases["call `generation`: RemoteNode over TLS (new connection each)"] = lambda: tls_new.call(
                "generation"
            )
        samples: dict[str, list[float]] = {name: [] for name in cases}
        order = list(cases.items())
        rng = random.Random(7)
        for i in range(runs + 10):  # interleaved, so a noisy machine moves every row alike; 10 warm-ups
            # In a new order each round: work one case leaves behind (a connection's teardown, the agent
            # forking a handler to replace a taken one) must not always land on the same next case.
            rng.shuffle(order)
            for name, case in order:
                t0 = time.perf_counter()
                await case()
                if i >= 10:
                    samples[name].append((time.perf_counter() - t0) * 1000)
        await node.guest(sid).write("/home/user/blob", os.urandom(BLOB))
        reads: dict[str, Callable[[], Awaitable[object]]] = {
            "read 32 MiB file: local guest client": lambda: read_all(node.guest(sid)),
            "read 32 MiB file: RemoteNode tunnel": lambda: read_all(plain.guest(sid)),
        }
        if contexts:
            reads["read 32 MiB file: RemoteNode over TLS"] = lambda: read_all(remotes[2].guest(sid))
        for name in reads:
            samples[name] = []
        for _ in range(5):
            for name, case in reads.items():
                t0 = time.perf_counter()
                await case()
                samples[name].append((time.perf_counter() - t0) * 1000)
        return samples
    finally:
        await node.kill(sid)
        for r in remotes:
            await r.close()
        for s in servers:
            await s.close()
        await node.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="cove-bench-remote-"))
    home.chmod(0o711)
    try:
        samples = asyncio.run(bench(args.runs, home))
    finally:
        if os.path.ismount(home / "storage"):
            subprocess.run(["umount", str(home / "storage")], check=False)
        shutil.rmtree(home, ignore_errors=True)
    print(f"| measurement ({args.runs} runs) | p50 ms | p99 ms |")
    print("|---|---|---|")
    for name, times in samples.items():
        s = sorted(times)
        p50 = statistics.median(s)
        rate = f" ({BLOB / 1e6 / (p50 / 1000):.0f} MB/s, 5 runs)" if name.startswith("read") else ""
        print(f"| {name}{rate} | {p50:.3f} | {s[min(len(s) - 1, int(0.99 * len(s)))]:.3f} |")


if __name__ == "__main__":
    main()
