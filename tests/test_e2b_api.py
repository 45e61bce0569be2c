"""e2b's control-plane REST API on cove, driven by the unmodified `e2b` SDK (sync and async).

The SDK is configured only by the `e2b_env` fixture (E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY).
Processes and files inside sandboxes are checked through cove's own API (`server.client()`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from e2b import (
    AsyncSandbox,
    AuthenticationException,
    Sandbox,
    SandboxException,
    SandboxNotFoundException,
    SandboxQuery,
    SandboxState,
)

from conftest import Server
from cove.node import checkpoint

needs_criu = pytest.mark.skipif(
    not checkpoint.available(), reason="needs CRIU >= 4.1 (scripts/install-criu.sh builds it)"
)

# A process whose state lives only in memory: a random token and a counter, published to a file.
COUNTER = r"""
import os, time
token, n = os.urandom(8).hex(), 0
while True:
    n += 1
    with open('/tmp/state.tmp', 'w') as f:
        f.write(f'{token} {n}')
    os.replace('/tmp/state.tmp', '/tmp/state')
    time.sleep(0.05)
"""


@pytest.fixture
def api(e2b_env: Server) -> Iterator[httpx.Client]:
    """cove's own API, with the same key (so the same tenant) as the SDK."""
    with e2b_env.client() as c:
        yield c


def sh(api: httpx.Client, sid: str, cmd: str) -> dict:
    r = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": cmd, "timeout": 30})
    assert r.status_code == 200, r.text
    return r.json()


def start_counter(api: httpx.Client, sid: str) -> None:
    r = api.post(f"/v1/sandboxes/{sid}/processes", json={"argv": ["python3", "-c", COUNTER]})
    assert r.status_code == 201, r.text
    deadline = time.monotonic() + 10
    while sh(api, sid, "test -s /tmp/state && echo ok")["stdout"] != "ok\n":
        assert time.monotonic() < deadline, "the counter never started"
        time.sleep(0.05)


def counter(api: httpx.Client, sid: str) -> tuple[str, int]:
    token, n = sh(api, sid, "cat /tmp/state")["stdout"].split()
    return token, int(n)


def counting(api: httpx.Client, sid: str) -> bool:
    first = counter(api, sid)
    time.sleep(0.3)
    return counter(api, sid)[1] > first[1]


def ids(items: list) -> set[str]:
    return {i.sandbox_id for i in items}


# -- lifecycle -----------------------------------------------------------------------------------
def test_create_info_list_and_kill(api: httpx.Client, sandboxes: list[str]) -> None:
    tag = uuid.uuid4().hex
    sb = Sandbox.create(metadata={"tag": tag, "role": "a"}, envs={"GREETING": "hi there"}, timeout=120)
    sandboxes.append(sb.sandbox_id)
    info = sb.get_info()
    assert info.sandbox_id == sb.sandbox_id and info.template_id == "base"
    assert info.state == SandboxState.RUNNING and info.metadata == {"tag": tag, "role": "a"}
    assert info.memory_mb == 1024 and info.cpu_count >= 1 and info.envd_version == "0.6.4"
    assert 115 <= (info.end_at - info.started_at).total_seconds() <= 125
    assert info.lifecycle == {"on_timeout": "kill", "auto_resume": False}
    assert sh(api, sb.sandbox_id, "echo $GREETING")["stdout"] == "hi there\n"

    assert sb.sandbox_id in ids(Sandbox.list(query=SandboxQuery(metadata={"tag": tag})).next_items())
    assert not Sandbox.list(query=SandboxQuery(metadata={"tag": tag, "role": "b"})).next_items()
    assert sb.sandbox_id in ids(Sandbox.list(query=SandboxQuery(template="base")).next_items())

    assert sb.kill() is True
    assert Sandbox.kill(sb.sandbox_id) is False  # already gone
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sb.sandbox_id)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sb.sandbox_id)
    with pytest.raises(SandboxNotFoundException):
        sb.set_timeout(60)
    assert not Sandbox.list(query=SandboxQuery(metadata={"tag": tag})).next_items()
    assert api.get(f"/v1/sandboxes/{sb.sandbox_id}").json()["state"] == "killed"


