"""Named volumes: shared between sandboxes, outliving them and the server, read-only even for root,
size-limited inside only, tenant-private, and carried (or copied) by snapshots, hibernation and forks."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cove.devserver import Server, leaks
from cove.node import checkpoint

needs_criu = pytest.mark.skipif(not checkpoint.available(), reason="needs CRIU >= 4.1")


def sh(api: httpx.Client, sid: str, cmd: str, user: str | None = None) -> dict:
    body: dict = {"cmd": cmd, "timeout": 60}
    if user:
        body["user"] = user
    r = api.post(f"/v1/sandboxes/{sid}/exec", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def new_volume(api: httpx.Client, size_mb: int | None = None) -> str:
    name = "v-" + secrets.token_hex(4)
    body: dict = {"name": name}
    if size_mb:
        body["size_mb"] = size_mb
    r = api.post("/v1/volumes", json=body)
    assert r.status_code == 201, r.text
    return name


def create(api: httpx.Client, volumes: list[dict], **extra: object) -> dict:
    r = api.post("/v1/sandboxes", json={"volumes": volumes, "timeout": 600, **extra})
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture
def killer(api: httpx.Client) -> Iterator[list[str]]:
    """Sandbox ids to kill after the test, whatever happened."""
    ids: list[str] = []
    yield ids
    for sid in ids:
        api.delete(f"/v1/sandboxes/{sid}")


def host_mounts_of(server: Server, sid: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if f"/sandboxes/{sid}/" in line and str(server.home) in line]


def test_volume_is_shared_outlives_its_sandboxes_and_a_restart() -> None:
    srv = Server(f"volrestart-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}")
    srv.start()
    try:
        with srv.client() as api:
            name = new_volume(api)
            a = create(api, [{"name": name, "path": "/data"}])
            b = create(api, [{"name": name, "path": "/mnt/shared"}])
            assert a["volumes"] == [{"name": name, "path": "/data", "read_only": False}]
            assert sh(api, a["id"], "echo from-a > /data/note; id -un")["stdout"] == "user\n"
            assert sh(api, b["id"], "cat /mnt/shared/note")["stdout"] == "from-a\n"
            sh(api, b["id"], "echo from-b >> /mnt/shared/note")
            assert sh(api, a["id"], "cat /data/note")["stdout"] == "from-a\nfrom-b\n"
            assert sorted(api.get(f"/v1/volumes/{name}").json()["sandboxes"]) == sorted([a["id"], b["id"]])
            api.delete(f"/v1/sandboxes/{a['id']}")
            assert host_mounts_of(srv, a["id"]) == []  # kill unmounts
            srv.restart()  # b survives the restart with its mount; the volume's record too
            assert sh(api, b["id"], "cat /mnt/shared/note")["stdout"] == "from-a\nfrom-b\n"
            api.delete(f"/v1/sandboxes/{b['id']}")
            assert [v["name"] for v in api.get("/v1/volumes").json()["items"]] == [name]
            c = create(api, [{"name": name, "path": "/data"}])
            assert sh(api, c["id"], "cat /data/note")["stdout"] == "from-a\nfrom-b\n"
            api.delete(f"/v1/sandboxes/{c['id']}")
            assert api.delete(f"/v1/volumes/{name}").status_code == 204
            assert api.get(f"/v1/volumes/{name}").status_code == 404
    finally:
        srv.close()  # raises if a mount or cgroup was left behind


def test_read_only_holds_against_root_and_is_locked(api: httpx.Client, killer: list[str]) -> None:
    name = new_volume(api)
    rw = create(api, [{"name": name, "path": "/data"}])
    killer.append(rw["id"])
    sh(api, rw["id"], "echo kept > /data/f")
    ro = create(api, [{"name": name, "path": "/data", "read_only": True}])
    killer.append(ro["id"])
    assert ro["volumes"][0]["read_only"] is True
    assert sh(api, ro["id"], "cat /data/f")["stdout"] == "kept\n"
    for user in ("user", "root"):
        res = sh(api, ro["id"], "echo x > /data/f; echo rc=$?; touch /data/new; rm -f /data/f", user=user)
        assert "Read-only file system" in res["stderr"], res
    res = sh(api, ro["id"], "mount -o remount,rw /data; echo rc=$?", user="root")
    assert "rc=0" not in res["stdout"], res

    # Even with every capability in the sandbox's user namespace (entered from the host), the
    # mount stays read-only: it was made before that namespace existed, so it is locked there.
    def remount_rw(sid: str) -> subprocess.CompletedProcess[str]:
        flags = "remount,bind,rw,nosuid,nodev,noatime"  # the flags it has, but writable
        argv = ["nsenter", "-t", str(_init_pid(sid)), "-U", "-m", "--", "mount", "-o", flags, "/data"]
        return subprocess.run(argv, capture_output=True, text=True)

    assert remount_rw(rw["id"]).returncode == 0  # the same call works on an unlocked mount
    done = remount_rw(ro["id"])
    assert done.returncode != 0 and "permission denied" in done.stderr, done
    assert sh(api, ro["id"], "touch /data/new 2>&1; echo rc=$?", user="root")["stdout"].endswith("rc=1\n")
    assert sh(api, rw["id"], "cat /data/f; ls /data")["stdout"] == "kept\nf\n"


def _init_pid(sid: str) -> int:
    """Host pid of the sandbox's init: the oldest process in its cgroup."""

    def started(pid: int) -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])

    for root, dirs, files in os.walk("/sys/fs/cgroup"):
        if os.path.basename(root) == sid and "cgroup.procs" in files:
            pids = [int(p) for p in Path(root, "cgroup.procs").read_text().split()]
            if pids:
                return min(pids, key=started)
        if root.count("/") > 6:
            dirs[:] = []
    raise AssertionError(f"no cgroup for {sid}")


