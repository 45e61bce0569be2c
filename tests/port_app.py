"""A small HTTP/WebSocket server to run inside sandboxes, for the tests of traffic into them."""

from __future__ import annotations

import time

import httpx

# A server for the proxy tests, standard library only (the sandbox's python3 is the host's).
#   GET /headers -> the request's headers as JSON     POST /echo -> length and sha256 of the body
#   GET /stream  -> "first\n", then the rest once /tmp/go exists (proves the response is streamed)
#   GET with Upgrade: websocket -> "path=<path>" first, then an echo of every message
APP = r"""
import base64, hashlib, http.server, json, os, struct, sys, time

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, body, status=200, kind="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.headers.get("Upgrade", "").lower() == "websocket":
            return self.websocket()
        if self.path.startswith("/headers"):
            return self.reply(json.dumps({"path": self.path, "headers": dict(self.headers.items())}).encode())
        if self.path.startswith("/stream"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.chunk(b"first\n")
            while not os.path.exists("/tmp/go"):
                time.sleep(0.02)
            self.chunk(b"second\n")
            self.chunk(b"")
            return
        self.reply(b"not here", 404, "text/plain")

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_POST(self):
        digest, size = hashlib.sha256(), 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                n = int(self.rfile.readline().split(b";")[0], 16)
                data = self.rfile.read(n)
                self.rfile.readline()
                if n == 0:
                    break
                digest.update(data)
                size += n
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left:
                data = self.rfile.read(min(left, 1 << 16))
                digest.update(data)
                size += len(data)
                left -= len(data)
        self.reply(json.dumps({"size": size, "sha256": digest.hexdigest()}).encode())

    def websocket(self):
        accept = base64.b64encode(hashlib.sha1((self.headers["Sec-WebSocket-Key"] + GUID).encode()).digest())
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept.decode())
        if self.headers.get("Sec-WebSocket-Protocol"):
            self.send_header("Sec-WebSocket-Protocol", self.headers["Sec-WebSocket-Protocol"].split(",")[0].strip())
        self.end_headers()
        self.wfile.flush()
        self.frame(1, ("path=" + self.path).encode())
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                break
            op, n = head[0] & 15, head[1] & 127
            if n == 126:
                n = struct.unpack(">H", self.rfile.read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4) if head[1] & 128 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(n)))
            self.frame(op, data)
            if op == 8:
                break
        self.close_connection = True

    def frame(self, op, data):
        n = len(data)
        size = bytes([n]) if n < 126 else (b"\x7e" + struct.pack(">H", n) if n < 65536 else b"\x7f" + struct.pack(">Q", n))
        self.wfile.write(bytes([128 | op]) + size + data)
        self.wfile.flush()


http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def start_app(api: httpx.Client, sandbox_id: str, port: int) -> None:
    """Start APP on `port` in the sandbox and wait until it listens."""
    r = api.put(f"/v1/sandboxes/{sandbox_id}/files", params={"path": "/tmp/app.py"}, content=APP.encode())
    assert r.status_code == 200, r.text
    r = api.post(
        f"/v1/sandboxes/{sandbox_id}/processes", json={"argv": ["python3", "/tmp/app.py", str(port)]}
    )
    assert r.status_code == 201, r.text
    wait_listening(api, sandbox_id, port)


def wait_listening(api: httpx.Client, sandbox_id: str, port: int) -> None:
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), 1)"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        r = api.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"argv": ["python3", "-c", probe]})
        if r.json()["exit_code"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port} in {sandbox_id}")
