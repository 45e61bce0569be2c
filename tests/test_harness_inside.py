"""The harness inside the sandbox (docs/harness-inside.md): an OpenAI Agents SDK loop runs as one
long-lived process in a cove sandbox, reaches only its model, through the egress proxy that injects
the model's key host-side, and is hibernated with its memory between turns.

Offline: the model is a scripted OpenAI-compatible server on host loopback (tests/model_server.py),
reached by the name `model.test` from the server's host map; the agent's packages are copied from
this host's venv into a template (cove.integrations.harness_inside.template).
"""

from __future__ import annotations

import http.server
import json
import os
import secrets
import shlex
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cove import Sandbox
from cove.devserver import Server
from cove.integrations import harness_inside
from model_server import ModelServer

pytest.importorskip(
    "agents", reason="the agent's packages come from this host: pip install 'cove[openai-agents]'"
)

TURNS = 5
RESTART_AFTER = 3  # the server restarts while the sandbox is hibernated after this turn


@pytest.fixture(scope="module")
def key() -> str:
    return "sk-inside-" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def model(key: str) -> Iterator[ModelServer]:
    srv = ModelServer(key).start()
    yield srv
    srv.stop()


class _Other(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def other() -> Iterator[int]:
    """Another server on host loopback, which the agent must not reach; its port."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Other)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def srv(key: str) -> Iterator[Server]:
    hosts = "model.test=127.0.0.1,other.test=127.0.0.1"
    env = {"COVE_EGRESS_HOSTS": hosts, "COVE_MAX_UPLOAD_BYTES": str(1 << 30)}  # Claude Code's binary: 370 MB
    server = Server(f"inside-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}", env)
    server.start()
    yield server
    log = server.log.read_text(errors="replace") if server.log.exists() else ""
    # This module writes hundreds of MB (layers, memory images): flushed before close unmounts the
    # storage, whose loop device close then waits for (30 s) rather than for the writeback.
    server.kill_all()
    os.sync()
    server.close()
    assert key not in log, "the model key was logged"


@pytest.fixture(scope="module")
def template(srv: Server) -> str:
    packages = ("openai-agents", "anthropic")  # the Claude-side test uses Anthropic's client
    return harness_inside.template("harness-test", packages, url=srv.url, api_key=srv.api_key).name


def _run(sb: Sandbox, cmd: str, user: str = "root") -> Any:
    return sb.exec(cmd, user=user, timeout=120)


# Looks for the key without ever holding it in a file, an argument or the environment of the sandbox:
# the argument is the key's bytes reversed, in hex. /usr is the host's, mounted read-only.
_FIND = r"""
import json, os, sys
key = bytes.fromhex(sys.argv[1])[::-1]
hits, read = [], []
for pid in os.listdir("/proc"):
    for name in ("environ", "cmdline"):
        try:
            if pid.isdigit():
                data = open(f"/proc/{pid}/{name}", "rb").read()
                read.append(f"{pid}/{name}")
                if key in data:
                    hits.append(f"/proc/{pid}/{name}")
        except OSError:
            pass
for top, dirs, files in os.walk("/"):
    if top == "/":
        dirs[:] = [d for d in dirs if d not in ("proc", "sys", "dev", "usr")]
    for f in files:
        path = os.path.join(top, f)
        try:
            if os.path.isfile(path) and not os.path.islink(path) and key in open(path, "rb").read():
                hits.append(path)
        except OSError:
            pass
print(json.dumps({"hits": hits, "read": read}))
"""


def _key_inside(sb: Sandbox, key: str, user: str) -> dict[str, list[str]]:
    """Where `user` finds the key in the sandbox (`hits`) and which /proc files it could read."""
    arg = key.encode()[::-1].hex()
    r = _run(sb, f"python3 -c {shlex.quote(_FIND)} {arg}", user)
    assert r.exit_code == 0, r
    return dict(json.loads(r.stdout))


def _holds(path: Path, needle: bytes) -> bool:
    with open(path, "rb") as f:
        tail = b""
        while chunk := f.read(1 << 20):
            if needle in tail + chunk:
                return True
            tail = chunk[-len(needle) :]
    return False


def _key_on_host(srv: Server, key: str) -> list[str]:
    """Files of the server's home holding the key, but for its database (where the record keeps it):
    the sandbox's files and its hibernation images (its memory) are under there, in the mounted
    storage (its image file, `storage.btrfs`, is that same content)."""
    hits = []
    for top, _, files in os.walk(srv.home):
        for f in files:
            path = Path(top) / f
            if path.name.startswith("cove.db") or path.name == "storage.btrfs" or path.is_symlink():
                continue
            try:
                if path.is_file() and _holds(path, key.encode()):
                    hits.append(str(path))
            except OSError:
                pass
    return hits


def test_the_loop_inside_survives_hibernation_and_a_restart_with_its_key_unseen(
    srv: Server, model: ModelServer, key: str, other: int, template: str
) -> None:
    host = f"model.test:{model.port}"
    network = {"mode": "allow", "allow": [host], "inject": {host: {"Authorization": f"Bearer {key}"}}}
    sb = Sandbox.create(template=template, network=network, timeout=1800, url=srv.url, api_key=srv.api_key)
    first = len(model.requests)  # the model server is the module's: this test's requests start here
    try:
        agent = harness_inside.InsideAgent.start(sb, base_url=f"http://{host}/v1")
        pid = sb.processes.connect(agent.process_id).info.pid
        items = 0
        times: dict[str, list[float]] = {"turn": [], "hibernate": [], "resumed turn": []}
        for turn in range(1, TURNS + 1):
            started = time.perf_counter()
            answer = agent.turn(f"task {turn}: add a line to the notes")
            times["turn" if turn == 1 else "resumed turn"].append(time.perf_counter() - started)
            # The loop's own counter and its conversation are in its memory only.
            assert answer["turn"] == turn, answer
            assert answer["reply"] == f"turn {turn}: {turn}", answer
            assert answer["items"] > items, answer
            items = answer["items"]
            # The model saw the whole conversation: every turn's message so far, and the tool's result.
            last = model.completions()[-1]
            assert last.users() == [f"task {i}: add a line to the notes" for i in range(1, turn + 1)]
            assert last.messages[-1]["role"] == "tool" and last.messages[-1]["content"].strip() == str(turn)
            if turn == TURNS:
                break
            started = time.perf_counter()
            info = sb.hibernate()
            times["hibernate"].append(time.perf_counter() - started)
            assert (
                info.state == "hibernated" and info.hibernation and info.hibernation.get("memory") is True
            ), info
            if turn == RESTART_AFTER:
                srv.restart()
                sb = Sandbox.connect(sb.id, url=srv.url, api_key=srv.api_key)
                agent = harness_inside.InsideAgent.attach(sb, agent.process_id, agent.offset)
        rss = _run(sb, f"grep VmRSS /proc/{pid}/status", "user").stdout.split()[1:]
        print({k: [round(v * 1000) for v in vs] for k, vs in times.items()}, "ms; agent RSS", rss)  # for the docs
        # One process all along, and every model call carried the injected key, none another.
        assert sb.processes.connect(agent.process_id).info.pid == pid
        mine = model.requests[first:]
        assert mine and all(r.authorization == f"Bearer {key}" for r in mine)
        assert len([r for r in mine if r.path == "/v1/chat/completions"]) == 2 * TURNS

        # The key is nowhere in the sandbox: environments, arguments, files; nor in its memory images.
        # As root (every file) and as the agent's own user (who can read its process's environment).
        for user in ("root", "user"):
            found = _key_inside(sb, key, user)
            assert found["hits"] == [], (user, found["hits"])
        assert f"{pid}/environ" in found["read"] and f"{pid}/cmdline" in found["read"], found["read"]
        environ = _run(sb, f"tr '\\0' '\\n' < /proc/{pid}/environ", "user").stdout
        assert "OPENAI_API_KEY=unused" in environ and "OPENAI_BASE_URL=http://model.test" in environ
        assert any(f"{pid}/environ" in hit for hit in _key_inside(sb, "OPENAI_API_KEY=unused", "user")["hits"])
        sb.hibernate()
        assert _key_on_host(srv, key) == []
        # ...where the same walk does find the conversation, in the memory images (not in a file).
        assert any("notes" not in hit for hit in _key_on_host(srv, f"task {TURNS}: add a line to the notes"))

        # Traffic anywhere else is refused: another host on the same machine, the model by raw IP,
        # and a connection that bypasses the proxy.
        curl = "curl -sS -m 20 --noproxy '' -o /dev/null -w '%{http_code}'"
        assert _run(sb, f"{curl} http://other.test:{other}/").stdout == "403"
        assert _run(sb, f"{curl} http://127.0.0.1:{model.port}/v1/models").stdout == "403"
        assert _run(sb, f"{curl} http://model.test:{model.port}/v1/models").stdout == "200"
        raw = "import socket; socket.create_connection(('192.0.2.1', 80), timeout=5)"
        assert "Network is unreachable" in _run(sb, f"python3 -c {shlex.quote(raw)}").stderr
        net = httpx.get(
            f"{srv.url}/v1/sandboxes/{sb.id}/network", headers={"Authorization": f"Bearer {srv.api_key}"}
        )
        assert net.json()["denied"] >= 2 and key not in net.text
        agent.close()
    finally:
        sb.kill()


_CLAUDE_CLIENT = r"""
import anthropic
client = anthropic.Anthropic()  # ANTHROPIC_BASE_URL, and a placeholder ANTHROPIC_API_KEY
for n in (1, 2):
    history = [{"role": "user", "content": f"message {i}"} for i in range(1, n + 1)]
    print(client.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=history).content[0].text)
