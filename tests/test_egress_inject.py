"""Credential injection (`network.inject`): headers the egress proxy adds host-side to a sandbox's
plain-HTTP requests for one host, which the sandbox can use but never read (docs/network.md).

Real sandboxes, a scripted model server on host loopback that checks its key, and a scratch cove
server whose host map points `model.test` and `other.test` at it.
"""

from __future__ import annotations

import os
import secrets
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cove import Sandbox
from cove.devserver import Server
from model_server import ModelServer


@pytest.fixture(scope="module")
def key() -> str:
    return "sk-test-" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def model(key: str) -> Iterator[ModelServer]:
    srv = ModelServer(key).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate for model.test (its key beside it, `.key`)."""
    path = tmp_path_factory.mktemp("tls") / "model.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=model.test",
         "-addext", "subjectAltName=DNS:model.test", "-keyout", str(path.with_suffix(".key")), "-out", str(path)],
        check=True, capture_output=True,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def tls_model(key: str, cert: Path) -> Iterator[ModelServer]:
    """The same model over HTTPS, with a certificate only the cove server trusts."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, cert.with_suffix(".key"))
    srv = ModelServer(key).start(tls=ctx)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def srv(key: str, cert: Path) -> Iterator[Server]:
    hosts = "model.test=127.0.0.1,other.test=127.0.0.1"
    env = {"COVE_EGRESS_HOSTS": hosts, "SSL_CERT_FILE": str(cert)}  # the proxy trusts model.test's cert
    server = Server(f"inject-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}", env)
    server.start()
    yield server
    log = server.log.read_text(errors="replace") if server.log.exists() else ""
    # This module writes hundreds of MB (layers, memory images): flushed before close unmounts the
    # storage, whose loop device close then waits for (30 s) rather than for the writeback.
    server.kill_all()
    os.sync()
    server.close()
    assert key not in log, "the injected key was logged"


@pytest.fixture
def api(srv: Server) -> Iterator[httpx.Client]:
    with srv.client() as c:
        yield c


def _create(api: httpx.Client, made: list[str], network: dict[str, Any]) -> str:
    r = api.post("/v1/sandboxes", json={"timeout": 600, "network": network})
    assert r.status_code == 201, r.text
    made.append(r.json()["id"])
    return made[-1]


def _curl(api: httpx.Client, sid: str, url: str, *args: str) -> str:
    cmd = f"curl -sS -m 20 --noproxy '' {' '.join(args)} {url}"
    r = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": cmd, "timeout": 60})
    assert r.status_code == 200, r.text
    return str(r.json()["stdout"]) + str(r.json()["stderr"])


def _settings(model: ModelServer, key: str) -> dict[str, Any]:
    host = f"model.test:{model.port}"
    return {
        "mode": "allow",
        "allow": [host, f"other.test:{model.port}"],
        "inject": {host: {"Authorization": f"Bearer {key}"}},
    }


def test_the_proxy_adds_the_header_and_replaces_the_sandboxes_own(
    api: httpx.Client, made: list[str], model: ModelServer, key: str
) -> None:
    sid = _create(api, made, _settings(model, key))
    before = len(model.requests)
    out = _curl(api, sid, f"http://model.test:{model.port}/v1/models", "-H", "'Authorization: Bearer forged'")
    assert '"authorized": true' in out, out
    # Exactly the injected value reached the model (the sandbox's header was dropped, not appended).
    out = _curl(api, sid, f"http://model.test:{model.port}/v1/chat/completions", "-d", "'{}'")
    assert model.requests[before:][-1].authorization == f"Bearer {key}"
    # Another host, even allowed and served by the same process, gets no key.
    assert '"authorized": false' in _curl(api, sid, f"http://other.test:{model.port}/x")
    # Nothing the API returns carries the value: names only.
    for path in (f"/v1/sandboxes/{sid}/network", f"/v1/sandboxes/{sid}", "/v1/sandboxes", "/v1/audit"):
        r = api.get(path)
        assert r.status_code == 200 and key not in r.text, path
    assert api.get(f"/v1/sandboxes/{sid}/network").json()["inject"] == {
        f"model.test:{model.port}": ["Authorization"]
    }
    env = api.post(
        f"/v1/sandboxes/{sid}/exec", json={"cmd": "env; cat /proc/*/environ", "user": "root"}
    ).json()
    assert key not in env["stdout"]


def test_put_keeps_replaces_and_removes_the_injection(
    api: httpx.Client, made: list[str], model: ModelServer, key: str
) -> None:
    sid = _create(api, made, _settings(model, key))
    url = f"http://model.test:{model.port}/v1/models"
    policy = {"mode": "allow", "allow": [f"model.test:{model.port}"]}
    r = api.put(f"/v1/sandboxes/{sid}/network", json=policy)  # no `inject`: kept (it cannot be resent)
    assert r.status_code == 200 and r.json()["inject"] == {f"model.test:{model.port}": ["Authorization"]}, (
        r.text
    )
    assert '"authorized": true' in _curl(api, sid, url)
    wrong = {f"model.test:{model.port}": {"Authorization": "Bearer another"}}
    assert api.put(f"/v1/sandboxes/{sid}/network", json={**policy, "inject": wrong}).status_code == 200
    assert '"authorized": false' in _curl(api, sid, url)
    r = api.put(f"/v1/sandboxes/{sid}/network", json={**policy, "inject": {}})
    assert r.status_code == 200 and r.json()["inject"] == {}
    assert '"authorized": false' in _curl(api, sid, url)


