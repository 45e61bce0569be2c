"""Bucket mounts: an S3-compatible bucket (moto's server on loopback, started here) mounted by rclone
on the host and bound into the sandbox; the credentials never reach the sandbox."""

from __future__ import annotations

import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cove.devserver import Server, free_port
from cove.node.namespaces import bucket_mounts

pytestmark = pytest.mark.skipif(not bucket_mounts.available(), reason="needs rclone and /dev/fuse (setup.sh)")
boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")


# Every file the sandbox can read (as its root) except /usr, /proc and /sys (the host's image and
# the kernel), every process's environment and command line, and its mount tables.
SCAN = r"""
import os, sys
keys = [k.encode() for k in sys.stdin.read().split()]
hits, scanned = [], 0
def check(path):
    global scanned
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return
    scanned += 1
    if any(k in data for k in keys):
        hits.append(path)
for root, dirs, files in os.walk("/"):
    if root == "/":
        dirs[:] = [d for d in dirs if d not in ("proc", "sys", "usr")]
    for name in files:
        path = os.path.join(root, name)
        if os.path.isfile(path) and not os.path.islink(path):
            check(path)
for pid in filter(str.isdigit, os.listdir("/proc")):
    check(f"/proc/{pid}/environ")
    check(f"/proc/{pid}/cmdline")
check("/proc/mounts")
check("/proc/self/mountinfo")
print(scanned)
print("\\n".join(hits))
"""


class S3:
    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        # Fresh, random keys per run: nothing on the host could contain them by chance.
        self.key_id = "AKID" + secrets.token_hex(8).upper()
        self.secret = "sk" + secrets.token_hex(16)
        self.client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.key_id,
            aws_secret_access_key=self.secret,
            region_name="us-east-1",
        )

    def bucket(self, **objects: bytes) -> str:
        name = "b-" + secrets.token_hex(4)
        self.client.create_bucket(Bucket=name)
        for key, body in objects.items():
            self.client.put_object(Bucket=name, Key=key.replace("__", "/"), Body=body)
        return name

    def keys(self, bucket: str) -> dict[str, bytes]:
        out = {}
        for obj in self.client.list_objects_v2(Bucket=bucket).get("Contents", []):
            out[obj["Key"]] = self.client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        return out

    def mount(self, bucket: str, path: str = "/bucket", **extra: Any) -> dict[str, Any]:
        return {
            "type": "s3",
            "bucket": bucket,
            "endpoint": self.endpoint,
            "access_key_id": self.key_id,
            "secret_access_key": self.secret,
            "path": path,
            **extra,
        }


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    store = S3()
    yield store
    store.server.stop()


@pytest.fixture
def killer(api: httpx.Client) -> Iterator[list[str]]:
    ids: list[str] = []
    yield ids
    for sid in ids:
        api.delete(f"/v1/sandboxes/{sid}")


