"""An "internet" for transparent-egress tests and benchmarks: a network namespace the caller makes,
joined to the host by a veth, with servers on documentation addresses (198.51.100.2, 203.0.113.2;
a DNS resolver on 198.51.100.53). Nothing leaves the machine.

Run as a script inside that namespace, it serves: HTTP on 198.51.100.2:80 and on 8080 (`/bytes/N`: N
bytes; else `hello <Host> <port>`), the same over TLS on 443, a TCP echo on 7000, a UDP echo on 9999,
DNS on 198.51.100.53:53 (`up.test` is 203.0.113.2, every other name NXDOMAIN), and for benchmarks a
blaster on 5001 and 203.0.113.2:80 (it reads a byte count and a newline, then sends that many bytes).
"""

from __future__ import annotations

import http.server
import os
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ADDR, OTHER, RESOLVER, GATEWAY = "198.51.100.2", "203.0.113.2", "198.51.100.53", "198.51.100.1"


class _Web(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.startswith("/bytes/"):
            size = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            chunk = b"x" * (1 << 20)
            left = size
            while left > 0:
                self.wfile.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
            return
        body = f"hello {self.headers.get('Host', '-')} {self.server.server_address[1]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _Blast(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        left = int(self.rfile.readline())
        chunk = memoryview(bytes(1 << 20))
        while left > 0:
            n = min(left, len(chunk))
            self.request.sendall(chunk[:n])
            left -= n


class _Threading(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def _dns() -> None:
    import dns.message
    import dns.rcode
    import dns.rrset

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((RESOLVER, 53))
    while True:
        data, peer = sock.recvfrom(4096)
        query = dns.message.from_wire(data)
        reply = dns.message.make_response(query)
        name = query.question[0].name.to_text().rstrip(".").lower()
        if name == "up.test" and query.question[0].rdtype == 1:
            reply.answer.append(dns.rrset.from_text(query.question[0].name, 120, "IN", "A", OTHER))
        elif name != "up.test":
            reply.set_rcode(dns.rcode.NXDOMAIN)
        sock.sendto(reply.to_wire(), peer)


def serve(cert: str) -> None:
    servers: list[socketserver.BaseServer] = []
    for addr in ((ADDR, 80), ("0.0.0.0", 8080)):
        servers.append(http.server.ThreadingHTTPServer(addr, _Web))
    tls = http.server.ThreadingHTTPServer(("0.0.0.0", 443), _Web)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert)
    tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
    servers.append(tls)
    servers.append(_Threading(("0.0.0.0", 7000), _Echo))
    servers += [_Threading(("0.0.0.0", 5001), _Blast), _Threading((OTHER, 80), _Blast)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    threading.Thread(target=_dns, daemon=True).start()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", 9999))
    print("ready", flush=True)
    while True:
        data, peer = udp.recvfrom(65536)
        udp.sendto(b"echo:" + data, peer)


class Outside:
    """The namespace, its link and its servers (`start`, `close`)."""

    def __init__(self, tag: str, workdir: Path) -> None:
        self.ns = f"cove-out-{tag}"
        self.link = f"xo{tag}"[:15]
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def _sh(self, *cmds: str) -> None:
        for cmd in cmds:
            subprocess.run(cmd, shell=True, check=True, capture_output=True)

    def start(self) -> None:
        self.close()
        cert = self.workdir / "outside.pem"
        if not cert.exists():
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=allowed.test",
                 "-addext", "subjectAltName=DNS:allowed.test,DNS:cdn.test,DNS:other.test",
                 "-keyout", str(cert), "-out", str(cert)],
                check=True, capture_output=True,
            )  # fmt: skip
        ns, link = self.ns, self.link
        self._sh(
            f"ip netns add {ns}",
            f"ip link add {link} type veth peer name xi netns {ns}",
            f"ip addr add {GATEWAY}/24 dev {link} && ip link set {link} up",
            f"ip -n {ns} addr add {ADDR}/24 dev xi && ip -n {ns} addr add {RESOLVER}/24 dev xi",
            f"ip -n {ns} addr add {OTHER}/24 dev xi && ip -n {ns} link set xi up && ip -n {ns} link set lo up",
            f"ip -n {ns} route add default via {GATEWAY}",
            f"ip route replace {OTHER}/32 via {ADDR}",  # one address: the /24 holds real hosts here (the package mirror)
        )
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, __file__, str(cert)],
            stdout=subprocess.PIPE,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError("the outside servers did not start")
        time.sleep(0.05)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        for cmd in (
            f"ip route del {OTHER}/32 via {ADDR}",
            f"ip link del {self.link}",
            f"ip netns del {self.ns}",
        ):
            subprocess.run(cmd, shell=True, capture_output=True)


if __name__ == "__main__":
    serve(sys.argv[1])