"""


def test_the_anthropic_key_header_is_injected_the_same_way(
    srv: Server, model: ModelServer, key: str, template: str
) -> None:
    """Claude Code and the Claude Agent SDK call Anthropic's API with `x-api-key` at
    `ANTHROPIC_BASE_URL`; Anthropic's own client shows that the pattern holds for them (the CLI
    itself is not installable offline: see test_claude_code_inside)."""
    host = f"model.test:{model.port}"
    network = {"mode": "allow", "allow": [host], "inject": {host: {"x-api-key": key}}}
    env = {"ANTHROPIC_BASE_URL": f"http://{host}", "ANTHROPIC_API_KEY": "unused"}
    with Sandbox.create(template=template, network=network, url=srv.url, api_key=srv.api_key) as sb:
        for _ in range(2):  # before and after a hibernation
            before = len(model.requests)
            r = sb.exec(f"python3 -c {shlex.quote(_CLAUDE_CLIENT)}", env=env, timeout=120)
            assert r.exit_code == 0 and r.stdout == "turn 1\nturn 2\n", r
            sent = model.requests[before:]
            assert [s.authorization for s in sent] == [f"x-api-key {key}"] * 2  # "unused" was replaced
            assert [len(s.users()) for s in sent] == [1, 2]
            sb.hibernate()
        assert _key_inside(sb, key, "root")["hits"] == []


def _claude() -> Path | None:
    """The Claude Code CLI's native binary (setup.sh installs the npm package under
    /var/cache/cove-test-claude), or None."""
    candidates = [os.environ.get("COVE_TEST_CLAUDE"), shutil.which("claude"), CLAUDE_CACHE]
    for c in candidates:
        # The npm package's bin/claude.exe is a small placeholder until its postinstall copies the
        # platform's binary over it.
        if c and Path(c).is_file() and Path(c).stat().st_size > 10 << 20:
            return Path(c)
    return None


CLAUDE_CACHE = "/var/cache/cove-test-claude/node_modules/@anthropic-ai/claude-code/bin/claude.exe"
CLAUDE_ENV = {
    "ANTHROPIC_API_KEY": "unused",  # a placeholder: the proxy sets x-api-key
    "DISABLE_TELEMETRY": "1",
    "DISABLE_AUTOUPDATER": "1",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
}


def test_claude_code_inside(srv: Server, model: ModelServer, key: str) -> None:
    """Claude Code (the engine of the Claude Agent SDK) inside, its key injected, one `claude -p
    --resume` per turn: its conversation is its session file, kept across hibernation and a server
    restart. (Its long-lived streaming mode holds inotify watches that CRIU cannot dump on the
    sandbox's overlay root, so a hibernation with memory of that process fails, leaving it running.)"""
    binary = _claude()
    if binary is None:
        pytest.skip(
            "the Claude Code CLI (npm @anthropic-ai/claude-code, a ~370 MB native binary) is not "
            f"installed here: setup.sh puts it at {CLAUDE_CACHE}, or set COVE_TEST_CLAUDE"
        )
    host = f"model.test:{model.port}"
    network = {"mode": "allow", "allow": [host], "inject": {host: {"x-api-key": key}}}
    sb = Sandbox.create(network=network, memory_mb=2048, timeout=1800, url=srv.url, api_key=srv.api_key)
    try:
        with open(binary, "rb") as f:
            sb.files.write("/home/user/.local/bin/claude", f, mode=0o755)
        env = {**CLAUDE_ENV, "ANTHROPIC_BASE_URL": f"http://{host}"}
        session = str(uuid.uuid4())
        for turn in range(1, 4):
            before = len(model.requests)
            flag = f"--session-id {session}" if turn == 1 else f"--resume {session}"
            cmd = f"/home/user/.local/bin/claude -p {flag} --output-format json 'task {turn}'"
            r = sb.exec(cmd, env=env, cwd="/home/user", timeout=180)
            assert r.exit_code == 0, r
            result = json.loads(r.stdout)
            assert result["session_id"] == session and str(result["result"]).startswith("turn"), result
            sent = [m for m in model.requests[before:] if m.path.startswith("/v1/messages")]
            assert sent and all(m.authorization == f"x-api-key {key}" for m in sent), sent
            conversation = json.dumps(sent[-1].messages)
            assert all(f"task {i}" in conversation for i in range(1, turn + 1)), conversation[-2000:]
            info = sb.hibernate()
            assert info.state == "hibernated", info
            if turn == 2:
                srv.restart()
                sb = Sandbox.connect(sb.id, url=srv.url, api_key=srv.api_key)
        for user in ("root", "user"):
            assert _key_inside(sb, key, user)["hits"] == []
    finally:
        sb.kill()