def test_code_interpreter_template_is_the_base_template(sandboxes: list[str]) -> None:
    from e2b_code_interpreter import Sandbox as CodeSandbox

    sb = CodeSandbox.create(timeout=60)  # asks for "code-interpreter-v1"
    sandboxes.append(sb.sandbox_id)
    assert sb.get_info().template_id == "base"


def test_list_filters_by_metadata_and_state_and_pages(api: httpx.Client, sandboxes: list[str]) -> None:
    tag = uuid.uuid4().hex
    # Keys and values with the characters the SDK's double encoding must carry through.
    meta = {"tag": tag, "a b&c": "x=y/z+%"}
    made = [Sandbox.create(metadata=meta, timeout=120) for _ in range(3)]
    sandboxes.extend(s.sandbox_id for s in made)
    assert made[0].pause() is True

    def listed(**query: object) -> set[str]:
        return ids(Sandbox.list(query=SandboxQuery(metadata=meta, **query), limit=50).next_items())

    assert listed() == ids(made)
    assert listed(state=[SandboxState.RUNNING]) == ids(made[1:])
    assert listed(state=[SandboxState.PAUSED]) == {made[0].sandbox_id}
    assert not ids(Sandbox.list(query=SandboxQuery(metadata={"a b&c": "x=y/z"})).next_items())

    pages, seen = 0, []
    paginator = Sandbox.list(query=SandboxQuery(metadata={"tag": tag}), limit=1)
    while paginator.has_next:
        page = paginator.next_items()
        assert len(page) == 1
        seen += [s.sandbox_id for s in page]
        pages += 1
    assert pages == 3 and seen == [s.sandbox_id for s in made]  # oldest first
    newest_first = Sandbox.list(query=SandboxQuery(metadata={"tag": tag}), order="desc", limit=2)
    assert [s.sandbox_id for s in newest_first.next_items()] == [made[2].sandbox_id, made[1].sandbox_id]
    assert [s.sandbox_id for s in newest_first.next_items()] == [made[0].sandbox_id]
    assert not newest_first.has_next

    later = datetime.now(UTC) + timedelta(minutes=1)
    assert not Sandbox.list(query=SandboxQuery(metadata={"tag": tag}, started_after=later)).next_items()


def test_set_timeout_moves_the_end_and_the_sandbox_ends_then(sbx: Sandbox) -> None:
    sbx.set_timeout(3600)
    info = sbx.get_info()
    assert abs((info.end_at - datetime.now(UTC)).total_seconds() - 3600) < 10
    sbx.set_timeout(1)  # shorter works too
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            sbx.get_info()
        except SandboxNotFoundException:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the sandbox outlived its timeout")


def cove_metrics(api: httpx.Client, sid: str) -> list[dict[str, object]]:
    r = api.get(f"/v1/sandboxes/{sid}/metrics")
    assert r.status_code == 200, r.text
    points: list[dict[str, object]] = r.json()
    return points


def test_metrics_report_the_sandboxs_usage(api: httpx.Client, sbx: Sandbox) -> None:
    burn = "b = bytearray(160 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nwhile True: pass\n"
    r = api.post(f"/v1/sandboxes/{sbx.sandbox_id}/processes", json={"argv": ["python3", "-c", burn]})
    assert r.status_code == 201, r.text
    sh(api, sbx.sandbox_id, "head -c 5000000 /dev/urandom > /home/user/blob")
    time.sleep(1)
    metrics = sbx.get_metrics()
    assert metrics
    m = metrics[-1]
    assert m.mem_total == 1024 << 20 and m.mem_used >= 160 << 20 and m.mem_cache >= 0
    assert m.disk_used >= 5_000_000 and m.disk_total > m.disk_used
    # A core spinning in a sandbox of a few cores: even the first point measures it (over 0.2 s).
    deadline = time.monotonic() + 15
    while m.cpu_used_pct <= 10:
        assert time.monotonic() < deadline, f"a spinning process never showed up: {m}"
        time.sleep(1)
        m = sbx.get_metrics()[-1]
    assert m.cpu_used_pct <= 100
    assert abs((m.timestamp - datetime.now(UTC)).total_seconds()) < 10
    # A history, not one sample: the points kept every 5 s while someone asks, oldest first.
    deadline = time.monotonic() + 30
    while len(history := sbx.get_metrics()) < 3:
        assert time.monotonic() < deadline, f"no history: {history}"
        time.sleep(1)
    stamps = [p.timestamp for p in history]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    later = [p.timestamp for p in sbx.get_metrics(start=stamps[-1])]  # a window: from the last point on
    assert stamps[-1] in later and stamps[0] not in later, (stamps, later)
    assert cove_metrics(api, sbx.sandbox_id)[-1]["memUsed"] > 0  # the same history, through cove's API
    sbx.kill()


