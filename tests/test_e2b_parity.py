"""Behaviours e2b clients rely on (issue 25), each checked with the unmodified `e2b` SDK configured
only by the `e2b_env` fixture (E2B_API_URL = E2B_SANDBOX_URL = the cove server)."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import e2b
import httpx
import pytest
from e2b import Sandbox, SandboxQuery, SandboxState, Volume
from e2b.sandbox.filesystem.watch_handle import FilesystemEventType

from conftest import Server
from cove.node import checkpoint

# When the sandbox's init started (clock ticks since the host booted): a reboot starts a new one.
BOOT = "cut -d' ' -f22 /proc/1/stat"
BOOT_ID = "cat /proc/sys/kernel/random/boot_id"
needs_criu = pytest.mark.skipif(not checkpoint.available(), reason="needs CRIU >= 4.1")


def _events(
    handle: e2b.WatchHandle, want: list[tuple[str, FilesystemEventType]], timeout: float = 10
) -> list:
    seen: list = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen += handle.get_new_events()
        if all(w in [(e.name, e.type) for e in seen] for w in want):
            return seen
        time.sleep(0.1)
    raise AssertionError(f"missing {want} in {[(e.name, e.type) for e in seen]}")


# -- the base template -----------------------------------------------------------------------------
def test_base_template_has_sudo_and_python(sbx: Sandbox) -> None:
    assert sbx.commands.run("whoami").stdout == "user\n"
    assert sbx.commands.run("sudo whoami").stdout == "root\n"
    assert sbx.commands.run("sudo -u user id -un").stdout == "user\n"
    # What e2b code does with it: root-owned places, exit codes and stdin pass through.
    sbx.commands.run("sudo mkdir -p /opt/app && sudo chown user /opt/app")
    assert sbx.files.get_info("/opt/app").owner == "user"
    assert sbx.commands.run("echo piped | sudo tee /etc/cove-test").stdout == "piped\n"
    with pytest.raises(e2b.CommandExitException) as e:
        sbx.commands.run("sudo sh -c 'exit 7'")
    assert e.value.exit_code == 7
    assert sbx.commands.run("sudo -E env | grep -c '^HOME='").stdout.strip() == "1"
    assert sbx.commands.run("sudo -i pwd").stdout == "/root\n"
    assert sbx.commands.run("sudo FOO=bar sh -c 'echo $FOO $SUDO_USER'").stdout == "bar user\n"
    # Killing the command kills what it runs as root.
    h = sbx.commands.run("sudo sleep 600", background=True)
    deadline = time.monotonic() + 10
    as_root = "pgrep -u root -xf 'sleep 600' || true"
    while not sbx.commands.run(as_root).stdout:
        assert time.monotonic() < deadline, "sudo sleep never started"
        time.sleep(0.1)
    assert sbx.commands.kill(h.pid)
    while sbx.commands.run(as_root).stdout:
        assert time.monotonic() < deadline + 10, "the root command outlived its sudo"
        time.sleep(0.1)
    assert sbx.commands.run("python -c 'import sys; print(sys.version_info.major)'").stdout == "3\n"
    assert sbx.commands.run("python --version").stdout.startswith("Python 3")


# -- files -----------------------------------------------------------------------------------------
def test_directory_info_reports_the_entrys_size(sbx: Sandbox) -> None:
    sbx.files.make_dir("sized")
    for i in range(200):  # enough names to grow the directory entry past one block
        sbx.files.write(f"sized/file-with-a-long-name-{i:04d}.txt", "x")
    size = int(sbx.commands.run("stat -c %s sized").stdout)
    assert size > 0
    info = sbx.files.get_info("sized")
    assert info.type == e2b.FileType.DIR and info.size == size
    listed = {e.name: e for e in sbx.files.list(".")}
    assert listed["sized"].size == size


def test_watch_sees_writes_by_commands_and_recursive_watch_sees_new_subdirs(sbx: Sandbox) -> None:
    sbx.files.make_dir("w")
    handle = sbx.files.watch_dir("w", recursive=True)
    try:
        sbx.commands.run("echo one > w/a.txt && echo two >> w/a.txt")
        sbx.commands.run("mkdir -p w/new/deeper && echo three > w/new/deeper/b.txt")
        _events(
            handle,
            [
                ("a.txt", FilesystemEventType.CREATE),
                ("a.txt", FilesystemEventType.WRITE),
                ("new", FilesystemEventType.CREATE),
                ("new/deeper/b.txt", FilesystemEventType.WRITE),
            ],
        )
    finally:
        handle.stop()


def test_signed_urls_work_under_e2b_sandbox_url(e2b_env: Server, sbx: Sandbox) -> None:
    assert sbx.envd_api_url == e2b_env.url  # the URLs name no sandbox, only the server
    up = sbx.upload_url("signed/plain.txt", use_signature_expiration=60)
    r = httpx.post(up, files={"file": ("ignored", b"through the url")})
    assert r.status_code == 200, r.text
    assert r.json()[0]["path"] == "/home/user/signed/plain.txt"
    assert httpx.get(sbx.download_url("signed/plain.txt")).content == b"through the url"
    assert httpx.get(sbx.download_url("signed/plain.txt", use_signature_expiration=60)).status_code == 200
    other = Sandbox.create(timeout=60)
    try:  # each sandbox's URLs reach that sandbox
        other.files.write("signed/plain.txt", "the other one")
        assert httpx.get(other.download_url("signed/plain.txt")).content == b"the other one"
        assert httpx.get(sbx.download_url("signed/plain.txt")).content == b"through the url"
    finally:
        other.kill()
    good = sbx.download_url("signed/plain.txt")
    for url, method in (
        (sbx.download_url("signed/plain.txt", use_signature_expiration=-10), "GET"),  # expired
        (good.replace("signature=v1_", "signature=v1_x"), "GET"),  # bad
        (good.replace("plain.txt", "other.txt"), "GET"),  # another path
        (good, "POST"),  # a read URL used to write
    ):
        files = {"file": ("f", b"x")} if method == "POST" else None
        r = httpx.request(method, url, files=files)
        assert r.status_code == 401, (url, method, r.text)
        assert r.json()["code"] == 401 and r.json()["message"]
    assert httpx.get(f"{e2b_env.url}/files", params={"path": "x"}).status_code == 401


# -- listing ---------------------------------------------------------------------------------------
def test_list_pages_over_running_and_paused_with_the_sdks_filters(sandboxes: list[str]) -> None:
    tag = uuid.uuid4().hex
    before = datetime.now(UTC) - timedelta(seconds=5)
    made = [Sandbox.create(metadata={"tag": tag, "i": str(i)}, timeout=120) for i in range(4)]
    sandboxes.extend(s.sandbox_id for s in made)
    made[1].pause()
    made[3].pause()
    query = SandboxQuery(metadata={"tag": tag}, state=[SandboxState.RUNNING, SandboxState.PAUSED])
    paginator = Sandbox.list(query=query, limit=3)
    first = paginator.next_items()
    assert len(first) == 3 and paginator.has_next and paginator.next_token
    second = paginator.next_items()
    assert len(second) == 1 and not paginator.has_next
    assert [s.sandbox_id for s in first + second] == [s.sandbox_id for s in made]
    assert {s.sandbox_id: s.state for s in first + second}[made[1].sandbox_id] == SandboxState.PAUSED
    paused = Sandbox.list(query=SandboxQuery(metadata={"tag": tag}, state=[SandboxState.PAUSED]), limit=1)
    assert [s.sandbox_id for s in paused.next_items()] == [made[1].sandbox_id]
    assert [s.sandbox_id for s in paused.next_items()] == [made[3].sandbox_id]
    assert not paused.has_next
    since = Sandbox.list(query=SandboxQuery(metadata={"tag": tag}, started_after=before)).next_items()
    assert len(since) == 4
    # A token from the SDK's paginator resumes the listing where it stopped.
    two = Sandbox.list(query=query, limit=2)
    two.next_items()
    resumed = Sandbox.list(query=query, limit=3, next_token=two.next_token)
    assert [s.sandbox_id for s in resumed.next_items()] == [s.sandbox_id for s in made[2:]]


# -- lifecycle -------------------------------------------------------------------------------------
def test_pause_without_memory_reboots_on_resume(sbx: Sandbox) -> None:
    boot = sbx.commands.run(BOOT).stdout
    boot_id = sbx.commands.run(BOOT_ID).stdout
    assert boot_id != Path("/proc/sys/kernel/random/boot_id").read_text()  # its own, not the host's
    h = sbx.commands.run("sleep 600", background=True)
    sbx.files.write("kept.txt", "still here")
    assert sbx.pause(keep_memory=False) is True
    assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
    sbx.connect()
    assert sbx.files.read("kept.txt") == "still here"
    assert int(sbx.commands.run(BOOT).stdout) > int(boot), "a filesystem pause must reboot the sandbox"
    assert sbx.commands.run(BOOT_ID).stdout != boot_id, "a reboot has a new boot id"
    assert h.pid not in [p.pid for p in sbx.commands.list()]


def test_kill_during_a_foreground_command_is_the_killed_error(sbx: Sandbox) -> None:
    caught: list[BaseException] = []

    def run() -> None:
        try:
            sbx.commands.run("sleep 60", timeout=120)
        except BaseException as e:  # handed to the test thread
            caught.append(e)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(1)
    started = time.monotonic()
    Sandbox.kill(sbx.sandbox_id)
    t.join(30)
    assert not t.is_alive() and time.monotonic() - started < 20
    # e2b's "sandbox was killed" error (a TimeoutException subclass in the SDK, not a timeout).
    assert caught and type(caught[0]) is e2b.SandboxNotRunningException, caught
    assert "sandbox was killed" in str(caught[0])


def test_connect_resumes_a_paused_sandbox(sbx: Sandbox) -> None:
    sbx.files.write("mark", "1")
    boot_id = sbx.commands.run(BOOT_ID).stdout
    assert sbx.pause() is True
    same = Sandbox.connect(sbx.sandbox_id, timeout=90)
    assert same.get_info().state == SandboxState.RUNNING
    assert same.files.read("mark") == "1" and same.commands.run("echo ok").stdout == "ok\n"
    assert abs((same.get_info().end_at - datetime.now(UTC)).total_seconds() - 90) < 10
    if checkpoint.available():  # restored from its memory: the same boot
        assert same.commands.run(BOOT_ID).stdout == boot_id


def test_beta_pause_then_connect(sbx: Sandbox) -> None:
    sbx.files.write("mark", "beta")
    assert sbx.beta_pause() is True
    assert sbx.get_info().state == SandboxState.PAUSED
    sbx.connect()
    assert sbx.files.read("mark") == "beta"


def test_auto_pause_on_timeout_as_the_sdk_sends_it(sandboxes: list[str]) -> None:
    for lifecycle in (
        {"on_timeout": "pause"},
        {"on_timeout": {"action": "pause", "mode": "filesystem"}},
    ):
        sb = Sandbox.create(timeout=2, lifecycle=lifecycle)  # type: ignore[arg-type]
        sandboxes.append(sb.sandbox_id)
        sb.files.write("mark", "kept")
        h = sb.commands.run("sleep 600", background=True)
        deadline = time.monotonic() + 20
        while sb.get_info().state != SandboxState.PAUSED:
            assert time.monotonic() < deadline, f"{lifecycle}: the timeout did not pause the sandbox"
            time.sleep(0.2)
        assert sb.get_info().lifecycle["on_timeout"] == "pause"
        sb.connect()
        assert sb.files.read("mark") == "kept"
        alive = h.pid in [p.pid for p in sb.commands.list()]
        assert alive is (lifecycle["on_timeout"] == "pause" and checkpoint.available()), lifecycle


# -- volumes ---------------------------------------------------------------------------------------
VOLUME_ERRORS = (e2b.VolumeException, e2b.SandboxException)


def test_volumes_through_the_sdk(
    e2b_env: Server, monkeypatch: pytest.MonkeyPatch, sandboxes: list[str]
) -> None:
    monkeypatch.setenv("E2B_VOLUME_API_URL", e2b_env.url)  # the content API: the same server
    name = f"vol-{uuid.uuid4().hex[:8]}"
    vol = Volume.create(name)
    try:
        assert vol.name == name and vol.volume_id and vol.token
        assert name in [v.name for v in Volume.list()]
        assert Volume.get_info(vol.volume_id).name == name
        with pytest.raises(VOLUME_ERRORS):
            Volume.create(name)  # names are unique

        # Content through the volume's token.
        vol.make_dir("data/nested", force=True)
        written = vol.write_file("data/nested/hello.txt", "hello volume")
        assert written.size == 12 and written.path == "/data/nested/hello.txt"
        assert vol.read_file("data/nested/hello.txt") == "hello volume"
        assert {e.name for e in vol.list("data", depth=2)} == {"nested", "hello.txt"}
        assert vol.exists("data/nested/hello.txt") and not vol.exists("data/none")
        vol.update_metadata("data/nested/hello.txt", mode=0o600)
        assert vol.get_info("data/nested/hello.txt").mode == 0o600

        # Mounted in a sandbox: the same files, both ways.
        sb = Sandbox.create(volume_mounts={"/mnt/shared": vol}, timeout=120)
        sandboxes.append(sb.sandbox_id)
        assert sb.files.read("/mnt/shared/data/nested/hello.txt") == "hello volume"
        assert {"name": name, "path": "/mnt/shared"} in sb.get_info().volume_mounts
        sb.commands.run("echo from-sandbox > /mnt/shared/back.txt && ln -s /etc/passwd /mnt/shared/link")
        assert vol.read_file("back.txt") == "from-sandbox\n"
        # A link planted by a sandbox is an entry, never followed to the host's files.
        assert vol.get_info("link").type.value == "symlink"
        with pytest.raises(VOLUME_ERRORS):
            vol.read_file("link")
        with pytest.raises(VOLUME_ERRORS):
            vol.read_file("../../etc/passwd")

        # A sandbox by the volume's name works too; a mounted volume cannot be destroyed.
        by_name = Sandbox.create(volume_mounts={"/v": name}, timeout=60)
        sandboxes.append(by_name.sandbox_id)
        assert by_name.files.read("/v/back.txt") == "from-sandbox\n"
        with pytest.raises(VOLUME_ERRORS):
            Volume.destroy(vol.volume_id)
        sb.kill()
        by_name.kill()

        # Another volume's token, or none, is refused.
        other = Volume.create(f"{name}-2")
        try:
            stranger = Volume.connect(vol.volume_id)
            stranger._token = other.token  # type: ignore[attr-defined]
            with pytest.raises(e2b.AuthenticationException):
                stranger.read_file("back.txt")
        finally:
            Volume.destroy(other.volume_id)
        r = httpx.get(f"{e2b_env.url}/volumecontent/{vol.volume_id}/file", params={"path": "back.txt"})
        assert r.status_code == 401 and r.json()["code"] == 401
        vol.remove("data")
        assert not vol.exists("data")
    finally:
        for sid in sandboxes:
            Sandbox.kill(sid)
        Volume.destroy(vol.volume_id)
    assert Volume.destroy(vol.volume_id) is False
    with pytest.raises(VOLUME_ERRORS):
        Volume.get_info(vol.volume_id)


def test_unserved_e2b_endpoints_say_so_in_e2bs_shape(e2b_env: Server, sbx: Sandbox) -> None:
    headers = {"X-API-KEY": e2b_env.api_key}
    with httpx.Client(base_url=e2b_env.url, headers=headers, timeout=30) as c:
        for method, path in (
            ("GET", f"/sandboxes/{sbx.sandbox_id}/logs"),
            ("GET", f"/v2/sandboxes/{sbx.sandbox_id}/logs"),
            ("GET", "/secrets"),
            ("POST", "/secrets"),
            ("GET", "/default-templates"),
            ("PUT", f"/sandboxes/{sbx.sandbox_id}"),
        ):
            r = c.request(method, path)
            assert r.status_code == 501, (method, path, r.text)
            assert r.json()["code"] == 501 and "cove does not serve" in r.json()["message"]
        assert c.get("/v1/no-such-route").status_code == 404  # cove's own paths are untouched


@needs_criu
def test_a_commands_timeout_runs_on_after_a_pause(sbx: Sandbox) -> None:
    h = sbx.commands.run("sleep 600", background=True, timeout=6)
    assert sbx.pause() is True  # ends the command's stream; its process sleeps on in the image
    time.sleep(1)
    sbx.connect()
    assert h.pid in [p.pid for p in sbx.commands.list()]
    deadline = time.monotonic() + 20
    while h.pid in [p.pid for p in sbx.commands.list()]:
        assert time.monotonic() < deadline, "the command outlived its timeout after the pause"
        time.sleep(0.3)


# -- the MCP gateway -------------------------------------------------------------------------------
CALC = r"""
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if "id" not in m:
        continue
    if m["method"] == "initialize":
        r = {"protocolVersion": m["params"]["protocolVersion"], "capabilities": {"tools": {}},
             "serverInfo": {"name": "calc", "version": "1"}}
    elif m["method"] == "tools/list":
        r = {"tools": [{"name": "add", "description": "a + b", "inputSchema": {"type": "object",
             "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}]}
    elif m["method"] == "tools/call":
        a = m["params"]["arguments"]
        r = {"content": [{"type": "text", "text": f"{sys.argv[1]} {a['a'] + a['b']}"}]}
    else:
        print(json.dumps({"jsonrpc": "2.0", "id": m["id"], "error": {"code": -32601, "message": "no"}}), flush=True)
        continue
    print(json.dumps({"jsonrpc": "2.0", "id": m["id"], "result": r}), flush=True)
"""


def test_the_mcp_gateway_starts_with_the_sdks_mcp_option_and_serves_the_servers_tools(
    e2b_env: Server, sandboxes: list[str]
) -> None:
    """`Sandbox.create(mcp=...)` starts cove's mcp-gateway in the sandbox (as e2b's SDK runs it); an
    MCP client reaches the servers' tools through the sandbox's port 50005 with the gateway's token."""
    import asyncio
    import shlex

    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    servers = {name: {"run_cmd": f"python3 -u -c {shlex.quote(CALC)} {name}"} for name in ("one", "two")}
    sb = Sandbox.create(mcp=servers, timeout=300)  # type: ignore[arg-type]
    sandboxes.append(sb.sandbox_id)
    token = sb.get_mcp_token()
    assert token and sb.files.read("/etc/mcp-gateway/.token", user="root") == token
    with pytest.raises(e2b.CommandExitException):  # the token is root's alone
        sb.commands.run("cat /etc/mcp-gateway/.token")
    route = {"E2b-Sandbox-Id": sb.sandbox_id, "E2b-Sandbox-Port": str(sb.mcp_port)}
    assert sb.get_mcp_url().endswith(f"{sb.mcp_port}-{sb.sandbox_id}.{sb.sandbox_domain}/mcp")

    async def use() -> tuple[list[str], str]:
        headers = {**route, "Authorization": f"Bearer {token}"}
        async with (
            httpx2.AsyncClient(headers=headers, timeout=60) as http,
            Client(streamable_http_client(f"{e2b_env.url}/mcp", http_client=http)) as client,
        ):
            tools = sorted(t.name for t in (await client.list_tools()).tools)
            result = await client.call_tool("two__add", {"a": 2, "b": 3})
            return tools, result.content[0].text  # type: ignore[union-attr]

    tools, text = asyncio.run(use())
    assert tools == ["one__add", "two__add"]  # the same name from two servers: each by its server
    assert text == "two 5"
    with httpx.Client(base_url=e2b_env.url, headers=route, timeout=30) as c:
        r = c.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        assert r.status_code == 401 and "Bearer" in r.json()["error"]

    # e2b's catalog servers run as Docker images there; here the SDK's own error says why not.
    tag = {"test": f"mcp-{uuid.uuid4().hex}"}
    with pytest.raises(e2b.SandboxException, match=r"Failed to start MCP gateway.*catalog.*run_cmd"):
        Sandbox.create(mcp={"exa": {"apiKey": "not-a-key"}}, timeout=60, metadata=tag)  # type: ignore[arg-type]
    with e2b_env.client() as c:
        tried = c.get("/v1/sandboxes", params={"metadata": f"test={tag['test']}"}).json()["items"]
    assert [s["state"] for s in tried] == ["killed"], tried  # the SDK killed the one that failed
    assert Sandbox.get_info(sb.sandbox_id).state == SandboxState.RUNNING


@needs_criu
def test_traffic_to_a_paused_sandboxs_port_resumes_it_when_it_asked_for_auto_resume(
    e2b_env: Server, sandboxes: list[str]
) -> None:
    made = {}
    for auto in (True, False):
        sb = Sandbox.create(timeout=300, lifecycle={"on_timeout": "pause", "auto_resume": auto})  # type: ignore[arg-type]
        sandboxes.append(sb.sandbox_id)
        sb.files.write("/home/user/www/index.html", f"auto={auto}")
        sb.commands.run("cd /home/user/www && python3 -m http.server 8000", background=True)
        route = {"E2b-Sandbox-Id": sb.sandbox_id, "E2b-Sandbox-Port": "8000"}
        with httpx.Client(base_url=e2b_env.url, headers=route, timeout=60) as c:
            deadline = time.monotonic() + 20
            while c.get("/").status_code != 200:
                assert time.monotonic() < deadline, "the server in the sandbox never answered"
                time.sleep(0.2)
        assert sb.pause() is True
        made[auto] = (sb, route)
    with httpx.Client(base_url=e2b_env.url, timeout=60) as c:
        sb, route = made[True]
        r = c.get("/", headers=route)  # wakes it: its processes (the server) resume with it
        assert r.status_code == 200 and r.text == "auto=True", r.text
        assert sb.get_info().state == SandboxState.RUNNING
        sb, route = made[False]
        r = c.get("/", headers=route)
        assert r.status_code == 502 and "paused" in r.text, r.text
        assert sb.get_info().state == SandboxState.PAUSED
