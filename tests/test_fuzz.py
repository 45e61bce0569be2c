"""Hostile input against the whole HTTP API (docs/tenants.md#fuzzing): schemathesis generates valid
and invalid requests for every operation of cove's OpenAPI schema and sends them to a scratch server,
with path parameters that are often real objects (a running sandbox, its process, a snapshot, a
volume, a template, a key) so the calls get past the lookups. No response may be a 5xx, none may
hang, and afterwards the server is healthy and nothing leaked (processes, mounts, cgroups, fds).

Bounded: COVE_FUZZ_EXAMPLES examples per operation and generation mode (default 3, about a minute);
a longer run: `COVE_FUZZ_EXAMPLES=200 .venv/bin/pytest -q tests/test_fuzz.py -p no:timeout`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from cove.devserver import Server

EXAMPLES = int(os.environ.get("COVE_FUZZ_EXAMPLES", "3"))
REQUEST_TIMEOUT = 60  # a request that takes longer counts as a hang
LIVE = ("starting", "running", "paused", "hibernated")


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[Server]:
    # No warm pools (their members would count as leftovers) and no kernel builds (minutes of pip).
    srv = Server("fuzz", extra_env={"COVE_POOLS": "", "COVE_KERNEL": "0"})
    srv.start()
    try:
        yield srv
    finally:
        srv.close()  # raises if mounts or cgroups were left behind


class Real:
    """Real objects for path parameters, made again when a fuzzed call killed or deleted one."""

    def __init__(self, api: httpx.Client) -> None:
        self.api = api
        self.ids: dict[str, str] = {}

    def _sandbox(self) -> str:
        sid = self.ids.get("sandbox_id")
        if sid and self.api.get(f"/v1/sandboxes/{sid}").json().get("state") == "running":
            return sid
        sid = self.api.post("/v1/sandboxes", json={"timeout": 600}).json()["id"]
        self.ids.pop("process_id", None)
        return sid

    def refresh(self) -> dict[str, str]:
        api = self.api
        self.ids["sandbox_id"] = sid = self._sandbox()
        if "process_id" not in self.ids:
            r = api.post(f"/v1/sandboxes/{sid}/processes", json={"cmd": "sleep 3600"})
            self.ids["process_id"] = r.json()["id"]
        snap = self.ids.get("snapshot_id")
        if not snap or api.get(f"/v1/snapshots/{snap}").status_code != 200:
            self.ids["snapshot_id"] = api.post(f"/v1/sandboxes/{sid}/snapshots", json={}).json()["id"]
        vol = self.ids.get("volume")
        if not vol or api.get(f"/v1/volumes/{vol}").status_code != 200:
            self.ids["volume"] = "fuzz-" + secrets.token_hex(3)
            api.post("/v1/volumes", json={"name": self.ids["volume"], "size_mb": 16})
        key = self.ids.get("key_id")
        if not key or key not in api.get("/v1/keys").text:
            self.ids["key_id"] = api.post("/v1/keys", json={"name": "fuzz", "tenant": "fuzz"}).json()["id"]
        self.ids.setdefault("tenant", "fuzz")
        self.ids.setdefault("template", "base")
        return self.ids

    def for_path(self, path: str, params: dict[str, Any]) -> dict[str, Any]:
        """Most of the time, put real objects in `params` (sometimes keep the fuzzed values)."""
        ids = self.refresh()
        out = dict(params)
        for name in params:
            if random.random() < 0.25:
                continue
            if name == "name":
                out[name] = ids["volume"] if path.startswith("/v1/volumes") else ids["template"]
            elif name == "template_id":
                out[name] = ids["snapshot_id"]
            elif name in ids:
                out[name] = ids[name]
        return out


def _server_fds(server: Server) -> int:
    assert server.proc is not None
    return len(os.listdir(f"/proc/{server.proc.pid}/fd"))


def _live(api: httpx.Client) -> list[dict[str, Any]]:
    items = []
    for state in LIVE:
        items += api.get("/v1/sandboxes", params={"state": state, "limit": 1000}).json()["items"]
    return items


def _fuzz(op: Any, mode: GenerationMode, real: Real, headers: dict[str, str], problems: list[str]) -> int:
    """Send EXAMPLES generated requests for one operation; note 5xx answers and hangs in `problems`."""
    calls = 0

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: every call costs real work
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode), seed=st.integers())
    def run(case: Any, seed: int) -> None:
        nonlocal calls
        random.seed(seed)
        if case.path_parameters:
            case.path_parameters = real.for_path(op.path, case.path_parameters)
        label = f"{case.method} {case.formatted_path} ({mode.value})"
        t0 = time.monotonic()
        try:
            response = case.call(headers=headers, timeout=REQUEST_TIMEOUT)
        except Exception as e:  # a timeout or a dropped connection
            problems.append(f"{label}: {type(e).__name__}: {e}\n  {case.as_curl_command()}")
            return
        calls += 1
        if response.status_code >= 500 and response.status_code != 503:
            problems.append(
                f"{label}: {response.status_code} {response.text[:300]}\n  {case.as_curl_command()}"
            )
        elif time.monotonic() - t0 > REQUEST_TIMEOUT / 2:
            problems.append(f"{label}: took {time.monotonic() - t0:.1f}s")

    with contextlib.suppress(Unsatisfiable):  # nothing invalid to send (an operation without parameters)
        run()
    return calls


@pytest.mark.timeout(600)
def test_fuzz_http_api(fuzz_server: Server) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    api = fuzz_server.client()
    real = Real(api)
    real.refresh()
    fds_before = _server_fds(fuzz_server)
    headers = {"Authorization": f"Bearer {fuzz_server.api_key}"}
    problems: list[str] = []
    started = time.monotonic()
    calls = 0
    for result in schema.get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            calls += _fuzz(result.ok(), mode, real, headers, problems)

    elapsed = time.monotonic() - started
    print(f"fuzz: {calls} calls in {elapsed:.1f}s ({EXAMPLES} examples per operation and mode)")
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:40])

    # Healthy, and nothing leaked: every sandbox can still be killed, then no process, cgroup or fd
    # of theirs remains.
    assert httpx.get(f"{fuzz_server.url}/healthz").status_code == 200
    sb = api.post("/v1/sandboxes", json={}).json()
    assert api.post(f"/v1/sandboxes/{sb['id']}/exec", json={"cmd": "echo ok"}).json()["stdout"] == "ok\n"
    for item in _live(api):
        assert api.delete(f"/v1/sandboxes/{item['id']}").status_code == 204
    assert _live(api) == []
    procs = _cgroup_procs(fuzz_server)
    assert procs == [], f"processes left in sandbox cgroups: {procs}"
    assert _server_fds(fuzz_server) <= fds_before + 16, "the server leaks file descriptors"
    api.close()


def _cgroup_procs(server: Server) -> list[str]:
    root = f"/sys/fs/cgroup/{server.cgroup_parent}"
    found = []
    for dirpath, _, files in os.walk(root):
        if "cgroup.procs" in files and dirpath != root:
            with open(os.path.join(dirpath, "cgroup.procs")) as f:
                found += [f"{dirpath}: {p}" for p in f.read().split()]
    return found


# -- e2b's in-sandbox API (envd): Connect RPC with raw malformed bodies -------------------------------
def _connect_methods() -> list[tuple[str, bool]]:
    from cove.compat.e2b.proto import filesystem_pb2, process_pb2

    return [
        (f"/{service.full_name}/{method.name}", method.server_streaming)
        for module in (process_pb2, filesystem_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]


def _envelope(flags: int, data: bytes, lie: int = 0) -> bytes:
    return struct.pack(">BI", flags, max(0, len(data) + lie)) + data


_content_types = st.sampled_from(
    [
        "application/json",
        "application/proto",
        "application/connect+json",
        "application/connect+proto",
        "text/plain",
        "application/json; charset=latin-1",
    ]
)
_bodies = st.one_of(
    st.binary(max_size=300),
    st.dictionaries(st.text(max_size=10), st.none() | st.integers() | st.text(max_size=20), max_size=4).map(
        lambda d: json.dumps(d).encode()
    ),
    st.lists(
        st.builds(_envelope, st.sampled_from([0, 1, 2, 3, 255]), st.binary(max_size=80), st.integers(-3, 40)),
        max_size=3,
    ).map(b"".join),
)
_extra_headers = st.fixed_dictionaries(
    {},
    optional={
        "Connect-Protocol-Version": st.sampled_from(["1", "2", "x"]),
        "Connect-Content-Encoding": st.sampled_from(["gzip", "br", "identity", "x"]),
        "Content-Encoding": st.sampled_from(["gzip", "identity", "x"]),
        "Connect-Timeout-Ms": st.sampled_from(["0", "1", "-5", "99999999999999999999", "x"]),
    },
)


def _end_of_stream_error(content: bytes) -> str | None:
    """The error code of a Connect stream's end-of-stream envelope (flag 2), if it has one."""
    while len(content) >= 5:
        flags, size = struct.unpack(">BI", content[:5])
        data, content = content[5 : 5 + size], content[5 + size :]
        if flags & 2:
            return (json.loads(data or b"{}").get("error") or {}).get("code")
    return None