# -- pause and connect ---------------------------------------------------------------------------
@needs_criu
def test_pause_and_connect_keep_the_processes_memory(api: httpx.Client, sbx: Sandbox) -> None:
    sid = sbx.sandbox_id
    start_counter(api, sid)
    token, before = counter(api, sid)
    assert sbx.is_running()
    sbx.set_timeout(2)  # would end it during the pause below, if a paused sandbox's timeout ran

    assert sbx.pause() is True
    assert sbx.pause() is False  # already paused: e2b's 409
    info = sbx.get_info()
    assert info.state == SandboxState.PAUSED
    assert not sbx.is_running()  # traffic does not wake it (no auto-resume)
    assert api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "true"}).status_code == 409

    time.sleep(3)
    assert sbx.get_info().state == SandboxState.PAUSED
    resumed = Sandbox.connect(sid, timeout=120)
    assert resumed.sandbox_id == sid and resumed.get_info().state == SandboxState.RUNNING
    assert abs((resumed.get_info().end_at - datetime.now(UTC)).total_seconds() - 120) < 10
    again, after = counter(api, sid)
    assert again == token and after >= before, "the process must continue from its memory"
    assert counting(api, sid)

    # Connecting to a running sandbox never shortens its timeout.
    end = resumed.get_info().end_at
    Sandbox.connect(sid, timeout=5)
    assert resumed.get_info().end_at == end

    # mode="filesystem" keeps only the files: the process does not come back.
    assert sbx.pause(mode="filesystem") is True
    hibernation = api.get(f"/v1/sandboxes/{sid}").json()["hibernation"]
    assert hibernation["memory"] is False and "filesystem" in hibernation["reason"], hibernation
    Sandbox.connect(sid)
    assert counter(api, sid)[0] == token  # the file it wrote is still there
    assert not counting(api, sid)


def test_auto_pause_on_timeout_and_auto_resume(api: httpx.Client, sandboxes: list[str]) -> None:
    sb = Sandbox.create(timeout=1, lifecycle={"on_timeout": "pause", "auto_resume": True})
    sandboxes.append(sb.sandbox_id)
    assert sb.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": True}
    sh(api, sb.sandbox_id, "echo still-here > /home/user/mark")
    deadline = time.monotonic() + 15
    while sb.get_info().state != SandboxState.PAUSED:
        assert time.monotonic() < deadline, "the timeout did not pause the sandbox"
        time.sleep(0.2)
    time.sleep(1.5)
    assert sb.get_info().state == SandboxState.PAUSED  # paused, not killed once paused
    # auto_resume: traffic wakes it, and its timeout runs again (so it pauses again).
    assert sh(api, sb.sandbox_id, "cat /home/user/mark")["stdout"] == "still-here\n"
    deadline = time.monotonic() + 15
    while sb.get_info().state != SandboxState.PAUSED:
        assert time.monotonic() < deadline, "the resumed sandbox's timeout did not run again"
        time.sleep(0.2)