def test_size_limit_is_edquot_inside_and_the_host_is_fine(api: httpx.Client, killer: list[str]) -> None:
    name = new_volume(api, size_mb=32)
    assert api.get(f"/v1/volumes/{name}").json()["size_mb"] == 32
    sb = create(api, [{"name": name, "path": "/data"}])
    killer.append(sb["id"])
    res = sh(api, sb["id"], "dd if=/dev/zero of=/data/big bs=1M count=64 2>&1; echo rc=$?")
    assert "Disk quota exceeded" in res["stdout"] and "rc=1" in res["stdout"], res
    # The sandbox's own disk, and the host, are untouched by the full volume.
    res = sh(api, sb["id"], "head -c 4194304 /dev/zero > /home/user/ok && echo wrote")
    assert res["stdout"] == "wrote\n", res
    with open(f"/tmp/cove-host-probe-{os.getpid()}", "wb") as f:
        f.write(b"\0" * (1 << 20))
    os.unlink(f.name)
    # Deleting frees the quota: the volume is writable again.
    assert (
        sh(api, sb["id"], "rm /data/big && head -c 1048576 /dev/zero > /data/small && echo ok")["stdout"]
        == "ok\n"
    )


def test_in_use_delete_unknown_and_bad_requests(api: httpx.Client, killer: list[str]) -> None:
    name = new_volume(api)
    assert api.post("/v1/volumes", json={"name": name}).status_code == 409
    a = create(api, [{"name": name, "path": "/data"}])
    killer.append(a["id"])
    paused = create(api, [{"name": name, "path": "/data", "read_only": True}])
    killer.append(paused["id"])
    api.post(f"/v1/sandboxes/{paused['id']}/pause")
    r = api.delete(f"/v1/volumes/{name}")
    assert r.status_code == 409, r.text
    assert sorted(r.json()["error"]["sandboxes"]) == sorted([a["id"], paused["id"]])
    assert a["id"] in r.json()["error"]["message"]
    for bad in ({"volumes": [{"name": "nope-" + secrets.token_hex(3), "path": "/data"}]},):
        r = api.post("/v1/sandboxes", json=bad)
        assert r.status_code == 404 and "volume" in r.text, r.text
    for path in ("data", "/", "/proc/x", "/run/cove", "/usr/lib", "/a/../b", "/a/", "/x\n"):
        r = api.post("/v1/sandboxes", json={"volumes": [{"name": name, "path": path}]})
        assert r.status_code == 422, (path, r.text)
    r = api.post(
        "/v1/sandboxes",
        json={"volumes": [{"name": name, "path": "/data"}, {"name": name, "path": "/data/sub"}]},
    )
    assert r.status_code == 422 and "overlap" in r.text
    for body in ({"name": "Bad Name"}, {"name": "ok", "size_mb": 1}, {"name": "x", "extra": 1}):
        assert api.post("/v1/volumes", json=body).status_code == 422, body
    assert api.get("/v1/volumes/nope-nope").status_code == 404
    assert api.delete("/v1/volumes/nope-nope").status_code == 404
    api.delete(f"/v1/sandboxes/{a['id']}")
    api.delete(f"/v1/sandboxes/{paused['id']}")
    assert api.delete(f"/v1/volumes/{name}").status_code == 204


