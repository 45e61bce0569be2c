#!/usr/bin/python3 -I
"""`mcp-gateway` for cove sandboxes: the MCP servers a sandbox was created with, behind one MCP endpoint.

Installed as /opt/cove/bin/mcp-gateway by the base template. e2b's SDK runs it, as root, when a
sandbox is created with `mcp={...}`:

    mcp-gateway --config '{"calc": {"run_cmd": "python3 server.py"}, "github/owner/repo": {...}}'

Each entry with a `run_cmd` is a stdio MCP server started in the sandbox (`envs` added to its
environment); a `github/OWNER/REPO` key is cloned from GitHub first (through the sandbox's egress,
so its policy must allow github.com), with its `install_cmd` run in the clone. e2b's catalog servers
(entries without `run_cmd`) run as Docker images on e2b; cove has no catalog, so they are refused
with a message that says what to give instead. Every server is started and initialized before the
gateway answers; any failure ends it with status 1 and the reason on stderr (the SDK's "Failed to
start MCP gateway").

Then it serves MCP's Streamable HTTP transport on port 50005 at `/mcp` (JSON responses, no server
stream) to callers presenting `Authorization: Bearer $GATEWAY_ACCESS_TOKEN` (also written to
/etc/mcp-gateway/.token, readable by root only): the union of the servers' tools, a tool whose
name two servers share named `SERVER__TOOL`, each call passed to its server. It detaches once
listening; its log is /var/log/mcp-gateway.log. Standard library only: it runs on the sandbox's
own Python.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import re
import secrets
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PORT = 50005
TOKEN_FILE = "/etc/mcp-gateway/.token"
LOG = "/var/log/mcp-gateway.log"
WORK = "/root/mcp-servers"
VERSIONS = ("2025-06-18", "2025-03-26", "2024-11-05")  # MCP protocol versions it speaks
START_TIMEOUT = 60.0
CALL_TIMEOUT = 300.0
MAX_BODY = 8 << 20
_GITHUB = re.compile(r"^github/([A-Za-z0-9_.-]{1,100})/([A-Za-z0-9_.-]{1,100})$")


class Failed(Exception):
    pass


class Server:
    """One stdio MCP server: newline-delimited JSON-RPC on its stdin and stdout, one call at a time."""

    def __init__(self, name: str, argv: str, cwd: str, env: dict[str, str]) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.next_id = 0
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the server) a file, not a pipe: a chatty server never blocks on it
        try:
            self.proc = subprocess.Popen(
                ["/bin/sh", "-c", argv],
                cwd=cwd,
                env={**os.environ, **env},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.stderr,
                text=True,
                bufsize=1,
            )
        except OSError as e:
            raise Failed(f"{name}: cannot start {argv!r}: {e}") from e
        self.tools: list[dict[str, Any]] = []

    def call(self, method: str, params: dict[str, Any] | None, timeout: float) -> Any:
        with self.lock:
            self.next_id += 1
            msg_id = self.next_id
            self._send({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params or {}})
            timer = threading.Timer(timeout, self.proc.kill)
            timer.start()
            try:
                while True:
                    line = self.proc.stdout.readline() if self.proc.stdout else ""
                    if not line:
                        raise Failed(f"{self.name}: the server exited ({self.proc.wait(5)}): {self._err()}")
                    try:
                        reply = json.loads(line)
                    except ValueError:
                        continue  # a stray line on stdout: not protocol
                    if isinstance(reply, dict) and reply.get("id") == msg_id:
                        if "error" in reply:
                            raise RpcError(reply["error"])
                        return reply.get("result")
            finally:
                timer.cancel()

    def _err(self) -> str:
        self.stderr.seek(0, os.SEEK_END)
        self.stderr.seek(max(0, self.stderr.tell() - 2000))
        return self.stderr.read().decode(errors="replace").strip()

    def notify(self, method: str) -> None:
        with self.lock:
            self._send({"jsonrpc": "2.0", "method": method})

    def _send(self, msg: dict[str, Any]) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError) as e:
            raise Failed(f"{self.name}: the server is gone ({e})") from e


class RpcError(Exception):
    def __init__(self, error: Any) -> None:
        super().__init__(str(error))
        self.error = error if isinstance(error, dict) else {"code": -32603, "message": str(error)}


def _run(cmd: str, cwd: str, what: str, env: dict[str, str]) -> None:
    done = subprocess.run(
        ["/bin/sh", "-c", cmd], cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise Failed(
            f"{what} failed (status {done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]}"
        )


def start(config: dict[str, Any]) -> list[Server]:
    """Every configured server, started and initialized (tools listed); Failed names the first that is not."""
    servers = []
    for name, entry in config.items():
        if not isinstance(entry, dict) or "run_cmd" not in entry:
            raise Failed(
                f"{name!r} is a server of e2b's MCP catalog, which e2b runs as a Docker image; cove has no "
                'catalog: give the server as {"run_cmd": "<a stdio MCP server installed in the template>"}, '
                'or as "github/OWNER/REPO": {"run_cmd": ..., "install_cmd": ...}'
            )
        run_cmd, install_cmd, envs = entry.get("run_cmd"), entry.get("install_cmd"), entry.get("envs") or {}
        if not isinstance(run_cmd, str) or not run_cmd.strip():
            raise Failed(f"{name}: run_cmd must be a command")
        if not isinstance(envs, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in envs.items()
        ):
            raise Failed(f"{name}: envs must map names to strings")
        cwd = os.getcwd()
        if m := _GITHUB.match(name):
            cwd = os.path.join(WORK, f"{m.group(1)}-{m.group(2)}")
            if not os.path.isdir(cwd):
                os.makedirs(WORK, exist_ok=True)
                url = f"https://github.com/{m.group(1)}/{m.group(2)}.git"
                _run(
                    f"git clone --depth 1 {shlex.quote(url)} {shlex.quote(cwd)}",
                    WORK,
                    f"{name}: cloning {url}",
                    envs,
                )
            if install_cmd:
                _run(str(install_cmd), cwd, f"{name}: install_cmd", envs)
        server = Server(name, run_cmd, cwd, envs)
        servers.append(server)
        try:
            server.call(
                "initialize",
                {
                    "protocolVersion": VERSIONS[0],
                    "capabilities": {},
                    "clientInfo": {"name": "cove-mcp-gateway", "version": "1"},
                },
                START_TIMEOUT,
            )
            server.notify("notifications/initialized")
            server.tools = (server.call("tools/list", {}, START_TIMEOUT) or {}).get("tools") or []
        except (Failed, RpcError) as e:
            raise Failed(f"{name}: did not start as an MCP server: {e}") from e
    return servers


class Gateway:
    def __init__(self, servers: list[Server], token: str) -> None:
        self.token = token
        self.routes: dict[str, tuple[Server, str]] = {}
        self.tools: list[dict[str, Any]] = []
        names = [t.get("name") for s in servers for t in s.tools]
        for server in servers:
            for tool in server.tools:
                name = str(tool.get("name"))
                public = f"{server.name}__{name}" if names.count(name) > 1 else name
                self.routes[public] = (server, name)
                self.tools.append({**tool, "name": public})

    def handle(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        """The reply to one JSON-RPC message (None for a notification)."""
        method, msg_id, params = msg.get("method"), msg.get("id"), msg.get("params") or {}
        if msg_id is None:
            return None
        try:
            if method == "initialize":
                asked = params.get("protocolVersion")
                result: Any = {
                    "protocolVersion": asked if asked in VERSIONS else VERSIONS[0],
                    "capabilities": {"tools": {"listChanged": False}},
                    "serverInfo": {"name": "cove-mcp-gateway", "version": "1"},
                }
            elif method == "ping":
                result = {}
            elif method == "tools/list":
                result = {"tools": self.tools}
            elif method == "tools/call":
                route = self.routes.get(str(params.get("name")))
                if route is None:
                    raise RpcError({"code": -32602, "message": f"unknown tool {params.get('name')!r}"})
                server, name = route
                result = server.call("tools/call", {**params, "name": name}, CALL_TIMEOUT)
            else:
                raise RpcError({"code": -32601, "message": f"method {method!r} is not served by the gateway"})
        except RpcError as e:
            return {"jsonrpc": "2.0", "id": msg_id, "error": e.error}
        except Failed as e:
            return {"jsonrpc": "2.0", "id": msg_id, "error": {"code": -32603, "message": str(e)}}
        return {"jsonrpc": "2.0", "id": msg_id, "result": result}


def handler(gateway: Gateway) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if body is not None:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            got = self.headers.get("Authorization", "")
            if hmac.compare_digest(got.encode(), f"Bearer {gateway.token}".encode()):
                return True
            self._answer(401, {"error": "a valid Authorization: Bearer <MCP token> is required"})
            return False

        def do_POST(self) -> None:
            if self.path.split("?")[0] != "/mcp":
                return self._answer(404, {"error": "the MCP endpoint is /mcp"})
            if not self._authorized():
                return None
            size = int(self.headers.get("Content-Length") or 0)
            if not 0 < size <= MAX_BODY:
                return self._answer(
                    413 if size else 400, {"error": f"a JSON-RPC body of 1 to {MAX_BODY} bytes"}
                )
            try:
                msg = json.loads(self.rfile.read(size))
            except ValueError:
                return self._answer(
                    400, {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "not JSON"}}
                )
            batch = msg if isinstance(msg, list) else [msg]
            if not all(isinstance(m, dict) for m in batch):
                return self._answer(
                    400, {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "not a request"}}
                )
            replies = [r for r in (gateway.handle(m) for m in batch) if r is not None]
            if not replies:
                return self._answer(202)
            session = {"Mcp-Session-Id": self.headers.get("Mcp-Session-Id") or secrets.token_hex(16)}
            return self._answer(200, replies if isinstance(msg, list) else replies[0], session)

        def do_GET(self) -> None:
            if self._authorized():  # no server-initiated stream: MCP says 405
                self._answer(405, {"error": "this gateway sends no server stream"}, {"Allow": "POST, DELETE"})

        def do_DELETE(self) -> None:
            if self._authorized():
                self._answer(200, {})

        def log_message(self, fmt: str, *args: Any) -> None:
            sys.stderr.write("mcp-gateway: " + (fmt % args) + "\n")

    return Handler


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="mcp-gateway", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", required=True, help="the servers, as e2b's SDK passes them (JSON)")
    ap.add_argument("--port", type=int, default=PORT)
    args = ap.parse_args(argv)
    try:
        config = json.loads(args.config)
    except ValueError as e:
        print(f"mcp-gateway: --config is not JSON: {e}", file=sys.stderr)
        return 2
    if not isinstance(config, dict) or not config:
        print("mcp-gateway: --config must name at least one server", file=sys.stderr)
        return 2
    token = os.environ.get("GATEWAY_ACCESS_TOKEN") or secrets.token_urlsafe(24)
    try:
        servers = start(config)
        httpd = ThreadingHTTPServer(("0.0.0.0", args.port), handler(Gateway(servers, token)))
    except (Failed, OSError) as e:
        print(f"mcp-gateway: {e}", file=sys.stderr)
        return 1
    os.makedirs(os.path.dirname(TOKEN_FILE), mode=0o700, exist_ok=True)
    fd = os.open(TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    tools = sum(len(s.tools) for s in servers)
    print(f"mcp-gateway: {len(servers)} servers, {tools} tools, on :{args.port}/mcp", flush=True)
    if os.fork():  # the caller's command ends here; the gateway goes on, detached
        return 0
    os.setsid()
    try:
        os.makedirs(os.path.dirname(LOG), exist_ok=True)
        log = os.open(LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError:
        log = os.open(os.devnull, os.O_WRONLY)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    httpd.socket.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    httpd.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