@needs_criu
def test_fork_continues_the_source_in_each_child(api: httpx.Client, sandboxes: list[str]) -> None:
    src = Sandbox.create(metadata={"team": "x"}, network={"allow_out": ["1.1.1.1"]}, timeout=120)
    sandboxes.append(src.sandbox_id)
    start_counter(api, src.sandbox_id)
    sh(api, src.sandbox_id, "echo from-source > /home/user/note")
    token, _ = counter(api, src.sandbox_id)

    children = src.fork(count=2, timeout=600)
    assert all(isinstance(c, Sandbox) for c in children), children
    sandboxes.extend(c.sandbox_id for c in children)
    assert len({c.sandbox_id for c in children} | {src.sandbox_id}) == 3
    for i, child in enumerate(children):
        info = child.get_info()
        assert info.metadata["team"] == "x" and info.network["allow_out"] == ["1.1.1.1"]
        assert abs((info.end_at - datetime.now(UTC)).total_seconds() - 600) < 10
        assert sh(api, child.sandbox_id, "cat /home/user/note")["stdout"] == "from-source\n"
        assert counter(api, child.sandbox_id)[0] == token and counting(api, child.sandbox_id)
        sh(api, child.sandbox_id, f"echo {i} > /home/user/note")
    assert sh(api, src.sandbox_id, "cat /home/user/note")["stdout"] == "from-source\n"
    assert src.get_info().state == SandboxState.RUNNING


# -- snapshots -----------------------------------------------------------------------------------
def test_snapshots_start_sandboxes_and_are_listed_and_deleted(
    api: httpx.Client, sbx: Sandbox, sandboxes: list[str]
) -> None:
    sh(api, sbx.sandbox_id, "echo kept > /home/user/file")
    name = f"snap-{uuid.uuid4().hex[:8]}"
    snap = sbx.create_snapshot(name=name)
    assert snap.snapshot_id and snap.names == [name]
    sh(api, sbx.sandbox_id, "echo later > /home/user/file")

    assert snap.snapshot_id in {s.snapshot_id for s in Sandbox.list_snapshots().next_items()}
    by_sandbox = Sandbox.list_snapshots(sandbox_id=sbx.sandbox_id).next_items()
    assert [s.snapshot_id for s in by_sandbox] == [snap.snapshot_id]
    assert [s.snapshot_id for s in Sandbox.list_snapshots(name=name).next_items()] == [snap.snapshot_id]
    assert Sandbox.list_snapshots(name=name + "-nope").next_items() == []

    # Snapshot ids (and names) stand where template ids do.
    for ref in (snap.snapshot_id, name):
        child = Sandbox.create(ref, timeout=60)
        sandboxes.append(child.sandbox_id)
        assert sh(api, child.sandbox_id, "cat /home/user/file")["stdout"] == "kept\n"

    assert Sandbox.delete_snapshot(snap.snapshot_id) is True
    assert Sandbox.delete_snapshot(snap.snapshot_id) is False
    with pytest.raises(SandboxException) as e:
        Sandbox.create(snap.snapshot_id)
    assert e.value.status_code == 404
    # The sandboxes started from it keep running on its files.
    assert sh(api, sandboxes[-1], "cat /home/user/file")["stdout"] == "kept\n"


@needs_criu
def test_snapshot_keeps_memory_by_default(api: httpx.Client, sbx: Sandbox, sandboxes: list[str]) -> None:
    start_counter(api, sbx.sandbox_id)
    token, _ = counter(api, sbx.sandbox_id)
    snap = sbx.create_snapshot()
    try:
        child = Sandbox.create(snap.snapshot_id, timeout=60)
        sandboxes.append(child.sandbox_id)
        assert counter(api, child.sandbox_id)[0] == token and counting(api, child.sandbox_id)
    finally:
        Sandbox.delete_snapshot(snap.snapshot_id)