def test_another_tenants_volume_is_a_404(server: Server, api: httpx.Client, killer: list[str]) -> None:
    name = new_volume(api)
    key = api.post("/v1/keys", json={"name": "vol-other", "tenant": "vol-other-" + secrets.token_hex(3)})
    assert key.status_code == 201, key.text
    with server.client(key.json()["key"]) as other:
        assert other.get(f"/v1/volumes/{name}").status_code == 404
        assert other.delete(f"/v1/volumes/{name}").status_code == 404
        assert name not in [v["name"] for v in other.get("/v1/volumes").json()["items"]]
        r = other.post("/v1/sandboxes", json={"volumes": [{"name": name, "path": "/data"}]})
        assert r.status_code == 404, r.text
        # The same name in the other tenant is another volume.
        assert other.post("/v1/volumes", json={"name": name}).status_code == 201
        sb = other.post("/v1/sandboxes", json={"volumes": [{"name": name, "path": "/data"}]}).json()
        sh(other, sb["id"], "echo theirs > /data/f")
        other.delete(f"/v1/sandboxes/{sb['id']}")
        assert other.delete(f"/v1/volumes/{name}").status_code == 204
    mine = create(api, [{"name": name, "path": "/data"}])
    killer.append(mine["id"])
    assert sh(api, mine["id"], "ls /data")["stdout"] == ""


def test_snapshot_excludes_or_includes_volumes(api: httpx.Client, killer: list[str]) -> None:
    name = new_volume(api, size_mb=64)
    src = create(api, [{"name": name, "path": "/data"}])
    killer.append(src["id"])
    sh(api, src["id"], "echo v1 > /data/f; echo layer > /home/user/l")
    excl = api.post(f"/v1/sandboxes/{src['id']}/snapshots", json={}).json()  # default: exclude
    incl = api.post(f"/v1/sandboxes/{src['id']}/snapshots", json={"volumes": "include"}).json()
    assert excl["volumes"] == [{"name": name, "path": "/data", "read_only": False, "mode": "live"}]
    assert incl["volumes"][0]["mode"] == "copy"
    sh(api, src["id"], "echo v2 > /data/f")  # after both snapshots

    live = api.post("/v1/sandboxes", json={"snapshot": excl["id"]}).json()
    killer.append(live["id"])
    assert live["volumes"] == [{"name": name, "path": "/data", "read_only": False}]
    assert sh(api, live["id"], "cat /data/f /home/user/l")["stdout"] == "v2\nlayer\n"

    copy = api.post("/v1/sandboxes", json={"snapshot": incl["id"]}).json()
    killer.append(copy["id"])
    copy_name = copy["volumes"][0]["name"]
    assert copy_name == f"{name}-{copy['id'][:8]}"
    assert sh(api, copy["id"], "cat /data/f")["stdout"] == "v1\n"  # the content at the snapshot
    sh(api, copy["id"], "echo mine > /data/f")
    assert sh(api, src["id"], "cat /data/f")["stdout"] == "v2\n"
    vol = api.get(f"/v1/volumes/{copy_name}").json()
    assert vol["source"] == {"snapshot": incl["id"], "volume": name} and vol["size_mb"] == 64
    # The copy is a volume like any other: it outlives its sandbox and is deleted by name.
    api.delete(f"/v1/sandboxes/{copy['id']}")
    assert api.delete(f"/v1/volumes/{copy_name}").status_code == 204
    # Deleting the snapshot drops its sealed copy; the live snapshot fails clearly once its volume is gone.
    assert api.delete(f"/v1/snapshots/{incl['id']}").status_code == 204
    for sid in (src["id"], live["id"]):
        api.delete(f"/v1/sandboxes/{sid}")
    assert api.delete(f"/v1/volumes/{name}").status_code == 204
    r = api.post("/v1/sandboxes", json={"snapshot": excl["id"]})
    assert r.status_code == 409 and "deleted" in r.text, r.text
    api.delete(f"/v1/snapshots/{excl['id']}")


