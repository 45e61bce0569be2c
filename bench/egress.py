"""Egress: request latency and throughput from inside a sandbox through its egress proxy (plain-HTTP
forwarding and a CONNECT tunnel), beside the same client on the host talking to the same server
directly over loopback (the floor); and what opening the proxy costs per sandbox."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from core import Row
from cove import Sandbox
from cove.devserver import Server, free_port
from cove.network.sandbox_socket import in_new_thread, open_sockets

BIG = 64 << 20  # bytes per throughput sample
HOST = "upstream.bench"

# Runs inside the sandbox (through the proxy) and on the host (direct): the same interpreter, the
# same http.client, a new connection per request.
CLIENT = r"""
import http.client, json, sys, time
mode, host, port, runs, big = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
def conn(path):
    if mode == "direct":
        c = http.client.HTTPConnection(host, port, timeout=60); c.request("GET", path)
    elif mode == "forward":
        c = http.client.HTTPConnection("127.0.0.1", 17770, timeout=60)
        c.request("GET", f"http://{host}:{port}{path}")
    else:
        c = http.client.HTTPConnection("127.0.0.1", 17770, timeout=60)
        c.set_tunnel(host, port); c.request("GET", path)
    return c
out = {"lat": [], "mbps": []}
for _ in range(runs):
    t = time.perf_counter(); c = conn("/small"); r = c.getresponse(); r.read(); c.close()
    out["lat"].append((time.perf_counter() - t) * 1000)
if big:
    for _ in range(3):
        t = time.perf_counter(); c = conn("/big"); r = c.getresponse(); n = 0
        while chunk := r.read(1 << 20):
            n += len(chunk)
        c.close(); out["mbps"].append(n / (time.perf_counter() - t) / 1e6)
print(json.dumps(out))
"""


def _client(argv: list[str]) -> dict:
    done = subprocess.run(
        ["/usr/bin/python3", "-c", CLIENT, *argv], capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    return json.loads(done.stdout)


def _in_sandbox(sb: Sandbox, argv: list[str]) -> dict:
    res = sb.exec(f"/usr/bin/python3 -c {shlex.quote(CLIENT)} {' '.join(argv)}", timeout=600)
    if res.exit_code != 0:
        raise RuntimeError(res.stderr)
    return json.loads(res.stdout)


def _listener_ms(pid: int, start_time: int, runs: int) -> Row:
    """What the server does per sandbox to open its proxy: a thread enters the namespace, makes the
    socket, returns; then bind, listen and hand it to the event loop."""
    row = Row("open the egress listener")

    async def once() -> None:
        t = time.perf_counter()
        socks = await in_new_thread(lambda: open_sockets(pid, start_time, (socket.AF_INET,)))
        s = socks[0]
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(256)
        s.setblocking(False)
        server = await asyncio.start_server(lambda r, w: None, sock=s)
        row.samples_ms.append((time.perf_counter() - t) * 1000)
        server.close()

    async def all_runs() -> None:
        for _ in range(runs):
            await once()

    asyncio.run(all_runs())
    return row


def run(runs: int = 200) -> dict:
    srv = Server("bench-egress", {"COVE_EGRESS_HOSTS": f"{HOST}=127.0.0.1"})
    srv.start()
    served = tempfile.mkdtemp(prefix="cove-bench-egress-")
    with open(os.path.join(served, "small"), "w") as f:
        f.write("hi\n")
    with open(os.path.join(served, "big"), "wb") as f:
        f.write(os.urandom(BIG))
    port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=served,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        sb = Sandbox.create(
            url=srv.url, api_key=srv.api_key, timeout=900, network={"mode": "allow", "allow": [HOST]}
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                _client(["direct", "127.0.0.1", str(port), "1", "0"])
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        rows = {k: Row(k) for k in ("direct", "forward", "connect")}
        mbps: dict[str, list[float]] = {k: [] for k in rows}
        rounds = 5  # interleaved, so load changes hit all three alike
        for i in range(rounds):
            big = "1" if i == 0 else "0"
            for mode in rows:
                argv = [mode, "127.0.0.1" if mode == "direct" else HOST, str(port), str(runs // rounds), big]
                out = _client(argv) if mode == "direct" else _in_sandbox(sb, argv)
                rows[mode].samples_ms.extend(out["lat"])
                mbps[mode].extend(out["mbps"])
        init = _init_pid(srv, sb.id)  # the listener benchmark enters its namespace as the server does
        listener = _listener_ms(*init, runs=50) if init is not None else None
        sb.kill()
        return {"rows": rows, "mbps": mbps, "listener": listener}
    finally:
        upstream.kill()
        srv.close()
        shutil.rmtree(served, ignore_errors=True)


def _init_pid(srv: Server, sandbox_id: str) -> tuple[int, int] | None:
    """The sandbox init's host pid and start time, from the server's database."""
    import sqlite3

    con = sqlite3.connect(srv.home / "cove.db")
    try:
        (node,) = con.execute("SELECT node FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
    finally:
        con.close()
    handle = json.loads(node)
    return (int(handle["pid"]), int(handle["start_time"])) if "pid" in handle else None


def render(res: dict) -> list[str]:
    rows, mbps = res["rows"], res["mbps"]
    floor = rows["direct"]
    names = {
        "direct": "host → host loopback, direct (floor)",
        "forward": "sandbox → proxy → host loopback, plain HTTP",
        "connect": "sandbox → proxy → host loopback, CONNECT tunnel",
    }
    lines = [
        "## Egress",
        "`http.client` with a new connection per request (3-byte GET), from inside a sandbox in mode",
        "`allow` through its egress proxy, beside the same client on the host talking to the same",
        f"`python3 -m http.server` on loopback directly. Throughput: a {BIG >> 20} MiB file, 3 downloads,",
        "median. The three run interleaved in 5 rounds.",
        "",
        "| path | p50 ms | p95 ms | vs. floor | download MB/s |",
        "|---|---|---|---|---|",
    ]
    for key, row in rows.items():
        ratio = f"{row.p50 / floor.p50:.1f}×" if key != "direct" else ""
        thr = f"{statistics.median(mbps[key]):.0f}" if mbps[key] else ""
        lines.append(f"| {names[key]} | {row.p50:.2f} | {row.pct(0.95):.2f} | {ratio} | {thr} |")
    if res["listener"] is not None:
        lst = res["listener"]
        lines += [
            "",
            f"Opening the proxy's listener in a sandbox's namespace (done at create, resume and adoption): "
            f"p50 {lst.p50:.2f} ms, p95 {lst.pct(0.95):.2f} ms over {len(lst.samples_ms)} runs.",
        ]
    return lines


if __name__ == "__main__":
    print("\n".join(render(run())))