# -- network -------------------------------------------------------------------------------------
def test_network_settings_are_recorded_and_replaced(e2b_env: Server, sandboxes: list[str]) -> None:
    sb = Sandbox.create(
        allow_internet_access=False,
        network={"allow_out": ["1.1.1.1", "example.com"], "allow_public_traffic": False},
        timeout=60,
    )
    sandboxes.append(sb.sandbox_id)
    info = sb.get_info()
    assert info.allow_internet_access is False
    assert info.network == {
        "allow_out": ["1.1.1.1", "example.com"],
        "deny_out": ["0.0.0.0/0"],
        "allow_public_traffic": False,
    }

    sb.update_network({"deny_out": ["8.8.8.8"]})
    # The update replaces the egress rules; public traffic is a separate setting and stays.
    assert sb.get_info().network == {"deny_out": ["8.8.8.8"], "allow_public_traffic": False}
    with pytest.raises(SandboxNotFoundException):
        Sandbox.update_network("nosuchsandbox00", {"deny_out": []})

    # A proxy's secrets are not kept (nothing uses them until egress is enforced).
    proxy = {"address": "proxy.example.com:1080", "username": "u", "password": "secret"}
    sb.update_network({"egress_proxy": proxy, "allow_internet_access": True})
    with httpx.Client(base_url=e2b_env.url, headers={"X-API-KEY": e2b_env.api_key}) as c:
        detail = c.get(f"/sandboxes/{sb.sandbox_id}").json()
    assert detail["network"]["egressProxy"] == {"address": "proxy.example.com:1080", "username": "u"}
    assert detail["allowInternetAccess"] is True and "denyOut" not in detail["network"]
    assert "secret" not in str(detail)


