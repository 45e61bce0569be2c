"""Egress: each sandbox's network mode (none, allow, deny, open), enforced by the proxy the server
serves inside its namespace (docs/network.md).

Real sandboxes, a real HTTP server on host loopback (the "internet" of these tests) and a scratch cove
server whose host map (COVE_EGRESS_HOSTS) points the test's names at it. No test sends traffic
anywhere but loopback: names outside the map are refused before the proxy would resolve them.
"""

from __future__ import annotations

import http.server
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from cove import Sandbox
from cove.devserver import Server
from cove.network.egress_policy import Policy, from_e2b, parse_rule

PROXY_PORT = 17770
NAMES = ("allowed.test", "other.test", "blocked.test")


class _Upstream(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/bytes/"):  # /bytes/N: N bytes
            size = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            for _ in range(0, size, 1 << 16):
                self.wfile.write(b"x" * min(1 << 16, size))
            return
        body = f"upstream ok {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    """A web server on host loopback; the port."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    hosts = ",".join(f"{name}=127.0.0.1" for name in NAMES)
    server = Server(f"egress-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}", {"COVE_EGRESS_HOSTS": hosts})
    server.start()
    yield server
    server.close()


@pytest.fixture
def api(srv: Server) -> Iterator[httpx.Client]:
    with srv.client() as c:
        yield c


def create(api: httpx.Client, made: list[str], network: dict[str, Any] | None = None) -> str:
    r = api.post("/v1/sandboxes", json={"timeout": 600, **({"network": network} if network else {})})
    assert r.status_code == 201, r.text
    made.append(r.json()["id"])
    return made[-1]


def run(api: httpx.Client, sid: str, cmd: str) -> dict[str, Any]:
    r = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": cmd, "timeout": 60})
    assert r.status_code == 200, r.text
    return r.json()


def curl(api: httpx.Client, sid: str, url: str, *args: str) -> dict[str, Any]:
    """curl through the proxy variables (for every host: `--noproxy ''` clears no_proxy's loopback)."""
    return run(api, sid, f"curl -sS -f -m 20 --noproxy '' {' '.join(args)} {url}")


def get(api: httpx.Client, sid: str, url: str) -> str:
    """urllib (what pip and requests build on) through the proxy variables: the body, or the error."""
    code = (
        "import urllib.request, urllib.error\n"
        "try:\n"
        f"    print(urllib.request.urlopen({url!r}, timeout=20).read().decode(), end='')\n"
        "except urllib.error.HTTPError as e:\n"
        "    print('HTTP', e.code, e.read().decode(), end='')\n"
        "except OSError as e:\n"
        "    print('ERROR', e, end='')\n"
    )
    return run(api, sid, f"NO_PROXY= no_proxy= python3 -c {shlex.quote(code)}")["stdout"]


def raw_connect(api: httpx.Client, sid: str, host: str, port: int) -> str:
    """A plain socket, no proxy: 'connected' or the errno's name, and how long it took."""
    code = (
        "import errno, socket, time\n"
        "t = time.monotonic(); s = socket.socket(); s.settimeout(30)\n"
        "try:\n"
        f"    s.connect(({host!r}, {port})); r = 'connected'\n"
        "except OSError as e:\n"
        "    r = errno.errorcode.get(e.errno, str(e))\n"
        "print(r, round(time.monotonic() - t, 3))\n"
    )
    return run(api, sid, f"python3 -c {shlex.quote(code)}")["stdout"]


def network(api: httpx.Client, sid: str) -> dict[str, Any]:
    r = api.get(f"/v1/sandboxes/{sid}/network")
    assert r.status_code == 200, r.text
    return r.json()


# -- the policy itself (no sandbox) ----------------------------------------------------------------
def test_rules_parse_and_normalise() -> None:
    assert parse_rule("PyPI.org.").text == "pypi.org"
    assert parse_rule("*.pythonhosted.org:443").text == "*.pythonhosted.org:443"
    assert parse_rule("10.1.2.3/8:8000-8999").text == "10.0.0.0/8:8000-8999"
    assert parse_rule("[::1]:8080").text == "[::1]:8080"
    assert parse_rule("2001:db8::/32").text == "2001:db8::/32"
    assert parse_rule("*:443").any_host
    for bad in ("", "a b", "x.com:0", "x.com:70000", "x.com:9-1", "300.1.1.1/8", "[::1", "*.", "-a.com"):
        with pytest.raises(ValueError):
            parse_rule(bad)


def test_decisions() -> None:
    from ipaddress import ip_address as ip

    pub = ip("93.184.216.34")
    allow = Policy.parse("allow", ["*.example.com:443", "pypi.org"], ["secret.example.com"])
    assert allow.decide("a.example.com", pub, 443) is None
    assert allow.decide("example.com", pub, 443) == "it is not in the allow list"  # wildcard: below only
    assert allow.decide("a.example.com", pub, 80) == "it is not in the allow list"
    assert "deny rule" in str(allow.decide("secret.example.com", pub, 443))
    deny = Policy.parse("deny", ["ok.bad.com"], ["*.bad.com"])
    assert deny.decide("x.bad.com", pub, 80) and deny.decide("ok.bad.com", pub, 80) is None
    assert Policy.parse("none").decide("pypi.org", pub, 443) == "the sandbox's network mode is none"
    # Loopback and private addresses need an explicit rule, whatever the mode.
    lo = ip("127.0.0.1")
    assert Policy.parse("open").decide("x", lo, 80, protected=True)
    assert Policy.parse("open", ["0.0.0.0/0"]).decide("x", lo, 80, protected=True)
    assert Policy.parse("open", ["127.0.0.1:80"]).decide("x", lo, 80, protected=True) is None
    assert Policy.parse("open", ["127.0.0.1:80"]).decide("x", lo, 81, protected=True)
    assert Policy.parse("allow", ["localhost"]).decide("localhost", lo, 9, protected=True) is None
    assert Policy.parse("open").decide("mapped", lo, 80, protected=True, trusted_name=True) is None
    # cove's API: only an IP rule with its port opens it, never the host map.
    assert Policy.parse("open", ["127.0.0.0/8"]).decide("x", lo, 7770, protected=True, cove_api=True)
    assert Policy.parse("open").decide("m", lo, 7770, protected=True, trusted_name=True, cove_api=True)
    assert Policy.parse("open", ["127.0.0.1:7770"]).decide("x", lo, 7770, cove_api=True) is None


def test_e2b_settings_map_to_modes() -> None:
    assert from_e2b(None, None)["mode"] == "open"
    assert from_e2b(None, ["0.0.0.0/0"]) == {"mode": "none", "allow": [], "deny": []}
    assert from_e2b(["1.1.1.1"], ["0.0.0.0/0", "8.8.8.8"]) == {
        "mode": "allow",
        "allow": ["1.1.1.1"],
        "deny": [],
    }
    assert from_e2b(["1.1.1.1"], ["8.8.8.0/24"]) == {
        "mode": "deny",
        "allow": ["1.1.1.1"],
        "deny": ["8.8.8.0/24"],
    }


# -- real sandboxes --------------------------------------------------------------------------------
def test_none_is_the_default_and_blocks_everything(api: httpx.Client, made: list[str], upstream: int) -> None:
    sid = create(api, made)
    info = api.get(f"/v1/sandboxes/{sid}").json()
    assert info["network"]["mode"] == "none"
    env = run(api, sid, "env")["stdout"]
    assert f"HTTPS_PROXY=http://127.0.0.1:{PROXY_PORT}" in env and "https_proxy=" in env

    out = get(api, sid, f"http://allowed.test:{upstream}/")
    assert out.startswith("HTTP 403") and "mode none" in out, out
    res = curl(api, sid, f"http://allowed.test:{upstream}/", "-p")  # a CONNECT tunnel
    assert res["exit_code"] in (22, 56) and "403" in res["stderr"], res
    # No way around the proxy: no route out, and the sandbox's loopback is its own.
    assert raw_connect(api, sid, "192.0.2.1", 80).startswith("ENETUNREACH")
    assert raw_connect(api, sid, "127.0.0.1", upstream).startswith("ECONNREFUSED")
    res = run(api, sid, f"curl -sS -m 20 --noproxy '*' http://allowed.test:{upstream}/")
    assert res["exit_code"] == 6, res  # the name does not even resolve inside

    status = network(api, sid)
    assert status["proxy"] == f"http://127.0.0.1:{PROXY_PORT}" and status["denied"] == 2
    assert status["last_denied"]["target"] == f"allowed.test:{upstream}"


def test_allow_list_lets_exactly_the_allowed_through(
    api: httpx.Client, made: list[str], upstream: int
) -> None:
    sid = create(api, made, {"mode": "allow", "allow": [f"allowed.test:{upstream}"]})
    assert curl(api, sid, f"http://allowed.test:{upstream}/plain")["stdout"] == "upstream ok /plain\n"
    assert curl(api, sid, f"http://allowed.test:{upstream}/tunnel", "-p")["stdout"] == "upstream ok /tunnel\n"
    assert get(api, sid, f"http://allowed.test:{upstream}/urllib") == "upstream ok /urllib\n"

    out = get(api, sid, f"http://other.test:{upstream}/")  # another name for the same server
    assert out == (
        f"HTTP 403 cove egress policy: other.test:{upstream} is not allowed (mode allow): "
        "it is not in the allow list\n"
    )
    with socket.socket() as s:  # a second port on the same host
        s.bind(("127.0.0.1", 0))
        other_port = s.getsockname()[1]
    assert "HTTP 403" in get(api, sid, f"http://allowed.test:{other_port}/")
    assert "HTTP 403" in get(api, sid, f"http://127.0.0.1:{upstream}/")  # the raw address
    assert "HTTP 403" in get(api, sid, "http://example.com/")  # refused before any lookup
    res = curl(api, sid, f"http://other.test:{upstream}/", "-p")
    assert res["exit_code"] in (22, 56) and "403" in res["stderr"]
    # Without the proxy variables nothing reaches the host's server.
    assert raw_connect(api, sid, "127.0.0.1", upstream).startswith("ECONNREFUSED")
    assert raw_connect(api, sid, "192.0.2.1", upstream).startswith("ENETUNREACH")
    assert network(api, sid)["denied"] == 5


def test_rule_forms_in_a_sandbox(api: httpx.Client, made: list[str], upstream: int) -> None:
    sid = create(api, made, {"mode": "allow", "allow": ["*.test", f"127.0.0.1:{upstream}"]})
    for host in ("allowed.test", "other.test", "127.0.0.1"):
        assert get(api, sid, f"http://{host}:{upstream}/w") == "upstream ok /w\n"
    # `*` with a port names no protected address; the host map's names are the operator's.
    api.put(f"/v1/sandboxes/{sid}/network", json={"mode": "allow", "allow": [f"*:{upstream}"]})
    assert get(api, sid, f"http://other.test:{upstream}/w") == "upstream ok /w\n"
    out = get(api, sid, f"http://127.0.0.1:{upstream}/")
    assert "HTTP 403" in out and "loopback, private or host address" in out


def test_deny_mode_blocks_the_listed_only(
    api: httpx.Client, made: list[str], upstream: int, srv: Server
) -> None:
    sid = create(api, made, {"mode": "deny", "deny": ["blocked.test"]})
    out = get(api, sid, f"http://blocked.test:{upstream}/")
    assert "HTTP 403" in out and "matches deny rule 'blocked.test'" in out, out
    assert get(api, sid, f"http://allowed.test:{upstream}/d") == "upstream ok /d\n"
    assert get(api, sid, f"http://other.test:{upstream}/d") == "upstream ok /d\n"
    # Open egress still keeps the host's own loopback and cove's API out.
    assert "HTTP 403" in get(api, sid, f"http://127.0.0.1:{upstream}/")
    out = get(api, sid, f"http://allowed.test:{srv.port}/healthz")
    assert "HTTP 403" in out and "cove's own API" in out, out


def test_policy_change_applies_to_a_running_sandbox(
    srv: Server, api: httpx.Client, made: list[str], upstream: int
) -> None:
    sb = Sandbox.create(url=srv.url, api_key=srv.api_key, timeout=600)
    made.append(sb.id)
    # A process started before the change, retrying every 0.1 s.
    loop = (
        "import time, urllib.request\n"
        "while True:\n"
        "    try:\n"
        f"        r = urllib.request.urlopen('http://allowed.test:{upstream}/loop', timeout=5).read()\n"
        "    except Exception as e:\n"
        "        r = repr(e).encode()\n"
        "    open('/tmp/last', 'wb').write(r); time.sleep(0.1)\n"
    )
    sb.processes.start(["python3", "-c", loop])

    def last() -> str:
        time.sleep(0.5)
        return sb.files.read("/tmp/last")

    assert "403" in last()
    info = sb.set_network("allow", allow=[f"allowed.test:{upstream}"])
    assert info.mode == "allow" and info.allow == [f"allowed.test:{upstream}"]
    deadline = time.monotonic() + 10
    while last() != "upstream ok /loop\n" and time.monotonic() < deadline:
        pass
    assert last() == "upstream ok /loop\n"
    assert sb.info().network.mode == "allow"

    # The CLI changes it too: back to none.
    env = {**os.environ, "COVE_URL": srv.url, "COVE_API_KEY": srv.api_key}
    done = subprocess.run(
        [sys.executable, "-m", "cove", "network", sb.id, "--mode", "none", "--json"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0 and json.loads(done.stdout)["mode"] == "none", done.stderr
    deadline = time.monotonic() + 10
    while "403" not in last() and time.monotonic() < deadline:
        pass
    assert "403" in last()
    sb.close()


def test_cli_create_and_allow(srv: Server, api: httpx.Client, made: list[str], upstream: int) -> None:
    env = {**os.environ, "COVE_URL": srv.url, "COVE_API_KEY": srv.api_key}

    def cove(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cove", *args], env=env, capture_output=True, text=True, timeout=60
        )

    done = cove("create", "--network", f"allow:other.test:{upstream},blocked.test")
    assert done.returncode == 0, done.stderr
    sid = done.stdout.strip()
    made.append(sid)
    assert network(api, sid)["allow"] == [f"other.test:{upstream}", "blocked.test"]
    done = cove("network", sid, "--allow", f"allowed.test:{upstream}")
    assert done.returncode == 0 and f"allowed.test:{upstream}" in done.stdout, done.stderr
    assert get(api, sid, f"http://allowed.test:{upstream}/cli") == "upstream ok /cli\n"
    bad = cove("create", "--network", "sideways")
    assert bad.returncode != 0 and "--network" in bad.stderr + bad.stdout


def test_sandboxes_cannot_reach_each_other_or_cove(
    srv: Server, api: httpx.Client, made: list[str], upstream: int
) -> None:
    a = create(api, made, {"mode": "open"})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free on the host: nothing of the host's answers there
    api.post(
        f"/v1/sandboxes/{a}/processes",
        json={"cmd": f"mkdir -p /tmp/w && echo sandbox-a-secret > /tmp/w/s && "
              f"python3 -m http.server {port} --bind 0.0.0.0 --directory /tmp/w"},
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        mine = run(api, a, f"curl -sS --noproxy '*' http://127.0.0.1:{port}/s")
        if mine["exit_code"] == 0:
            break
        time.sleep(0.2)
    assert mine["stdout"] == "sandbox-a-secret\n"  # A reaches its own server

    policies: list[dict[str, Any]] = [
        {"mode": "none"},
        {"mode": "open"},
        {"mode": "deny"},
        {"mode": "allow", "allow": [f"127.0.0.1:{port}", f"*:{port}", "127.0.0.0/8"]},
    ]
    b = create(api, made)
    for policy in policies:
        assert api.put(f"/v1/sandboxes/{b}/network", json=policy).status_code == 200
        for url in (f"http://127.0.0.1:{port}/s", f"http://allowed.test:{port}/s"):
            assert "sandbox-a-secret" not in get(api, b, url), policy
        assert raw_connect(api, b, "127.0.0.1", port).startswith("ECONNREFUSED")

    # cove's own API on host loopback: refused in open mode, reachable only when named with its port.
    api.put(f"/v1/sandboxes/{b}/network", json={"mode": "open", "allow": ["127.0.0.0/8"]})
    out = get(api, b, f"http://127.0.0.1:{srv.port}/healthz")
    assert "HTTP 403" in out and "cove's own API" in out, out
    api.put(f"/v1/sandboxes/{b}/network", json={"mode": "allow", "allow": [f"127.0.0.1:{srv.port}"]})
    assert '"ok"' in get(api, b, f"http://127.0.0.1:{srv.port}/healthz")


def test_e2b_sdk_network_settings_are_enforced(
    srv: Server, made: list[str], upstream: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from e2b import Sandbox as E2bSandbox
    from e2b.sandbox.commands.command_handle import CommandExitException

    for name in ("E2B_DEBUG", "E2B_DOMAIN", "E2B_ACCESS_TOKEN", "E2B_HTTP_VERSION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("E2B_API_URL", srv.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", srv.url)
    monkeypatch.setenv("E2B_API_KEY", srv.api_key)

    def fetch(sb: Any, host: str) -> str:
        try:
            return sb.commands.run(f"curl -sS -f -m 20 --noproxy '' http://{host}:{upstream}/e2b").stdout
        except CommandExitException as e:
            return f"exit {e.exit_code}: {e.stderr}"

    offline = E2bSandbox.create(allow_internet_access=False, timeout=300)
    made.append(offline.sandbox_id)
    assert "403" in fetch(offline, "allowed.test")

    listed = E2bSandbox.create(
        network={"deny_out": ["0.0.0.0/0"], "allow_out": [f"allowed.test:{upstream}"]}, timeout=300
    )
    made.append(listed.sandbox_id)
    assert fetch(listed, "allowed.test") == "upstream ok /e2b\n"
    assert "403" in fetch(listed, "other.test")

    default = E2bSandbox.create(timeout=300)  # e2b's default: internet access on
    made.append(default.sandbox_id)
    assert fetch(default, "other.test") == "upstream ok /e2b\n"
    default.update_network({"deny_out": ["other.test"]})
    assert "403" in fetch(default, "other.test")
    assert fetch(default, "allowed.test") == "upstream ok /e2b\n"
    info = default.get_info()
    assert info.network["deny_out"] == ["other.test"]

    with pytest.raises(Exception, match="not a domain"):
        E2bSandbox.create(network={"allow_out": ["not a host"]}, timeout=300)


def test_policy_survives_hibernation_restart_and_fork(
    srv: Server, api: httpx.Client, made: list[str], upstream: int
) -> None:
    sid = create(api, made, {"mode": "allow", "allow": [f"allowed.test:{upstream}"]})

    def holds(sandbox: str) -> None:
        assert get(api, sandbox, f"http://allowed.test:{upstream}/h") == "upstream ok /h\n"
        assert "HTTP 403" in get(api, sandbox, f"http://other.test:{upstream}/h")

    holds(sid)
    r = api.post(f"/v1/sandboxes/{sid}/hibernate")
    assert r.status_code == 200 and r.json()["state"] == "hibernated"
    assert network(api, sid)["proxy"] is None  # no listener while it sleeps
    holds(sid)  # the call resumes it; the restored namespace got a new listener
    fork = api.post(f"/v1/sandboxes/{sid}/fork", json={"count": 1})
    assert fork.status_code == 201, fork.text
    child = fork.json()["items"][0]["id"]
    made.append(child)
    assert fork.json()["items"][0]["network"]["mode"] == "allow"
    holds(child)

    srv.restart()
    with srv.client() as fresh:
        for sandbox in (sid, child):
            assert get(fresh, sandbox, f"http://allowed.test:{upstream}/r") == "upstream ok /r\n"
            assert "HTTP 403" in get(fresh, sandbox, f"http://other.test:{upstream}/r")
            assert network(fresh, sandbox)["proxy"] is not None


def test_invalid_settings_are_422(api: httpx.Client, made: list[str]) -> None:
    cases = [
        ({"mode": "sometimes"}, "network.mode"),
        ({"mode": "allow", "allow": ["pypi.org", "not a host"]}, "allow[1]: 'not a host'"),
        ({"mode": "allow", "allow": ["x.org:99999"]}, "ports go from 1 to 65535"),
        ({"mode": "deny", "deny": ["10.0.0.0/33"]}, "not a valid IP address or CIDR"),
        ({"mode": "allow", "alow": ["x.org"]}, "network.alow"),
    ]
    for body, words in cases:
        r = api.post("/v1/sandboxes", json={"network": body})
        assert r.status_code == 422 and words in r.json()["error"]["message"], (body, r.text)
    sid = create(api, made)
    r = api.put(f"/v1/sandboxes/{sid}/network", json={"mode": "allow", "allow": ["*.*.x"]})
    assert r.status_code == 422 and "not a domain" in r.text
    assert api.get("/v1/sandboxes/nosuchsandbox00/network").status_code == 404
    api.delete(f"/v1/sandboxes/{sid}")
    assert api.put(f"/v1/sandboxes/{sid}/network", json={"mode": "open"}).status_code == 409


def _socket_namespaces(pid: int) -> set[int]:
    """The network namespaces (inodes) of every socket process `pid` holds: each fd is copied here
    with pidfd_getfd and asked with SIOCGSKNS."""
    import ctypes
    import fcntl

    libc = ctypes.CDLL(None, use_errno=True)
    found: set[int] = set()
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = libc.syscall(438, pidfd, int(name), 0)  # pidfd_getfd
            if fd < 0:
                continue
            try:
                ns = fcntl.ioctl(fd, 0x894C)  # SIOCGSKNS
                found.add(os.fstat(ns).st_ino)
                os.close(ns)
            except OSError:
                pass
            finally:
                os.close(fd)
    finally:
        os.close(pidfd)
    return found


def _init_netns(srv: Server, sandbox_id: str) -> int:
    import sqlite3

    con = sqlite3.connect(srv.home / "cove.db")
    try:
        (node,) = con.execute("SELECT node FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
    finally:
        con.close()
    return os.stat(f"/proc/{json.loads(node)['pid']}/ns/net").st_ino


def test_killing_a_sandbox_closes_its_proxy_and_connections(
    srv: Server, api: httpx.Client, made: list[str], upstream: int
) -> None:
    assert srv.proc is not None
    hold = (
        "import socket, time\n"
        f"s = socket.create_connection(('127.0.0.1', {PROXY_PORT}))\n"
        f"s.sendall(b'CONNECT allowed.test:{upstream} HTTP/1.1\\r\\n\\r\\n')\n"
        "print(s.recv(100), flush=True); time.sleep(600)\n"
    )
    ids = [create(api, made, {"mode": "open"}) for _ in range(3)]
    for sid in ids:
        api.post(f"/v1/sandboxes/{sid}/processes", json={"argv": ["python3", "-c", hold]})
    deadline = time.monotonic() + 10
    while sum(network(api, sid)["allowed"] for sid in ids) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    namespaces = {_init_netns(srv, sid) for sid in ids}
    held = _socket_namespaces(srv.proc.pid)
    assert namespaces <= held  # the listener and the held tunnel's client side live in each
    for sid in ids:
        assert api.delete(f"/v1/sandboxes/{sid}").status_code == 204
    deadline = time.monotonic() + 10
    while namespaces & _socket_namespaces(srv.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not namespaces & _socket_namespaces(srv.proc.pid)  # nothing pins their namespaces


def test_the_proxy_refuses_what_it_cannot_serve(api: httpx.Client, made: list[str]) -> None:
    sid = create(api, made, {"mode": "open"})
    code = (
        "import socket\n"
        f"def ask(data):\n"
        f"    s = socket.create_connection(('127.0.0.1', {PROXY_PORT})); s.sendall(data)\n"
        "    return s.recv(300).split(b'\\r\\n')[0].decode()\n"
        "print(ask(b'GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'))\n"  # not a proxy request
        "print(ask(b'CONNECT nohost HTTP/1.1\\r\\n\\r\\n'))\n"
        "print(ask(b'hello\\r\\n\\r\\n'))\n"
        "held = [socket.create_connection(('127.0.0.1', 17770)) for _ in range(300)]\n"
        "print(held[-1].recv(300).split(b'\\r\\n')[0].decode())\n"  # over the per-sandbox cap
    )
    lines = run(api, sid, f"python3 -c {shlex.quote(code)}")["stdout"].splitlines()
    assert lines[0].startswith("HTTP/1.1 400 cove egress proxy: expected an absolute http:// URL"), lines
    assert lines[1].startswith("HTTP/1.1 400 cove egress proxy: CONNECT needs host:port"), lines
    assert lines[2].startswith("HTTP/1.1 400 cove egress proxy: not an HTTP/1.x proxy request"), lines
    assert lines[3] == "HTTP/1.1 503 cove egress proxy: over 256 open connections", lines


def test_a_slow_reader_gets_every_byte(api: httpx.Client, made: list[str], upstream: int) -> None:
    sid = create(api, made, {"mode": "allow", "allow": ["allowed.test"]})
    size = 16 << 20
    for how in ((), ("-p",)):  # plain HTTP, then a CONNECT tunnel
        res = curl(
            api, sid, f"http://allowed.test:{upstream}/bytes/{size}", "--limit-rate 32M -o /tmp/got", *how
        )
        assert res["exit_code"] == 0, res
        assert run(api, sid, "stat -c %s /tmp/got")["stdout"] == f"{size}\n"
    # What went through its proxy is counted, and the usage history carries it (the console's chart).
    r = api.get(f"/v1/sandboxes/{sid}/metrics")
    assert r.status_code == 200, r.text
    point = r.json()[-1]
    assert point["netRxBytes"] >= 2 * size and 0 < point["netTxBytes"] < size, point


def test_a_bad_host_map_stops_the_server_with_its_reason() -> None:
    bad = Server("egress-badhosts", {"COVE_EGRESS_HOSTS": "allowed.test=127.0.0.1,broken"})
    try:
        with pytest.raises(RuntimeError, match="COVE_EGRESS_HOSTS: expected name=ip, got 'broken'"):
            bad.start()
    finally:
        bad.close()


def test_async_sdk(srv: Server, made: list[str], upstream: int) -> None:
    import asyncio

    from cove import AsyncSandbox

    async def main() -> None:
        sb = await AsyncSandbox.create(
            url=srv.url, api_key=srv.api_key, network={"mode": "allow", "allow": ["other.test"]}
        )
        made.append(sb.id)
        assert (await sb.get_network()).allow == ["other.test"]
        url = f"http://allowed.test:{upstream}/async"
        assert "403" in (await sb.exec(f"curl -sS -f --noproxy '' {url}")).stderr
        net = await sb.set_network("open")
        assert net.mode == "open" and net.denied == 1
        assert (await sb.exec(f"curl -sS -f --noproxy '' {url}")).stdout == "upstream ok /async\n"
        await sb.close()

    asyncio.run(main())
