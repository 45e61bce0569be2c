"""The files API: round trips, errors, and paths that try to leave the sandbox."""

from __future__ import annotations

import os
import secrets
import threading
from pathlib import Path

import httpx

from conftest import UPLOAD_LIMIT, Server


def files(sid: str, sub: str = "") -> str:
    return f"/v1/sandboxes/{sid}/files{sub}"


def test_write_read_list_stat_mkdir_rename_remove(api: httpx.Client, sandbox: dict) -> None:
    sid = sandbox["id"]
    r = api.put(files(sid), params={"path": "/home/user/deep/new/file.txt"}, content=b"hello")
    assert r.status_code == 200, r.text
    entry = r.json()
    assert entry["type"] == "file" and entry["size"] == 5 and entry["owner"] == "user"
    assert api.get(files(sid), params={"path": "deep/new/file.txt"}).content == b"hello"  # relative to home
    assert api.get(files(sid, "/stat"), params={"path": "/home/user/deep"}).json()["type"] == "dir"
    listing = api.get(files(sid, "/list"), params={"path": "/home/user/deep", "depth": 2}).json()["entries"]
    assert [e["path"] for e in listing] == ["/home/user/deep/new", "/home/user/deep/new/file.txt"]
    assert api.post(files(sid, "/mkdir"), json={"path": "/home/user/a/b"}).json()["type"] == "dir"
    r = api.post(
        files(sid, "/rename"), json={"src": "/home/user/deep/new/file.txt", "dst": "/home/user/a/b/moved.txt"}
    )
    assert r.status_code == 200 and r.json()["path"] == "/home/user/a/b/moved.txt"
    r = api.delete(files(sid), params={"path": "/home/user/a"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_empty"
    assert api.delete(files(sid), params={"path": "/home/user/a", "recursive": True}).status_code == 204
    r = api.get(files(sid, "/stat"), params={"path": "/home/user/a"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_large_streamed_upload_and_download(api: httpx.Client, sandbox: dict) -> None:
    data = os.urandom(24 * 1024 * 1024)

    def gen():
        for i in range(0, len(data), 1 << 20):
            yield data[i : i + (1 << 20)]

    r = api.put(files(sandbox["id"]), params={"path": "/tmp/big.bin"}, content=gen())
    assert r.status_code == 200 and r.json()["size"] == len(data)
    got = bytearray()
    with api.stream("GET", files(sandbox["id"]), params={"path": "/tmp/big.bin"}) as resp:
        for chunk in resp.iter_bytes():
            got += chunk
    assert bytes(got) == data


def test_file_errors_are_clear(api: httpx.Client, sandbox: dict) -> None:
    sid = sandbox["id"]
    r = api.get(files(sid), params={"path": "/nope/missing.txt"})
    assert r.status_code == 404 and "missing.txt" in r.json()["error"]["message"]
    r = api.get(files(sid), params={"path": "/etc"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "is_a_directory"
    r = api.put(files(sid), params={"path": "/etc/passwd"}, content=b"x")
    assert r.status_code == 403, "the default user may not write /etc/passwd"
    r = api.put(files(sid), params={"path": "/usr/bin/evil", "user": "root"}, content=b"x")
    assert r.status_code == 403 and "read-only" in r.json()["error"]["message"].lower()
    assert api.get(files(sid), params={"path": ""}).status_code == 422
    assert api.get(files(sid), params={"path": "/a\x00b"}).status_code == 422


def test_paths_cannot_escape_the_sandbox(server: Server, api: httpx.Client, sandbox: dict) -> None:
    sid = sandbox["id"]
    marker = server.home / f"host-secret-{secrets.token_hex(4)}"
    marker.write_text("host data")
    try:
        # `..` climbs only to the sandbox's own root.
        r = api.get(files(sid), params={"path": "../../../../../../etc/hostname"})
        assert r.status_code == 200 and r.content == b"sandbox\n"
        # An absolute host path does not exist inside.
        assert api.get(files(sid), params={"path": str(marker)}).status_code == 404
        # Symlinks made inside resolve inside.
        cmd = f"ln -s / /home/user/rootlink && ln -s {marker} /home/user/hostlink"
        assert api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": cmd}).json()["exit_code"] == 0
        assert (
            api.get(files(sid), params={"path": "/home/user/rootlink/etc/hostname"}).content == b"sandbox\n"
        )
        assert api.get(files(sid), params={"path": "/home/user/hostlink"}).status_code == 404
        r = api.put(files(sid), params={"path": f"/home/user/rootlink{marker}"}, content=b"overwritten")
        assert marker.read_text() == "host data"
        assert (
            api.get(files(sid, "/stat"), params={"path": "/home/user/hostlink"}).json()["type"] == "symlink"
        )
        # Shadow here is the sandbox's own, never the host's.
        r = api.get(files(sid), params={"path": "/etc/shadow", "user": "root"})
        host_shadow = Path("/etc/shadow").read_text()
        assert r.status_code == 200 and r.text != host_shadow and "root:*" in r.text
    finally:
        marker.unlink()


def test_upload_limit_and_concurrent_calls(server: Server, api: httpx.Client, sandbox: dict) -> None:
    sid = sandbox["id"]
    errors: list[str] = []

    def worker(i: int) -> None:
        with server.client() as c:
            r = c.put(files(sid), params={"path": f"/tmp/c/{i}.txt"}, content=str(i).encode())
            if r.status_code != 200:
                errors.append(r.text)
            r = c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": f"cat /tmp/c/{i}.txt"})
            if r.json().get("stdout") != str(i):
                errors.append(r.text)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    names = [e["name"] for e in api.get(files(sid, "/list"), params={"path": "/tmp/c"}).json()["entries"]]
    assert sorted(names) == sorted(f"{i}.txt" for i in range(16))


def test_oversized_upload_is_413_and_leaves_nothing(api: httpx.Client, sandbox: dict) -> None:
    sid = sandbox["id"]
    chunk = b"x" * (1 << 20)
    n = UPLOAD_LIMIT // len(chunk) + 4
    r = api.put(files(sid), params={"path": "/tmp/huge.bin"}, content=(chunk for _ in range(n)))
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = api.put(files(sid), params={"path": "/tmp/huge.bin"}, content=chunk * n)  # with Content-Length
    assert r.status_code == 413
    left = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "ls -A /tmp"}).json()["stdout"]
    assert "huge" not in left, f"a partial upload was left behind: {left!r}"
