"""Sandboxes outlive their node (docs/object-storage.md): with an object store, a hibernated sandbox,
a snapshot and a running sandbox's periodic copy resume or start on another node after the node that
held them is killed and its data dir deleted.

Real parts: PostgreSQL 15 (tests/pg.py), moto's S3 server (tests/s3.py), two `cove serve` replicas,
each a node with its own data dir, sharing both; real CRIU images and btrfs layers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

import pg
import s3
from cove.devserver import Server
from cove.node import checkpoint
from cove.storage.objects import Manifest

KEY = "cove_test_durable_" + "cd" * 8

HOG = """
import hashlib, os, random, time
random.seed(7)
buf = bytearray(random.randbytes(100 << 20))
digest = hashlib.sha256(buf).hexdigest()
open('/home/user/started', 'w').write(digest)
while True:
    if os.path.exists('/home/user/ask'):
        os.unlink('/home/user/ask')
        open('/home/user/answer.tmp', 'w').write(f"{os.getpid()} {hashlib.sha256(buf).hexdigest()} {digest}")
        os.rename('/home/user/answer.tmp', '/home/user/answer')
    time.sleep(0.02)
"""


@pytest.fixture(scope="module")
def bucket() -> Iterator[s3.Moto]:
    server = s3.Moto().start()
    yield server
    server.stop()


@pytest.fixture
def pair(postgres: pg.Postgres, bucket: s3.Moto, request: pytest.FixtureRequest) -> Iterator[list[Server]]:
    """Replicas A and B, each a node, on one database and one bucket prefix."""
    url = postgres.create_database("durable")
    prefix = f"t-{request.node.name[:40].replace('_', '-')}-{os.getpid()}"
    env = {
        "COVE_DATABASE_URL": url,
        "COVE_API_KEY": KEY,
        "COVE_POOLS": "",
        "COVE_KERNEL": "0",
        **bucket.env(prefix),
    }
    made: list[Server] = []
    own: dict[str, dict[str, str]] = getattr(request, "param", {})  # a node's own settings, by tag
    try:
        for tag in ("dur-a", "dur-b"):
            srv = Server(tag, {**env, "COVE_NODE_ID": tag, **own.get(tag, {})})
            srv.api_key = KEY
            srv.start()
            made.append(srv)
        _wait(
            lambda: _ready(made[0]) >= {"dur-a", "dur-b"} and _ready(made[1]) >= {"dur-a", "dur-b"},
            "nodes join",
        )
        made[0].db_url = url  # type: ignore[attr-defined]
        made[0].prefix = prefix  # type: ignore[attr-defined]
        yield made
    finally:
        errors = []
        for srv in made:  # each one, whatever the others do
            try:
                srv.close()
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]


def _ready(srv: Server) -> set[str]:
    with srv.client() as c:
        return {
            n["id"] for n in c.get("/v1/nodes").json()["nodes"] if n["state"] == "ready" and n["reachable"]
        }


def _wait(check: object, what: str, timeout: float = 60) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():  # type: ignore[operator]
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting until {what}")


def _node_of(url: str, sid: str) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT node_id FROM sandboxes WHERE id = %s", (sid,)).fetchone()
    assert row is not None
    return str(row[0])


def _exec(c: httpx.Client, sid: str, cmd: str) -> str:
    r = c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": cmd}, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["exit_code"] == 0, out
    return str(out["stdout"])


def _start_hog(c: httpx.Client, sid: str) -> str:
    """A process holding 100 MB of known bytes; returns their digest."""
    assert (
        c.put(f"/v1/sandboxes/{sid}/files", params={"path": "/home/user/hog.py"}, content=HOG).status_code
        < 300
    )
    r = c.post(f"/v1/sandboxes/{sid}/processes", json={"cmd": "python3 /home/user/hog.py"})
    assert r.status_code == 201, r.text
    _wait(
        lambda: _exec(c, sid, "test -s /home/user/started && echo yes || true").strip() == "yes",
        "hog started",
    )
    return _exec(c, sid, "cat /home/user/started").strip()


def _ask_hog(c: httpx.Client, sid: str) -> list[str]:
    """The hog's pid, the digest of its memory now, and the digest it remembers."""
    return _exec(
        c,
        sid,
        "rm -f /home/user/answer; touch /home/user/ask; "
        "for i in $(seq 500); do test -e /home/user/answer && break; sleep 0.02; done; cat /home/user/answer",
    ).split()