def test_the_sdk_sets_and_shows_it(srv: Server, made: list[str], model: ModelServer, key: str) -> None:
    host = f"model.test:{model.port}"
    with Sandbox.create(network={"mode": "allow", "allow": [host]}, url=srv.url, api_key=srv.api_key) as sb:
        assert sb.get_network().inject == {}
        info = sb.set_network("allow", allow=[host], inject={host: {"Authorization": f"Bearer {key}"}})
        assert info.inject == {host: ["Authorization"]} and key not in repr(info)
        assert '"authorized": true' in sb.exec(f"curl -sS --noproxy '' http://{host}/v1/models").stdout
        assert sb.set_network("allow", allow=[host]).inject == {host: ["Authorization"]}  # None keeps it


def test_https_upstream_the_sandbox_speaks_plain_http_to_the_proxy(
    api: httpx.Client, made: list[str], tls_model: ModelServer, key: str
) -> None:
    """`https://HOST:PORT`: the sandbox asks for http://HOST/, the proxy connects to HOST:PORT over
    TLS (verified against its CAs) and adds the header there."""
    upstream = f"model.test:{tls_model.port}"
    network = {"mode": "allow", "allow": [upstream], "inject": {f"https://{upstream}": {"Authorization": f"Bearer {key}"}}}
    sid = _create(api, made, network)
    assert api.get(f"/v1/sandboxes/{sid}/network").json()["inject"] == {f"https://{upstream}": ["Authorization"]}
    assert '"authorized": true' in _curl(api, sid, "http://model.test/v1/models")
    assert tls_model.requests[-1].authorization == f"Bearer {key}"
    # The port it connects to is the policy's: allowing only port 80 refuses it.
    r = api.put(f"/v1/sandboxes/{sid}/network", json={"mode": "allow", "allow": ["model.test:80"]})
    assert r.status_code == 200, r.text
    assert "403" in _curl(api, sid, "http://model.test/v1/models", "-o /dev/null -w '%{http_code}'")
    # A server whose certificate the proxy does not trust gets nothing: 502, no request sent.
    seen = len(tls_model.requests)
    other = {"mode": "allow", "allow": [f"other.test:{tls_model.port}"],
             "inject": {f"https://other.test:{tls_model.port}": {"Authorization": f"Bearer {key}"}}}  # fmt: skip
    sid = _create(api, made, other)
    assert "502" in _curl(api, sid, "http://other.test/v1/models", "-o /dev/null -w '%{http_code}'")
    assert len(tls_model.requests) == seen


@pytest.mark.parametrize(
    ("inject", "words"),
    [
        ({"model.test": {"Bad Name": "v"}}, "'Bad Name' is not a valid header name"),
        ({"model.test": {"X-Key": "v\r\nX-Evil: 1"}}, "control character"),
        ({"model.test": {"X-Key": "v\x00"}}, "control character"),
        ({"model.test": {"X-Key": "v\n"}}, "control character"),  # a trailing newline too
        ({"model.test": {"X-Key\n": "v"}}, "is not a valid header name"),
        ({"model.test": {"X-Key": "caf\u00e9"}}, "non-ASCII"),
        ({"model.test": {"Host": "elsewhere"}}, "'Host' frames the request"),
        ({"model.test": {"Content-Length": "0"}}, "'Content-Length' frames the request"),
        ({"model.test": {"X-A": "1", "x-a": "2"}}, "given twice"),
        ({"*.test": {"X-Key": "v"}}, "one name or address"),
        ({"10.0.0.0/8": {"X-Key": "v"}}, "one name or address"),
        ({"model.test:1-9": {"X-Key": "v"}}, "one port, not a range"),
        ({"https://*.test": {"X-Key": "v"}}, "one name or address"),
        ({"model.test:80": {"X-A": "1"}, "https://model.test": {"X-A": "2"}}, "the same host as another entry"),
        ({"not a host": {"X-Key": "v"}}, "not a domain"),
        ({"model.test": {}}, "non-empty object"),
        ({"model.test": {"X-Key": 5}}, "network.inject"),
        ({"model.test": "Bearer x"}, "network.inject"),
    ],
)
def test_invalid_injections_are_422(api: httpx.Client, made: list[str], inject: Any, words: str) -> None:
    body = {"mode": "allow", "allow": ["model.test"], "inject": inject}
    r = api.post("/v1/sandboxes", json={"network": body})
    assert r.status_code == 422 and words in r.json()["error"]["message"], r.text
    assert "X-Evil: 1" not in r.text and "elsewhere" not in r.text  # values are never quoted back


def test_unknown_keys_and_put_are_422(api: httpx.Client, made: list[str]) -> None:
    r = api.post("/v1/sandboxes", json={"network": {"mode": "allow", "injects": {}}})
    assert r.status_code == 422 and "network.injects" in r.json()["error"]["message"], r.text
    sid = _create(api, made, {"mode": "allow", "allow": ["model.test"]})
    r = api.put(f"/v1/sandboxes/{sid}/network", json={"mode": "allow", "inject": {"x.test": {"X-K": "a\nb"}}})
    assert r.status_code == 422 and "control character" in r.text
    assert api.get(f"/v1/sandboxes/{sid}/network").json()["inject"] == {}  # nothing was applied


def test_the_cli_shows_names_and_keeps_the_injection(
    srv: Server, api: httpx.Client, made: list[str], model: ModelServer, key: str
) -> None:
    sid = _create(api, made, _settings(model, key))
    env = {**os.environ, "COVE_URL": srv.url, "COVE_API_KEY": srv.api_key}
    done = subprocess.run(
        [sys.executable, "-m", "cove", "network", sid, "--allow", f"model.test:{model.port}"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0 and f"model.test:{model.port}: Authorization" in done.stdout, done
    assert key not in done.stdout + done.stderr
    assert '"authorized": true' in _curl(api, sid, f"http://model.test:{model.port}/v1/models")  # kept
