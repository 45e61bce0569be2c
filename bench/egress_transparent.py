"""Transparent egress (COVE_EGRESS=transparent): connection setup and throughput from inside a sandbox
to a server in another network namespace, beside the floors measured in the same run: the same client
on the host against the same server on host loopback, and against the outside namespace directly.

Paths: `kernel` is the forwarded one (veth, nftables, masquerade: what every port but 80/443 takes);
`peeker` is TCP 80/443 to an address admitted by name, redirected to cove's SNI/Host check and spliced.
The outside namespace and its servers are tests/outside_net.py's.
"""

from __future__ import annotations

import json
import shlex
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from core import Row
from cove import Sandbox
from cove.devserver import Server

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from outside_net import ADDR, OTHER, Outside, _Blast

BIG = 256 << 20  # bytes per throughput sample

# The same client on the host and in the sandbox: a new connection per request (connect, ask for one
# byte, read it), then downloads of `big` bytes through recv_into.
CLIENT = r"""
import json, socket, sys, time
name, port, runs, big = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
out = {"lat": [], "mbps": [], "dns": []}
for _ in range(runs):  # a name's lookup (cove's DNS in a sandbox), timed apart from the connections
    t = time.perf_counter(); host = socket.gethostbyname(name)
    out["dns"].append((time.perf_counter() - t) * 1000)
for _ in range(runs):
    t = time.perf_counter()
    s = socket.create_connection((host, port)); s.sendall(b"1\n"); s.recv(1); s.close()
    out["lat"].append((time.perf_counter() - t) * 1000)
buf = memoryview(bytearray(1 << 20))
for _ in range(1 if big else 0):
    t = time.perf_counter()
    s = socket.create_connection((host, port)); s.sendall(b"%d\n" % big); n = 0
    while r := s.recv_into(buf):
        n += r
    s.close()
    out["mbps"].append(n / (time.perf_counter() - t) / 1e6)
print(json.dumps(out))
"""


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def _host(argv: list[str]) -> dict:
    done = subprocess.run(
        ["/usr/bin/python3", "-c", CLIENT, *argv], capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr)
    return json.loads(done.stdout)


def _sandbox(sb: Sandbox, argv: list[str]) -> dict:
    res = sb.exec(f"/usr/bin/python3 -c {shlex.quote(CLIENT)} {' '.join(argv)}", timeout=600)
    if res.exit_code != 0:
        raise RuntimeError(res.stderr)
    return json.loads(res.stdout)


def run(runs: int = 200) -> dict:
    outside = Outside("bench", Path(tempfile.mkdtemp(prefix="cove-bench-outside-")))
    outside.start()
    loop = _Server(("127.0.0.1", 0), _Blast)
    threading.Thread(target=loop.serve_forever, daemon=True).start()
    hosts = f"blast.test={ADDR},peek.test={OTHER}"
    srv = Server("bench-egress-tx", {"COVE_EGRESS": "transparent", "COVE_EGRESS_HOSTS": hosts})
    srv.start()
    try:
        sb = Sandbox.create(
            url=srv.url,
            api_key=srv.api_key,
            timeout=900,
            cpu=2,
            network={"mode": "allow", "allow": ["blast.test", "peek.test"]},
        )
        sb.exec("getent hosts blast.test peek.test")  # resolved once: the answers pin the addresses
        paths = {
            "loopback": ("host", "127.0.0.1", loop.server_address[1]),
            "outside": ("host", ADDR, 5001),
            "kernel": ("sandbox", "blast.test", 5001),
            "peeker": ("sandbox", "peek.test", 80),
        }
        rows = {k: Row(k) for k in paths}
        dns = Row("dns")
        mbps: dict[str, list[float]] = {k: [] for k in paths}
        rounds = 7  # interleaved (one download per path per round), so load changes hit every path alike
        for _ in range(rounds):
            for key, (where, host, port) in paths.items():
                argv = [host, str(port), str(runs // rounds), str(BIG)]
                out = _host(argv) if where == "host" else _sandbox(sb, argv)
                rows[key].samples_ms.extend(out["lat"])
                if key == "kernel":
                    dns.samples_ms.extend(out["dns"])
                mbps[key].extend(out["mbps"])
        net = sb.get_network()
        sb.kill()
        creates: dict[str, Row] = {"none": Row("none"), "allow": Row("allow")}
        for _ in range(5):  # what the link costs at create: mode none has none
            for mode, row in creates.items():
                t = time.perf_counter()
                extra = Sandbox.create(
                    url=srv.url, api_key=srv.api_key, network={"mode": mode, "allow": ["blast.test"]}
                )
                row.samples_ms.append((time.perf_counter() - t) * 1000)
                extra.kill()
        return {"rows": rows, "mbps": mbps, "creates": creates, "allowed": net.allowed, "dns": dns}
    finally:
        srv.close()
        loop.shutdown()
        outside.close()


def render(res: dict) -> list[str]:
    rows, mbps = res["rows"], res["mbps"]
    floor, floor_mbps = rows["loopback"], statistics.median(mbps["loopback"])
    names = {
        "loopback": "host → host loopback (floor)",
        "outside": "host → outside namespace, direct veth",
        "kernel": "sandbox → outside, transparent (forwarded, nftables, NAT)",
        "peeker": "sandbox → outside :80, transparent via the SNI/Host peeker (splice)",
    }
    lines = [
        "## Transparent egress",
        "A new TCP connection per request (connect, 1 byte asked, 1 byte read) from inside a sandbox in mode",
        "`allow` under `COVE_EGRESS=transparent`, beside the same client on the host against the same kind of",
        f"server on loopback and in the outside namespace. Throughput: {BIG >> 20} MiB through `recv_into`,",
        "one download per path per round, median. The paths run interleaved in 7 rounds. `bench/egress_transparent.py`.",
        "",
        "| path | connect+1 byte p50 ms | p95 ms | added vs. floor (p50) | MB/s | vs. floor |",
        "|---|---|---|---|---|---|",
    ]
    for key, row in rows.items():
        added = f"{row.p50 - floor.p50:+.2f} ms" if key != "loopback" else ""
        thr = statistics.median(mbps[key]) if mbps[key] else 0.0
        ratio = f"{thr / floor_mbps * 100:.0f}%" if key != "loopback" else ""
        lines.append(
            f"| {names[key]} | {row.p50:.2f} | {row.pct(0.95):.2f} | {added} | {thr:.0f} | {ratio} |"
        )
    dns = res["dns"]
    lines += [
        "",
        f"A lookup through cove's DNS from the sandbox (`gethostbyname`, an allowed name, its pin refreshed): "
        f"p50 {dns.p50:.2f} ms, p95 {dns.pct(0.95):.2f} ms. A create (client-side, 5 each, p50): mode `none` "
        f"(no link) {res['creates']['none'].p50:.0f} ms, mode `allow` (veth, addresses, one nftables batch) "
        f"{res['creates']['allow'].p50:.0f} ms.",
    ]
    return lines


if __name__ == "__main__":
    print("\n".join(render(run())))