def _kill_and_wipe(srv: Server) -> None:
    """kill -9 the server (its node) and everything it ran, and delete its data dir, as a machine
    that died would leave it (its processes, mounts and cgroups gone with it)."""
    if srv.proc is not None:
        srv.proc.send_signal(signal.SIGKILL)  # a no-op if it died already
        srv.proc.wait()
        srv.proc = None
    parents = list(Path("/sys/fs/cgroup").glob(f"*/{srv.cgroup_parent}"))
    for _ in range(50):
        pids = {
            int(p) for parent in parents for f in parent.rglob("cgroup.procs") for p in f.read_text().split()
        }
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f if str(srv.home) in line.split()[4]]
    for mount in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], check=False)
    shutil.rmtree(srv.home)
    srv.home.mkdir()
    for parent in parents:
        for d in sorted((p for p in parent.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            d.rmdir()
        parent.rmdir()


def _victim(pair: list[Server], url: str, sid: str) -> tuple[Server, Server]:
    holder = _node_of(url, sid)
    a, b = pair
    return (a, b) if holder == "dur-a" else (b, a)


@pytest.mark.skipif(
    not checkpoint.available(), reason="memory checkpoints need CRIU >= 4.1 (see `cove doctor`)"
)
def test_a_hibernated_sandbox_resumes_with_its_memory_on_another_node_after_its_node_is_gone(
    pair: list[Server], bucket: s3.Moto
) -> None:
    url = pair[0].db_url  # type: ignore[attr-defined]
    with pair[0].client() as c:
        sid = c.post("/v1/sandboxes", json={"timeout": 900, "memory_mb": 512}).json()["id"]
    victim, survivor = _victim(pair, url, sid)
    with victim.client() as cv, survivor.client() as cs:
        digest = _start_hog(cv, sid)
        _exec(
            cv,
            sid,
            "mkdir -p /home/user/work && head -c 3000000 /dev/urandom > /home/user/work/data && sha256sum /home/user/work/data > /home/user/work/sum",
        )
        pid_before, now_before, _ = _ask_hog(cv, sid)
        assert now_before == digest

        # A local round first: the figure the relocated resume is compared with.
        r = cv.post(f"/v1/sandboxes/{sid}/hibernate", timeout=300)
        assert r.status_code == 200, r.text
        assert r.json()["durability"]["copied_at"] is not None, (
            r.json()["hibernation"],
            r.json()["durability"],
        )
        assert r.json()["durability"]["memory"] is True
        t0 = time.perf_counter()
        assert cv.post(f"/v1/sandboxes/{sid}/resume", timeout=300).status_code == 200
        assert _ask_hog(cv, sid)[0] == pid_before
        local_s = time.perf_counter() - t0
        assert _node_of(url, sid) == victim.extra_env["COVE_NODE_ID"]

        t0 = time.perf_counter()
        r = cv.post(f"/v1/sandboxes/{sid}/hibernate", timeout=300)
        hibernate_s = time.perf_counter() - t0
        assert r.status_code == 200 and r.json()["state"] == "hibernated", r.text
        copied = [k for k in bucket.keys(pair[0].prefix) if k.startswith("manifests/criu/")]  # type: ignore[attr-defined]
        assert len(copied) == 1, copied  # the first hibernation's copy went when it resumed

    _kill_and_wipe(victim)
    with survivor.client() as cs:
        t0 = time.perf_counter()
        r = cs.post(f"/v1/sandboxes/{sid}/resume", timeout=300)
        assert r.status_code == 200, r.text
        pid_after, now_after, remembered = _ask_hog(cs, sid)
        remote_s = time.perf_counter() - t0
        assert (pid_after, now_after, remembered) == (pid_before, digest, digest)  # same process, same bytes
        assert _exec(cs, sid, "cd /home/user/work && sha256sum -c sum").strip().endswith("OK")
        assert _node_of(url, sid) == survivor.extra_env["COVE_NODE_ID"]
        info = cs.get(f"/v1/sandboxes/{sid}").json()["hibernation"]
        assert info["from_copy"] is True and info["restored"] is True
        print(
            f"\n100 MB process: hibernate with copy {hibernate_s * 1000:.0f} ms; resume → first exec output: "
            f"local {local_s * 1000:.0f} ms, on another node from the bucket {remote_s * 1000:.0f} ms "
            f"(pull {info.get('pulled_s')} s)"
        )
        assert cs.delete(f"/v1/sandboxes/{sid}").status_code == 204


def test_a_snapshot_starts_on_another_node_and_a_push_killed_midway_leaves_the_previous_one(
    pair: list[Server], bucket: s3.Moto
) -> None:
    url = pair[0].db_url  # type: ignore[attr-defined]
    prefix = pair[0].prefix  # type: ignore[attr-defined]
    with pair[0].client() as c:
        sid = c.post("/v1/sandboxes", json={"timeout": 900}).json()["id"]
    victim, survivor = _victim(pair, url, sid)
    with victim.client() as cv:
        _exec(cv, sid, "echo first > /home/user/v && head -c 2000000 /dev/urandom > /home/user/blob")
        blob = _exec(cv, sid, "sha256sum /home/user/blob").split()[0]
        r = cv.post(f"/v1/sandboxes/{sid}/snapshots", json={"name": "first"})
        assert r.status_code == 201, r.text
        first = r.json()
        _wait(
            lambda: cv.get(f"/v1/snapshots/{first['id']}").json()["durable"], "the first snapshot is copied"
        )
        layers_before = {k for k in bucket.keys(prefix) if k.startswith("manifests/layer/")}

    # The victim dies in the middle of copying the second snapshot (after its first chunk PUT).
    victim.extra_env["COVE_FAULT"] = "durable.uploading"
    victim.restart()
    with victim.client() as cv:
        _exec(cv, sid, "echo second > /home/user/v && head -c 3000000 /dev/urandom > /home/user/more")
        second = cv.post(f"/v1/sandboxes/{sid}/snapshots", json={"name": "second"})
        assert second.status_code == 201, second.text
    _wait(lambda: victim.proc is not None and victim.proc.poll() is not None, "the fault kills the victim")
    assert {
        k for k in bucket.keys(prefix) if k.startswith("manifests/layer/")
    } == layers_before  # no half copy listed
    victim.extra_env.pop("COVE_FAULT")
    _kill_and_wipe(victim)

    with survivor.client() as cs:
        assert cs.get(f"/v1/snapshots/{second.json()['id']}").json()["durable"] is False
        r = cs.post("/v1/sandboxes", json={"snapshot": first["id"], "timeout": 300})
        assert r.status_code == 201, r.text
        child = r.json()["id"]
        assert _node_of(url, child) == survivor.extra_env["COVE_NODE_ID"]
        assert _exec(cs, child, "cat /home/user/v").strip() == "first"
        assert _exec(cs, child, "sha256sum /home/user/blob").split()[0] == blob
        # The one that was never copied lived only on the lost node: a clear refusal.
        r = cs.post("/v1/sandboxes", json={"snapshot": second.json()["id"]})
        assert r.status_code == 503 and victim.extra_env["COVE_NODE_ID"] in r.json()["error"]["message"], (
            r.text
        )
        assert cs.delete(f"/v1/sandboxes/{child}").status_code == 204


@pytest.mark.skipif(
    not checkpoint.available(), reason="memory checkpoints need CRIU >= 4.1 (see `cove doctor`)"
)
def test_a_running_sandbox_with_periodic_copies_comes_back_from_its_copy_when_its_node_is_lost(
    pair: list[Server],
) -> None:
    url = pair[0].db_url  # type: ignore[attr-defined]
    with pair[0].client() as c:
        r = c.post("/v1/sandboxes", json={"timeout": 900, "snapshot_every": 30})
        assert r.status_code == 201, r.text
        assert r.json()["durability"]["snapshot_every"] == 30
        sid = r.json()["id"]
        bad = c.post(f"/v1/sandboxes/{sid}/durability", json={"snapshot_every": 5})
        assert bad.status_code == 422 and "at least 30" in bad.text
    victim, survivor = _victim(pair, url, sid)
    with victim.client() as cv:
        _exec(cv, sid, "echo kept > /home/user/state")
        # Used, so a copy falls due 30 s after it started.
        _wait(
            lambda: cv.get(f"/v1/sandboxes/{sid}").json()["durability"]["copied_at"] is not None,
            "a periodic copy",
            90,
        )
        _exec(cv, sid, "echo after-the-copy > /home/user/late")
    _kill_and_wipe(victim)
    with survivor.client() as cs:
        # The fleet notices the node is gone (its heartbeat stops) and turns the sandbox hibernated.
        noticed = _wait(
            lambda: cs.get(f"/v1/sandboxes/{sid}").json()["state"] == "hibernated",
            "hibernated from its copy",
            40,
        )
        info = cs.get(f"/v1/sandboxes/{sid}").json()["hibernation"]
        assert info["from_copy"] is True and "resumes from its copy" in info["reason"]
        assert cs.post(f"/v1/sandboxes/{sid}/resume", timeout=300).status_code == 200
        assert _exec(cs, sid, "cat /home/user/state").strip() == "kept"
        assert (
            _exec(cs, sid, "test -e /home/user/late && echo yes || echo no").strip() == "no"
        )  # after the copy: lost
        assert _node_of(url, sid) == survivor.extra_env["COVE_NODE_ID"]
        print(f"\nnode loss noticed and the sandbox hibernated from its copy {noticed:.1f} s after the kill")
        assert cs.delete(f"/v1/sandboxes/{sid}").status_code == 204


def test_a_corrupt_chunk_fails_the_start_naming_the_snapshot_and_leaves_nothing_behind(
    pair: list[Server], bucket: s3.Moto
) -> None:
    url = pair[0].db_url  # type: ignore[attr-defined]
    prefix = pair[0].prefix  # type: ignore[attr-defined]
    with pair[0].client() as c:
        sid = c.post("/v1/sandboxes", json={"timeout": 900}).json()["id"]
    victim, survivor = _victim(pair, url, sid)
    with victim.client() as cv:
        _exec(cv, sid, "head -c 1000000 /dev/urandom > /home/user/blob")
        r = cv.post(f"/v1/sandboxes/{sid}/snapshots", json={})
        assert r.status_code == 201, r.text
        snap = r.json()["id"]
        _wait(lambda: cv.get(f"/v1/snapshots/{snap}").json()["durable"], "the snapshot is copied")
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT layers FROM snapshots WHERE id = %s", (snap,)).fetchone()
    assert row is not None
    own = row[0][-1]  # the snapshot's own layer (the chain below is the base template's)
    client = bucket.client()
    body = client.get_object(Bucket=bucket.bucket, Key=f"{prefix}/manifests/layer/{own}.json")["Body"].read()
    shas = Manifest.from_bytes(body, own).chunk_shas()
    assert shas
    for sha in shas:  # flip the stored bytes: each read must fail its checksum
        key = f"{prefix}/chunks/{sha}"
        data = bytearray(client.get_object(Bucket=bucket.bucket, Key=key)["Body"].read())
        data[len(data) // 2] ^= 0xFF
        client.put_object(Bucket=bucket.bucket, Key=key, Body=bytes(data))
    _kill_and_wipe(victim)

    with survivor.client() as cs:
        r = cs.post("/v1/sandboxes", json={"snapshot": snap, "timeout": 300})
        assert r.status_code == 503, r.text
        message = r.json()["error"]["message"]
        assert f"snapshot {snap}" in message and "corrupt" in message.lower(), message
        # Nothing of the failed download is left where a sandbox could start from it.
        assert not list((survivor.home / "storage" / "layers").glob(f"*{own}*"))
        failed = [s for s in cs.get("/v1/sandboxes", params={"state": "error"}).json()["items"]]
        assert any(f"snapshot {snap}" in (s["end_reason"] or "") for s in failed)
        # The source sandbox's node is gone: its kill is recorded (the node sweeps it if it returns).
        assert cs.delete(f"/v1/sandboxes/{sid}").status_code == 204
        r = cs.get(f"/v1/sandboxes/{sid}").json()
        assert r["state"] == "killed" and "did not answer" in r["end_reason"], r


def test_periodic_copies_are_asked_through_the_sdk_the_cli_and_e2b_and_refused_without_a_store(
    pair: list[Server], server: Server
) -> None:
    from e2b import Sandbox as E2bSandbox
    from e2b.exceptions import SandboxException

    from cove.sdk import Sandbox

    a = pair[0]
    with Sandbox.create(snapshot_every=40, url=a.url, api_key=KEY) as sb:
        assert sb.info().durability["snapshot_every"] == 40
        assert sb.set_durability(0).durability["snapshot_every"] == 0
    done = subprocess.run(
        [sys.executable, "-m", "cove", "create", "--snapshot-every", "45"],
        env={**os.environ, "COVE_URL": a.url, "COVE_API_KEY": KEY},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    with a.client() as c:
        sid = done.stdout.strip()
        assert c.get(f"/v1/sandboxes/{sid}").json()["durability"]["snapshot_every"] == 45
        assert c.delete(f"/v1/sandboxes/{sid}").status_code == 204
    e2b = {"api_key": KEY, "api_url": a.url, "sandbox_url": a.url}
    sbx = E2bSandbox.create(metadata={"cove:snapshot_every": "60"}, **e2b)
    try:
        with a.client() as c:
            assert c.get(f"/v1/sandboxes/{sbx.sandbox_id}").json()["durability"]["snapshot_every"] == 60
    finally:
        sbx.kill()
    with pytest.raises(SandboxException, match="cove:snapshot_every"):
        E2bSandbox.create(metadata={"cove:snapshot_every": "often"}, **e2b)
    # A server without an object store says what is missing.
    with server.client() as c:
        r = c.post("/v1/sandboxes", json={"snapshot_every": 60})
        assert r.status_code == 409 and "COVE_OBJECT_STORE" in r.json()["error"]["message"], r.text


def test_a_template_built_on_one_node_starts_on_another_after_that_node_is_gone(pair: list[Server]) -> None:
    url = pair[0].db_url  # type: ignore[attr-defined]
    builder, other = pair
    with builder.client() as c:
        body = {
            "name": "durable-tpl",
            "from": "base",
            "steps": [
                {
                    "type": "run",
                    "cmd": "echo built > /home/user/mark",
                }
            ],
        }
        r = c.post("/v1/templates", json=body, timeout=300)
        assert r.status_code == 200, r.text
        events = [json.loads(line) for line in r.text.splitlines() if line.strip()]
        assert events[-1]["type"] == "done", events[-3:]
        assert any("copied:" in (e.get("data") or "") for e in events), events
    _kill_and_wipe(builder)
    with other.client() as c:
        r = c.post("/v1/sandboxes", json={"template": "durable-tpl", "timeout": 120})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        assert _node_of(url, sid) == other.extra_env["COVE_NODE_ID"]
        assert _exec(c, sid, "cat /home/user/mark").strip() == "built"
        assert c.delete(f"/v1/sandboxes/{sid}").status_code == 204


def _live(url: str) -> dict[str, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT node_id, count(*) FROM sandboxes WHERE state IN ('starting', 'running', 'paused') GROUP BY node_id"
        ).fetchall()
    return {str(n): int(k) for n, k in rows}


@pytest.mark.skipif(
    not checkpoint.available(), reason="memory checkpoints need CRIU >= 4.1 (see `cove doctor`)"
)
@pytest.mark.parametrize(
    "pair",
    [{"dur-a": {"COVE_NODE_MAX_SANDBOXES": "3"}, "dur-b": {"COVE_NODE_MAX_SANDBOXES": "4"}}],
    indirect=True,
    ids=["a3-b4"],
)
def test_a_fork_spills_over_to_another_node_when_its_node_is_full(
    pair: list[Server], bucket: s3.Moto
) -> None:
    """Node A takes 3 sandboxes, B 4. A fork of 4 from A's sandbox: 2 children on A (its image
    there), 2 on B from a copy in the bucket, all continuing the source's process; a create through
    A then goes to B; a fork the fleet has no room for is refused before anything starts."""
    url = pair[0].db_url  # type: ignore[attr-defined]
    a, _b = pair
    with a.client() as c:
        sid = c.post("/v1/sandboxes", json={"timeout": 900, "memory_mb": 512}).json()["id"]
        assert _node_of(url, sid) == "dur-a"  # a tie goes to the receiving server's node
        assert (
            c.put(
                f"/v1/sandboxes/{sid}/files",
                params={"path": "/home/user/hog.py"},
                content=HOG.replace("100 << 20", "8 << 20"),
            ).status_code
            < 300
        )
        assert (
            c.post(f"/v1/sandboxes/{sid}/processes", json={"cmd": "python3 /home/user/hog.py"}).status_code
            == 201
        )
        _wait(
            lambda: _exec(c, sid, "test -s /home/user/started && echo yes || true").strip() == "yes",
            "hog started",
        )
        digest = _exec(c, sid, "cat /home/user/started").strip()
        pid, now, _ = _ask_hog(c, sid)
        assert now == digest

        r = c.post(f"/v1/sandboxes/{sid}/fork", json={"count": 4}, timeout=300)
        assert r.status_code == 201, r.text
        body = r.json()
        children = [s["id"] for s in body["items"]]
        assert body["memory"] is True
        where = sorted(_node_of(url, child) for child in children)
        assert where == ["dur-a", "dur-a", "dur-b", "dur-b"], where
        for child in children:  # each child continues the source's process, wherever it runs
            assert _ask_hog(c, child) == [pid, digest, digest], child
        # The fork's own image is not kept in the bucket once its children have it.
        assert not [k for k in bucket.keys(a.prefix) if k.startswith("manifests/criu/")]  # type: ignore[attr-defined]

        r = c.post("/v1/sandboxes", json={"timeout": 300})  # A is full: placed on B
        assert r.status_code == 201, r.text
        assert _node_of(url, r.json()["id"]) == "dur-b"
        before = _live(url)
        assert before == {"dur-a": 3, "dur-b": 3}, before

        r = c.post(f"/v1/sandboxes/{sid}/fork", json={"count": 3}, timeout=300)
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert (
            err["code"] == "fleet_full"
            and "dur-a" in err["message"]
            and "room for 1 of the 3" in err["message"]
        ), err
        assert r.headers.get("retry-after")
        assert _live(url) == before  # nothing started, nothing half made
        r = c.post("/v1/sandboxes", json={"timeout": 300})
        assert r.status_code == 201 and _node_of(url, r.json()["id"]) == "dur-b", r.text
        r = c.post("/v1/sandboxes", json={"timeout": 300})  # every node full now
        assert r.status_code == 503 and r.json()["error"]["code"] == "fleet_full", r.text


def _bucket_size(bucket: s3.Moto, prefix: str) -> int:
    c = bucket.client()
    total = 0
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket.bucket, Prefix=f"{prefix}/chunks/"):
        total += sum(o["Size"] for o in page.get("Contents", []))
    return total


@pytest.mark.parametrize(
    "pair",
    [{tag: {"COVE_OBJECT_GC_EVERY": "1", "COVE_OBJECT_GC_GRACE": "0"} for tag in ("dur-a", "dur-b")}],
    indirect=True,
    ids=["gc-every-1s"],
)
def test_the_bucket_drops_copies_no_record_names_and_keeps_the_others(
    pair: list[Server], bucket: s3.Moto
) -> None:
    """A deleted snapshot's copy (its own layer's manifest, then its unshared chunks) leaves the
    bucket at the next collection; a snapshot still recorded keeps its copy, and starts elsewhere."""
    url = pair[0].db_url  # type: ignore[attr-defined]
    prefix = pair[0].prefix  # type: ignore[attr-defined]
    with pair[0].client() as c:
        sid = c.post("/v1/sandboxes", json={"timeout": 900}).json()["id"]
        _exec(
            c,
            sid,
            "head -c 2000000 /dev/urandom > /home/user/kept && sha256sum /home/user/kept > /home/user/sum",
        )
        keep = c.post(f"/v1/sandboxes/{sid}/snapshots", json={"name": "keep"}).json()["id"]
        _wait(lambda: c.get(f"/v1/snapshots/{keep}").json()["durable"], "the first snapshot is copied")
        _exec(c, sid, "head -c 4000000 /dev/urandom > /home/user/dropped")
        drop = c.post(f"/v1/sandboxes/{sid}/snapshots", json={"name": "drop"}).json()["id"]
        _wait(lambda: c.get(f"/v1/snapshots/{drop}").json()["durable"], "the second snapshot is copied")
        with psycopg.connect(url, autocommit=True) as conn:
            layers = {
                str(i): json.loads(row[0]) if isinstance(row[0], str) else row[0]
                for i, row in (
                    (k, conn.execute("SELECT layers FROM snapshots WHERE id = %s", (k,)).fetchone())
                    for k in (keep, drop)
                )
                if row is not None
            }
        own = layers[drop][-1]
        assert own not in layers[keep]
        listed = {
            k.rsplit("/", 1)[-1].removesuffix(".json")
            for k in bucket.keys(prefix)
            if k.startswith("manifests/layer/")
        }
        assert set(layers[keep]) | {own} <= listed, listed
        before = _bucket_size(bucket, prefix)

        assert c.delete(f"/v1/snapshots/{drop}").status_code == 204
        _wait(
            lambda: (
                f"manifests/layer/{own}.json" not in bucket.keys(prefix)
                and _bucket_size(bucket, prefix) < before
            ),
            "the deleted snapshot's copy and chunks leave the bucket",
        )
        after = _bucket_size(bucket, prefix)
        assert before - after >= 3_500_000, (before, after)  # the 4 MB of random bytes only it held
        listed = {
            k.rsplit("/", 1)[-1].removesuffix(".json")
            for k in bucket.keys(prefix)
            if k.startswith("manifests/layer/")
        }
        assert set(layers[keep]) <= listed, (layers[keep], listed)
    # What is still recorded starts on the other node from the bucket, its bytes intact.
    with pair[1].client() as cb:
        r = cb.post("/v1/sandboxes", json={"snapshot": keep, "timeout": 300})
        assert r.status_code == 201, r.text
        child = r.json()["id"]
        assert _exec(cb, child, "sha256sum -c /home/user/sum").strip().endswith("OK")
        assert _exec(cb, child, "test -e /home/user/dropped && echo there || echo absent").strip() == "absent"