def test_volumes_survive_hibernate_and_fork(server: Server, api: httpx.Client, killer: list[str]) -> None:
    name = new_volume(api)
    ro_name = new_volume(api)
    sb = create(api, [{"name": name, "path": "/data"}, {"name": ro_name, "path": "/ro", "read_only": True}])
    killer.append(sb["id"])
    # A process keeps a file on the volume open across the hibernation.
    sh(
        api,
        sb["id"],
        "setsid sh -c 'exec 3>>/data/log; while :; do echo t >&3; sleep 0.05; done' >/dev/null 2>&1 &",
    )
    time.sleep(0.3)
    r = api.post(f"/v1/sandboxes/{sb['id']}/hibernate")
    assert r.status_code == 200, r.text
    assert host_mounts_of(server, sb["id"]) == []  # mounts are released while it sleeps
    n = int(sh(api, sb["id"], "wc -l < /data/log")["stdout"])  # resumes it
    time.sleep(0.3)
    assert int(sh(api, sb["id"], "wc -l < /data/log")["stdout"]) > n
    info = api.get(f"/v1/sandboxes/{sb['id']}").json()
    if checkpoint.available():
        assert info["hibernation"]["memory"] is True and info["hibernation"].get("restored") is True, info
        # The fewest of three looks: the loop's shell forks for each `sleep`, and for an instant
        # that child still has the shell's command line. `[3]`: not this checking shell's own.
        fewest = "for i in 1 2 3; do pgrep -c -f 'exec [3]>>'; sleep 0.02; done | sort -n | head -1"
        assert sh(api, sb["id"], fewest)["stdout"].strip() == "1"
    assert "Read-only" in sh(api, sb["id"], "touch /ro/x", user="root")["stderr"]

    r = api.post(f"/v1/sandboxes/{sb['id']}/fork", json={"count": 2})
    assert r.status_code == 201, r.text
    children = r.json()["items"]
    killer.extend(c["id"] for c in children)
    for child in children:
        assert [v["name"] for v in child["volumes"]] == [name, ro_name]
        sh(api, child["id"], f"echo {child['id']} > /data/from-child")
        assert "Read-only" in sh(api, child["id"], "touch /ro/x", user="root")["stderr"]
    # exclude (the default): the children write into the same live volume
    assert sh(api, sb["id"], "cat /data/from-child")["stdout"].strip() in {c["id"] for c in children}

    r = api.post(f"/v1/sandboxes/{sb['id']}/fork", json={"count": 1, "volumes": "include"})
    assert r.status_code == 201, r.text
    (child,) = r.json()["items"]
    killer.append(child["id"])
    copies = [v["name"] for v in child["volumes"]]
    assert copies == [f"{name}-{child['id'][:8]}", f"{ro_name}-{child['id'][:8]}"]
    sh(api, child["id"], "echo private > /data/from-child")
    assert sh(api, sb["id"], "cat /data/from-child")["stdout"] != "private\n"
    assert "Read-only" in sh(api, child["id"], "touch /ro/x", user="root")["stderr"]
    for sid in [sb["id"], *(c["id"] for c in children), child["id"]]:
        api.delete(f"/v1/sandboxes/{sid}")
    for vol in [name, ro_name, *copies]:
        assert api.delete(f"/v1/volumes/{vol}").status_code == 204, vol
    assert not [m for m in leaks(server) if "/sandboxes/" in m and any(s in m for s in killer)]