# -- auth, tenants, bad input ---------------------------------------------------------------------
def test_bad_key_bad_template_and_bad_input(e2b_env: Server, sbx: Sandbox) -> None:
    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key="cove_not_a_key")
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key="cove_not_a_key").next_items()
    with pytest.raises(SandboxException) as e:
        Sandbox.create("no-such-template")
    assert e.value.status_code == 404 and "not found" in str(e.value)
    with pytest.raises(SandboxException) as e:
        Sandbox.create(metadata={"k" * 200: "v"})
    assert e.value.status_code == 400

    headers = {"X-API-KEY": e2b_env.api_key}
    with httpx.Client(base_url=e2b_env.url, headers=headers, timeout=30) as c:
        for body in (b"{not json", b"[1, 2]", b'{"templateID": "base", "timeout": "soon"}', b"{}"):
            r = c.post("/v2/sandboxes", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, (body, r.text)
            assert r.json()["code"] == 400 and r.json()["message"]
        r = c.post(f"/sandboxes/{sbx.sandbox_id}/timeout", json={"timeout": -1})
        assert r.status_code == 400 and "timeout" in r.json()["message"]
        r = c.get("/v2/sandboxes", params={"state": "sleeping"})
        assert r.status_code == 400
        r = c.get("/v2/sandboxes", params={"nextToken": "%%%"})
        assert r.status_code == 400
        assert c.post("/v2/sandboxes", json={"templateID": "base", "volumeMounts": [{}]}).status_code == 400
        r = c.get("/v2/sandboxes", headers={"X-API-KEY": ""})
        assert r.status_code == 401 and r.json()["code"] == 401


def test_another_tenants_sandboxes_and_snapshots_are_not_found(api: httpx.Client, sbx: Sandbox) -> None:
    r = api.post("/v1/keys", json={"name": "e2b-other", "tenant": "e2b-other"})
    assert r.status_code == 201, r.text
    other = r.json()["key"]
    snap = sbx.create_snapshot()
    try:
        with pytest.raises(SandboxNotFoundException):
            Sandbox.get_info(sbx.sandbox_id, api_key=other)
        with pytest.raises(SandboxNotFoundException):
            Sandbox.connect(sbx.sandbox_id, api_key=other)
        with pytest.raises(SandboxNotFoundException):
            Sandbox.pause(sbx.sandbox_id, api_key=other)
        assert Sandbox.kill(sbx.sandbox_id, api_key=other) is False
        assert sbx.sandbox_id not in ids(Sandbox.list(api_key=other).next_items())
        assert Sandbox.list_snapshots(api_key=other).next_items() == []
        assert Sandbox.delete_snapshot(snap.snapshot_id, api_key=other) is False
        with pytest.raises(SandboxException) as e:
            Sandbox.create(snap.snapshot_id, api_key=other)
        assert e.value.status_code == 404
        assert sbx.get_info().state == SandboxState.RUNNING
    finally:
        Sandbox.delete_snapshot(snap.snapshot_id)
        api.delete(f"/v1/keys/{r.json()['id']}")


def test_older_paths_of_the_2x_line(e2b_env: Server, api: httpx.Client, sandboxes: list[str]) -> None:
    headers = {"X-API-KEY": e2b_env.api_key}
    with httpx.Client(base_url=e2b_env.url, headers=headers, timeout=60) as c:
        r = c.post("/sandboxes", json={"templateID": "base", "timeout": 60, "metadata": {"v": "1"}})
        assert r.status_code == 201, r.text
        sid = r.json()["sandboxID"]
        sandboxes.append(sid)
        assert r.json()["envdAccessToken"] and r.json()["trafficAccessToken"]
        assert sid in {s["sandboxID"] for s in c.get("/sandboxes", params={"metadata": "v=1"}).json()}
        assert c.post(f"/sandboxes/{sid}/resume", json={"timeout": 60}).status_code == 409
        assert c.post(f"/sandboxes/{sid}/connect", json={"timeout": 60}).status_code == 200
        assert c.post(f"/sandboxes/{sid}/refreshes", json={"duration": 900}).status_code == 204
        end = datetime.fromisoformat(c.get(f"/sandboxes/{sid}").json()["endAt"])
        assert (end - datetime.now(UTC)).total_seconds() > 800
        metrics = c.get("/sandboxes/metrics", params={"sandbox_ids": f"{sid},nosuchsandbox00"}).json()
        assert set(metrics["sandboxes"]) == {sid} and metrics["sandboxes"][sid]["memTotal"] == 1024 << 20
        assert c.post(f"/sandboxes/{sid}/pause").status_code == 204
        assert sid not in {s["sandboxID"] for s in c.get("/sandboxes").json()}  # v1 lists running ones
        r = c.post(f"/sandboxes/{sid}/resume", json={"timeout": 60})
        assert r.status_code == 201 and r.json()["sandboxID"] == sid
        assert api.get(f"/v1/sandboxes/{sid}").json()["state"] == "running"


# -- async SDK -----------------------------------------------------------------------------------
def test_async_sdk_lifecycle(sandboxes: list[str]) -> None:
    async def main() -> None:
        tag = uuid.uuid4().hex
        sb = await AsyncSandbox.create(metadata={"tag": tag}, timeout=120)
        sandboxes.append(sb.sandbox_id)
        info = await sb.get_info()
        assert info.state == SandboxState.RUNNING and info.metadata == {"tag": tag}
        listed = await AsyncSandbox.list(query=SandboxQuery(metadata={"tag": tag})).next_items()
        assert ids(listed) == {sb.sandbox_id}
        await sb.set_timeout(900)
        assert ((await sb.get_info()).end_at - datetime.now(UTC)).total_seconds() > 800
        metrics = await sb.get_metrics()
        assert metrics and metrics[0].mem_used > 0

        snap = await sb.create_snapshot()
        try:
            child = await AsyncSandbox.create(snap.snapshot_id, timeout=60)
            sandboxes.append(child.sandbox_id)
            assert (await child.get_info()).state == SandboxState.RUNNING
        finally:
            assert await AsyncSandbox.delete_snapshot(snap.snapshot_id) is True

        assert await sb.pause() is True
        assert (await AsyncSandbox.get_info(sb.sandbox_id)).state == SandboxState.PAUSED
        same = await AsyncSandbox.connect(sb.sandbox_id)
        assert (await same.get_info()).state == SandboxState.RUNNING
        forks = await sb.fork(count=1)
        sandboxes.extend(f.sandbox_id for f in forks if isinstance(f, AsyncSandbox))
        assert len(forks) == 1 and isinstance(forks[0], AsyncSandbox)

        assert await sb.kill() is True
        assert await AsyncSandbox.kill(sb.sandbox_id) is False
        with pytest.raises(SandboxNotFoundException):
            await AsyncSandbox.connect(sb.sandbox_id)

    asyncio.run(main())