def sh(api: httpx.Client, sid: str, cmd: str, user: str | None = None) -> dict:
    body: dict = {"cmd": cmd, "timeout": 60}
    if user:
        body["user"] = user
    r = api.post(f"/v1/sandboxes/{sid}/exec", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def create(api: httpx.Client, killer: list[str], **body: Any) -> dict:
    r = api.post("/v1/sandboxes", json={"timeout": 600, **body})
    assert r.status_code == 201, r.text
    killer.append(r.json()["id"])
    return r.json()


def wait_for(check: Any, what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def rclone_pids(marker: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if b"rclone" in cmd and marker.encode() in cmd:
                pids.append(int(p.name))
    return pids


def test_bucket_prefix_is_visible_and_writes_become_objects(
    server: Server, api: httpx.Client, killer: list[str], s3: S3
) -> None:
    bucket = s3.bucket(in__a_txt=b"hello", in__sub__b_txt=b"nested", out__c_txt=b"not mine")
    sb = create(api, killer, mounts=[s3.mount(bucket, prefix="in")])
    assert sb["mounts"][0]["bucket"] == bucket and sb["mounts"][0]["status"] == "mounted"
    sid = sb["id"]
    assert (
        sh(api, sid, "ls /bucket; cat /bucket/a_txt /bucket/sub/b_txt")["stdout"] == "a_txt\nsub\nhellonested"
    )
    assert sh(api, sid, "stat -c %U /bucket/a_txt")["stdout"] == "user\n"
    res = sh(
        api, sid, "echo written > /bucket/new.txt && mkdir -p /bucket/d && cp /bucket/a_txt /bucket/d/copy"
    )
    assert res["exit_code"] == 0, res
    want = {"in/new.txt": b"written\n", "in/d/copy": b"hello"}
    wait_for(lambda: all(s3.keys(bucket).get(k) == v for k, v in want.items()), "uploads")
    assert "out/c_txt" in s3.keys(bucket) and "new.txt" not in s3.keys(bucket)
    assert sh(api, sid, "rm /bucket/new.txt")["exit_code"] == 0
    wait_for(lambda: "in/new.txt" not in s3.keys(bucket), "the delete")

    # Killing the sandbox ends rclone and its mount; the bucket keeps every object.
    sdir = server.home / "sandboxes" / sid
    assert rclone_pids(str(sdir))
    api.delete(f"/v1/sandboxes/{sid}")
    assert rclone_pids(str(sdir)) == []
    assert not sdir.exists()
    assert [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(sdir) in line] == []
    assert set(s3.keys(bucket)) == {"in/a_txt", "in/sub/b_txt", "out/c_txt", "in/d/copy"}


def test_read_only_bucket_refuses_writes(api: httpx.Client, killer: list[str], s3: S3) -> None:
    bucket = s3.bucket(a=b"1")
    sb = create(api, killer, mounts=[s3.mount(bucket, read_only=True)])
    assert sh(api, sb["id"], "cat /bucket/a")["stdout"] == "1"
    for user in ("user", "root"):
        res = sh(api, sb["id"], "echo x > /bucket/a; echo y > /bucket/b; rm -f /bucket/a", user=user)
        assert "Read-only file system" in res["stderr"], res
    time.sleep(1.5)  # longer than rclone's write-back delay
    assert s3.keys(bucket) == {"a": b"1"}


def test_credentials_never_reach_the_sandbox(
    server: Server, api: httpx.Client, killer: list[str], s3: S3
) -> None:
    bucket = s3.bucket(f=b"data")
    sb = create(api, killer, mounts=[s3.mount(bucket)], env={"PLAIN": "1"})
    sid = sb["id"]
    sh(api, sid, "sleep 300 >/dev/null 2>&1 &")
    # The keys travel on stdin, so the scan's own command line cannot contain them.
    api.put(f"/v1/sandboxes/{sid}/files", params={"path": "/tmp/scan.py"}, content=SCAN.encode())
    r = api.post(
        f"/v1/sandboxes/{sid}/exec",
        json={"argv": ["python3", "/tmp/scan.py"], "stdin": f"{s3.secret} {s3.key_id}", "user": "root"},
    )
    assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
    scanned, hits = r.json()["stdout"].split("\n", 1)
    assert int(scanned) > 50 and hits.strip() == "", r.json()["stdout"]
    assert "bucket:" in sh(api, sid, "grep /bucket /proc/mounts")["stdout"]  # what it does see
    for secret in (s3.secret, s3.key_id):
        assert secret not in str(sb) and secret not in api.get(f"/v1/sandboxes/{sid}").text
        # Host side: the store never holds them; the config file is root's alone.
        db = sqlite3.connect(server.home / "cove.db")
        try:
            assert not [row for row in db.execute("SELECT mounts FROM sandboxes") if secret in row[0]]
        finally:
            db.close()
    conf = server.home / "sandboxes" / sid / "fuse" / "0" / "rclone.conf"
    assert s3.secret in conf.read_text()
    assert conf.stat().st_mode & 0o777 == 0o600 and conf.parent.stat().st_mode & 0o777 == 0o700


def test_hibernate_keeps_files_only_and_fork_is_refused(
    server: Server, api: httpx.Client, killer: list[str], s3: S3
) -> None:
    bucket = s3.bucket(a=b"before")
    vol = "bm-" + secrets.token_hex(3)
    assert api.post("/v1/volumes", json={"name": vol}).status_code == 201
    sb = create(api, killer, mounts=[s3.mount(bucket)], volumes=[{"name": vol, "path": "/data"}])
    sid = sb["id"]
    sdir = server.home / "sandboxes" / sid
    for path in (f"/v1/sandboxes/{sid}/fork",):
        r = api.post(path, json={})
        assert r.status_code == 409 and "bucket" in r.text, r.text
    r = api.post(f"/v1/sandboxes/{sid}/snapshots", json={"memory": True})
    assert r.status_code == 409 and "FUSE" in r.text, r.text
    r = api.post(f"/v1/sandboxes/{sid}/hibernate")
    assert r.status_code == 200, r.text
    hib = r.json()["hibernation"]
    assert hib["memory"] is False and "bucket" in hib["reason"]
    assert rclone_pids(str(sdir)) == []  # nothing of it runs while it sleeps
    s3.client.put_object(Bucket=bucket, Key="while-asleep", Body=b"new")
    assert sh(api, sid, "cat /bucket/a /bucket/while-asleep; ls /data")["stdout"] == "beforenew"  # resumed
    assert api.get(f"/v1/sandboxes/{sid}").json()["mounts"][0]["status"] == "mounted"
    # A snapshot without memory works; it does not carry the bucket (a new sandbox names its own).
    snap = api.post(f"/v1/sandboxes/{sid}/snapshots", json={}).json()
    child = create(api, killer, snapshot=snap["id"])
    assert child["mounts"] == [] and child["volumes"][0]["name"] == vol
    assert sh(api, child["id"], "ls /bucket")["stdout"] == ""
    api.delete(f"/v1/snapshots/{snap['id']}")
    for s in (sid, child["id"]):
        api.delete(f"/v1/sandboxes/{s}")
    assert api.delete(f"/v1/volumes/{vol}").status_code == 204


def test_bad_mount_requests(api: httpx.Client, s3: S3) -> None:
    good = s3.mount("bkt")
    for change in (
        {"secret_access_key": None},
        {"endpoint": "ftp://x"},
        {"bucket": "../x"},
        {"path": "relative"},
        {"path": "/proc/x"},
        {"access_key_id": "a\nb"},
        {"prefix": "a\nsecret_access_key = x"},
        {"type": "gcs"},
        {"unknown": 1},
    ):
        r = api.post("/v1/sandboxes", json={"mounts": [{**good, **change}]})
        assert r.status_code == 422, (change, r.text)
    r = api.post("/v1/sandboxes", json={"mounts": [good, {**good, "path": "/bucket/inner"}]})
    assert r.status_code == 422 and "overlap" in r.text


def test_server_restart_keeps_the_mount_and_a_dead_rclone_is_marked(s3: S3) -> None:
    srv = Server(f"mountrestart-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}")
    srv.start()
    try:
        bucket = s3.bucket(a=b"kept")
        with srv.client() as api:
            sb = api.post("/v1/sandboxes", json={"mounts": [s3.mount(bucket)]}).json()
            sid = sb["id"]
            srv.restart()  # rclone is not the server's: the mount outlives the restart
            assert sh(api, sid, "cat /bucket/a")["stdout"] == "kept"
            assert api.get(f"/v1/sandboxes/{sid}").json()["mounts"][0]["status"] == "mounted"
            (pid,) = rclone_pids(str(srv.home / "sandboxes" / sid))
            os.kill(pid, 9)
            wait_for(
                lambda: api.get(f"/v1/sandboxes/{sid}").json()["mounts"][0]["status"] == "lost",
                "the lost mount to be noticed",
            )
            # hibernate + resume restarts its processes and mounts the bucket again
            assert api.post(f"/v1/sandboxes/{sid}/hibernate").status_code == 200
            assert sh(api, sid, "cat /bucket/a")["stdout"] == "kept"
            assert api.get(f"/v1/sandboxes/{sid}").json()["mounts"][0]["status"] == "mounted"
            api.delete(f"/v1/sandboxes/{sid}")
            assert rclone_pids(str(srv.home)) == []
    finally:
        srv.close()