@needs_criu
def test_memory_snapshot_with_included_volume_restores_onto_the_copy(
    api: httpx.Client, killer: list[str]
) -> None:
    name = new_volume(api)
    sb = create(api, [{"name": name, "path": "/data"}])
    killer.append(sb["id"])
    sh(
        api,
        sb["id"],
        "setsid sh -c 'exec 3>>/data/log; while :; do echo t >&3; sleep 0.05; done' >/dev/null 2>&1 &",
    )
    time.sleep(0.3)
    snap = api.post(f"/v1/sandboxes/{sb['id']}/snapshots", json={"memory": True, "volumes": "include"})
    assert snap.status_code == 201, snap.text
    child = api.post("/v1/sandboxes", json={"snapshot": snap.json()["id"]})
    assert child.status_code == 201, child.text
    cid = child.json()["id"]
    killer.append(cid)
    # The restored writer continues, into its own copy (its open file had the dump's size there).
    n = int(sh(api, cid, "wc -l < /data/log")["stdout"])
    time.sleep(0.3)
    assert int(sh(api, cid, "wc -l < /data/log")["stdout"]) > n
    assert sh(api, cid, "grep -c /data /proc/self/mountinfo")["stdout"].strip() == "1"
    r = api.post(
        "/v1/sandboxes", json={"snapshot": snap.json()["id"], "volumes": [{"name": name, "path": "/x"}]}
    )
    assert r.status_code == 422, r.text
    api.delete(f"/v1/sandboxes/{cid}")
    api.delete(f"/v1/sandboxes/{sb['id']}")
    api.delete(f"/v1/snapshots/{snap.json()['id']}")
    for vol in (name, child.json()["volumes"][0]["name"]):
        assert api.delete(f"/v1/volumes/{vol}").status_code == 204


def test_sdk_sync_and_async(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from cove import AsyncSandbox, AsyncVolume, Conflict, NotFound, Sandbox, Volume

    monkeypatch.setenv("COVE_URL", server.url)
    monkeypatch.setenv("COVE_API_KEY", server.api_key)
    vol = Volume.create("sdk-" + secrets.token_hex(3), size_mb=64)
    assert vol.info.size_mb == 64 and vol.name in [v.name for v in Volume.list()]
    with Sandbox.create(volumes=[vol.mount("/data")]) as sb:
        assert sb.info().volumes == [{"name": vol.name, "path": "/data", "read_only": False}]
        sb.exec("echo sync > /data/f")
        assert vol.refresh().sandboxes == [sb.id]
        with pytest.raises(Conflict):
            vol.delete()
        snap = sb.snapshot(volumes="include")
    child = Sandbox.create(snapshot=snap.id)
    try:
        assert child.exec("cat /data/f").stdout == "sync\n"
        copy = Volume.get(child.info().volumes[0]["name"])
        assert copy.info.source["volume"] == vol.name
    finally:
        child.kill()
    copy.delete()
    Sandbox.delete_snapshot(snap.id)

    async def run() -> None:
        avol = await AsyncVolume.get(vol.name)
        async with AsyncSandbox.create(
            volumes=[{"name": avol.name, "path": "/mnt/v", "read_only": True}]
        ) as sb:
            assert (await sb.exec("cat /mnt/v/f")).stdout == "sync\n"
            assert "Read-only" in (await sb.exec("touch /mnt/v/x")).stderr
        await avol.delete()
        with pytest.raises(NotFound):
            await AsyncVolume.get(vol.name)

    asyncio.run(run())


def test_cli_volume_commands(server: Server, api: httpx.Client) -> None:
    from typer.testing import CliRunner

    from cove.cli.main import app

    env = {"COVE_URL": server.url, "COVE_API_KEY": server.api_key, "COLUMNS": "200"}

    def run(*args: str) -> Any:
        return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)

    name = "cli-" + secrets.token_hex(3)
    assert run("volume", "create", name, "--size-mb", "48").stdout.strip() == name
    listed = run("volume", "ls")
    assert listed.exit_code == 0 and name in listed.stdout and "48" in listed.stdout
    created = run("create", "--volume", f"{name}:/data", "--volume", f"{name}:/ro:ro")
    assert created.exit_code == 0, created.stdout
    sid = created.stdout.strip()
    try:
        assert sh(api, sid, "echo cli > /data/f; cat /ro/f; touch /ro/x")["stderr"].count("Read-only") == 1
        busy = run("volume", "rm", name)
        assert busy.exit_code == 1 and sid in busy.stderr
        bad = run("create", "--volume", "no-path")
        assert bad.exit_code == 2 and "NAME:/path" in bad.stderr
        missing = run("create", "--volume", "nope-nope:/data")
        assert missing.exit_code == 1 and "not found" in missing.stderr.lower()
    finally:
        api.delete(f"/v1/sandboxes/{sid}")
    assert run("volume", "rm", name).stdout.strip() == f"deleted {name}"
    assert name not in run("volume", "ls").stdout