def _fuzz_connect(
    client: httpx.Client, base: dict[str, str], path: str, streaming: bool, problems: list[str]
) -> None:
    """Garbage to one Connect method; 5xx answers, hangs and internal errors go to `problems`."""

    @settings(max_examples=max(20, EXAMPLES * 8), deadline=None, database=None, phases=[Phase.generate])
    @given(ctype=_content_types, body=_bodies, extra=_extra_headers)
    def run(ctype: str, body: bytes, extra: dict[str, str]) -> None:
        label = f"POST {path} [{ctype}] {extra} {body[:60]!r}"
        try:
            with client.stream(
                "POST", path, content=body, headers={**base, **extra, "Content-Type": ctype}
            ) as r:
                content = r.read()
        except httpx.ReadTimeout:
            if not streaming:  # a stream may stay open (a started process, a watch)
                problems.append(f"{label}: no answer")
            return
        if r.status_code >= 500:
            # Connect maps unimplemented to 501, deadline_exceeded to 504, unavailable to 503: those
            # are answers; internal and unknown (500) are the server failing.
            try:
                code = json.loads(content).get("code")
            except ValueError:
                code = None
            if code not in ("unimplemented", "deadline_exceeded", "unavailable"):
                problems.append(f"{label}: {r.status_code} {content[:200]!r}")
        elif r.status_code == 200 and ctype.startswith("application/connect+"):
            error = _end_of_stream_error(content)
            if error in ("internal", "unknown"):
                problems.append(f"{label}: the stream ended with {error}: {content[-200:]!r}")

    run()


@pytest.mark.timeout(300)
def test_fuzz_envd_connect(fuzz_server: Server) -> None:
    """Every Connect method of envd, with the sandbox's valid token and garbage bodies, content
    types and headers: an answer or a Connect error, never an internal one, never a hang."""
    from cove.controlplane.signing import Signer

    api = fuzz_server.client()
    sid = api.post("/v1/sandboxes", json={"timeout": 600}).json()["id"]
    token = Signer(fuzz_server.home / "secret").token("e2b-envd", sid)
    base = {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983", "X-Access-Token": token}
    problems: list[str] = []
    client = httpx.Client(base_url=fuzz_server.url, timeout=httpx.Timeout(20, read=8))

    for path, streaming in _connect_methods():
        _fuzz_connect(client, base, path, streaming, problems)

    api.delete(f"/v1/sandboxes/{sid}")
    client.close()
    api.close()
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:30])
