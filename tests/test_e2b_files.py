"""envd's file side on cove (/files, /health, filesystem.Filesystem), driven by the unmodified `e2b`
SDK, sync and async, configured only by the `e2b_env` fixture. Raw HTTP checks what the SDK cannot
send (malformed bodies, bad signatures, bombs)."""

from __future__ import annotations

import asyncio
import gzip
import io
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from e2b import (
    AsyncSandbox,
    AuthenticationException,
    FileType,
    InvalidArgumentException,
    NotEnoughSpaceException,
    NotFoundException,
    Sandbox,
    SandboxException,
)
from e2b.connection_config import ConnectionConfig
from e2b.sandbox.filesystem.watch_handle import FilesystemEventType
from packaging.version import Version

from conftest import UPLOAD_LIMIT, Server
from cove.compat.e2b.filesystem import WATCHERS_PER_SANDBOX
from cove.controlplane.signing import Signer


@pytest.fixture
def http(e2b_env: Server, sbx: Sandbox) -> Iterator[httpx.Client]:
    """Raw envd traffic for `sbx`, with its token."""
    headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "X-Access-Token": sbx._envd_access_token or ""}
    with httpx.Client(base_url=e2b_env.url, headers=headers, timeout=60) as c:
        yield c


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def sh(e2b_env: Server, sandbox_id: str, cmd: str, user: str = "user") -> str:
    """Run a command through cove's own API (independent of the e2b side under test)."""
    with e2b_env.client() as c:
        r = c.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": cmd, "user": user})
    assert r.status_code == 200, r.text
    assert r.json()["exit_code"] == 0, r.json()
    return r.json()["stdout"]


# --- reading and writing ---------------------------------------------------------------------


def test_write_and_read_every_way(sbx: Sandbox) -> None:
    info = sbx.files.write("notes/a.txt", "héllo")
    assert (info.name, info.type, info.path) == ("a.txt", FileType.FILE, "/home/user/notes/a.txt")
    assert sbx.files.read("notes/a.txt") == "héllo"
    assert sbx.files.read("/home/user/notes/a.txt", format="bytes") == bytearray("héllo".encode())
    data = bytes(range(256)) * 4096  # 1 MiB, every byte value
    sbx.files.write("bin/data", data)
    with sbx.files.read("bin/data", format="stream") as stream:
        assert b"".join(stream) == data
    # Streamed sources (octet-stream uploads): a file object and an iterable of chunks.
    sbx.files.write("bin/io", io.BytesIO(data))
    sbx.files.write("bin/iter", (data[i : i + 100_000] for i in range(0, len(data), 100_000)))
    assert sbx.files.read("bin/io", format="bytes") == data
    assert sbx.files.read("bin/iter", format="bytes") == data
    # Overwriting replaces the content.
    sbx.files.write("notes/a.txt", "b")
    assert sbx.files.read("notes/a.txt") == "b"


def test_write_files_several_in_one_request(sbx: Sandbox) -> None:
    infos = sbx.files.write_files(
        [
            {"path": "multi/one.txt", "data": "1"},
            {"path": "multi/deep/er/two.bin", "data": b"\x00\x02"},
            {"path": "/tmp/abs/three.txt", "data": "3"},
        ]
    )
    assert [i.path for i in infos] == [
        "/home/user/multi/one.txt",
        "/home/user/multi/deep/er/two.bin",
        "/tmp/abs/three.txt",
    ]
    assert sbx.files.read("multi/deep/er/two.bin", format="bytes") == b"\x00\x02"
    assert sbx.files.read("/tmp/abs/three.txt") == "3"
    assert sbx.files.write_files([]) == []


def test_gzip_both_ways(sbx: Sandbox, http: httpx.Client) -> None:
    text = "compress me " * 10_000
    sbx.files.write("z.txt", text, gzip=True)
    assert sbx.files.read("z.txt", gzip=True) == text
    # On the wire: a gzip body is what the client asked for, and smaller.
    r = http.get("/files", params={"path": "z.txt"}, headers={"Accept-Encoding": "gzip"})
    assert r.headers["content-encoding"] == "gzip"
    assert r.content.decode() == text  # httpx decodes it
    raw = http.get("/files", params={"path": "z.txt"}, headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in raw.headers and raw.text == text


def test_async_files(e2b_env: Server) -> None:
    async def go() -> None:
        s = await AsyncSandbox.create(timeout=300)
        try:
            await s.files.write("a/b.txt", "async")
            assert await s.files.read("a/b.txt") == "async"

            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(4):
                    yield b"x" * 100_000

            await s.files.write("a/stream.bin", chunks(), gzip=True)
            got = bytearray()
            async with await s.files.read("a/stream.bin", format="stream") as stream:
                async for chunk in stream:
                    got += chunk
            assert got == b"x" * 400_000
            infos = await s.files.write_files([{"path": "w/1", "data": "1"}, {"path": "w/2/3", "data": "3"}])
            assert [i.name for i in infos] == ["1", "3"]
            assert [e.name for e in await s.files.list("w")] == ["1", "2"]
            assert await s.files.exists("w/2/3") and not await s.files.exists("w/4")
            assert (await s.files.get_info("w/2")).type == FileType.DIR
            assert await s.files.make_dir("w/new") and not await s.files.make_dir("w/new")
            assert (await s.files.rename("w/1", "w/one")).path == "/home/user/w/one"
            await s.files.remove("w")
            assert not await s.files.exists("w")
            with pytest.raises(NotFoundException):
                await s.files.read("w/one")
        finally:
            await s.kill()

    run(go())


# --- directories and entries -----------------------------------------------------------------


def test_list_depth_and_entry_fields(sbx: Sandbox) -> None:
    sbx.files.write("tree/a/b/c.txt", "c")
    sbx.files.write("tree/top.txt", "top")
    assert [e.name for e in sbx.files.list("tree")] == ["a", "top.txt"]
    deep = sbx.files.list("tree", depth=3)
    assert [e.path for e in deep] == [
        "/home/user/tree/a",
        "/home/user/tree/a/b",
        "/home/user/tree/a/b/c.txt",
        "/home/user/tree/top.txt",
    ]
    top = next(e for e in deep if e.name == "top.txt")
    assert (top.type, top.size, top.mode, top.permissions) == (FileType.FILE, 3, 0o644, "-rw-r--r--")
    assert (top.owner, top.group, top.symlink_target, top.metadata) == ("user", "user", None, None)
    assert abs(top.modified_time.timestamp() - time.time()) < 60
    assert next(e for e in deep if e.name == "a").permissions == "drwxr-xr-x"
    with pytest.raises(InvalidArgumentException):
        sbx.files.list("tree", depth=0)
    with pytest.raises(InvalidArgumentException):
        sbx.files.list("tree/top.txt")  # not a directory


def test_exists_info_make_dir_rename_remove(sbx: Sandbox, e2b_env: Server) -> None:
    assert not sbx.files.exists("d")
    assert sbx.files.make_dir("d/e/f") is True
    assert sbx.files.make_dir("d/e/f") is False  # already there
    assert sbx.files.exists("d/e")
    info = sbx.files.get_info("d/e")
    assert (info.name, info.type, info.path) == ("e", FileType.DIR, "/home/user/d/e")
    sbx.files.write("d/file", "x")
    with pytest.raises(InvalidArgumentException):
        sbx.files.make_dir("d/file")  # a file is in the way
    moved = sbx.files.rename("d/file", "d/e/f/moved")
    assert (moved.path, moved.size) == ("/home/user/d/e/f/moved", 1)
    assert not sbx.files.exists("d/file")
    sh(e2b_env, sbx.sandbox_id, "ln -s e/f/moved /home/user/d/link")
    link = sbx.files.get_info("d/link")
    assert (link.type, link.symlink_target) == (FileType.SYMLINK, "/home/user/d/e/f/moved")
    assert link.permissions == "Lrwxrwxrwx"
    sbx.files.remove("d")  # recursive
    assert not sbx.files.exists("d")
    sbx.files.remove("never-was")  # as envd: nothing to remove is fine


def test_unknown_paths_are_not_found(sbx: Sandbox) -> None:
    for call in (
        lambda: sbx.files.read("missing.txt"),
        lambda: sbx.files.get_info("missing.txt"),
        lambda: sbx.files.list("missing-dir"),
        lambda: sbx.files.rename("missing.txt", "b.txt"),
        lambda: sbx.files.watch_dir("missing-dir"),
    ):
        with pytest.raises(NotFoundException):
            call()
    with pytest.raises(InvalidArgumentException):
        sbx.files.read("/home/user")  # a directory


# --- users, paths and isolation --------------------------------------------------------------


def test_users_and_permissions(sbx: Sandbox) -> None:
    info = sbx.files.write("/root/secret.txt", "r", user="root")
    assert info.path == "/root/secret.txt"
    assert sbx.files.get_info("/root/secret.txt", user="root").owner == "root"
    assert sbx.files.read("secret.txt", user="root") == "r"  # relative to root's home
    # As with envd, file operations act with the sandbox root's permissions (the token holder can
    # run commands as root anyway) and give what they create to the acting user.
    assert sbx.files.read("/root/secret.txt") == "r"
    assert sbx.files.make_dir("/workspace/deep")
    assert sbx.files.get_info("/workspace").owner == "user"
    assert sbx.files.write("/workspace/deep/f.txt", "w").path == "/workspace/deep/f.txt"
    assert sbx.files.get_info("/workspace/deep/f.txt").owner == "user"
    assert sbx.files.get_info("/workspace/deep/f.txt", user="root").owner == "user"
    sbx.files.write("/workspace/deep/f.txt", "w2", user="root")  # replacing keeps the owner
    assert sbx.files.get_info("/workspace/deep/f.txt").owner == "user"
    assert sbx.files.write("/workspace/r.txt", "r", user="root") and (
        sbx.files.get_info("/workspace/r.txt").owner == "root"
    )
    with pytest.raises(AuthenticationException, match="unknown user"):
        sbx.files.read("x", user="nobody-here")
    with pytest.raises(AuthenticationException, match="unknown user"):
        sbx.files.list(".", user="nobody-here")
    assert sbx.files.list("/root", user="root")[0].name == "secret.txt"


def test_paths_cannot_leave_the_sandbox(sbx: Sandbox, e2b_env: Server) -> None:
    host_shadow = Path("/etc/shadow").read_bytes()
    sandbox_shadow = bytes(sbx.files.read("/etc/shadow", format="bytes", user="root"))
    assert sandbox_shadow != host_shadow
    # `..` and a symlink to /etc/shadow both stop at the sandbox's own root.
    assert sbx.files.read("../../../../etc/shadow", format="bytes", user="root") == sandbox_shadow
    sh(e2b_env, sbx.sandbox_id, "ln -s /etc/shadow /home/user/shadow && ln -s ../../.. /home/user/up")
    assert sbx.files.read("/home/user/shadow", format="bytes", user="root") == sandbox_shadow
    assert sbx.files.read("/home/user/up/etc/shadow", format="bytes", user="root") == sandbox_shadow
    # Writing through the link writes the sandbox's file, never the host's.
    sbx.files.write("/home/user/shadow", "sandbox-only\n", user="root")
    assert Path("/etc/shadow").read_bytes() == host_shadow
    assert sbx.files.read("/etc/shadow", user="root") == "sandbox-only\n"


# --- metadata (user.e2b.* xattrs on the sandbox's overlay root) --------------------------------


def test_metadata(sbx: Sandbox, e2b_env: Server) -> None:
    info = sbx.files.write("m.txt", "x", metadata={"Owner": "alice", "k2": "v 2"})
    assert info.metadata == {"owner": "alice", "k2": "v 2"}  # keys lowercased, as envd does
    assert sbx.files.get_info("m.txt").metadata == {"owner": "alice", "k2": "v 2"}
    getxattr = "python3 -c \"import os; print(os.getxattr('m.txt', 'user.e2b.owner').decode(), end='')\""
    assert sh(e2b_env, sbx.sandbox_id, getxattr) == "alice"
    assert next(e for e in sbx.files.list(".") if e.name == "m.txt").metadata == {
        "owner": "alice",
        "k2": "v 2",
    }
    assert sbx.files.rename("m.txt", "n.txt").metadata == {"owner": "alice", "k2": "v 2"}
    several = sbx.files.write_files(
        [{"path": "p/1", "data": "1"}, {"path": "p/2", "data": "2"}], metadata={"t": "1"}
    )
    assert [i.metadata for i in several] == [{"t": "1"}, {"t": "1"}]
    # An upload replaces the file's whole set; set out of band, it shows too.
    assert sbx.files.write("n.txt", "y").metadata is None
    assert sbx.files.get_info("n.txt").metadata is None
    setxattrs = (
        "import os; os.setxattr('n.txt', 'user.e2b.byhand', b'yes'); os.setxattr('n.txt', 'user.x', b'no')"
    )
    sh(e2b_env, sbx.sandbox_id, f'python3 -c "{setxattrs}"')
    assert sbx.files.get_info("n.txt").metadata == {"byhand": "yes"}
    with pytest.raises(InvalidArgumentException):
        sbx.files.write("bad", "x", metadata={"no spaces": "x"})  # the SDK checks
    assert not sbx.files.exists("bad")


def test_metadata_checked_by_the_server(http: httpx.Client) -> None:
    for name, value in (("X-Metadata-K", b"caf\xe9"), ("X-Metadata-" + "k" * 250, b"v")):
        headers = {"Content-Type": "application/octet-stream", name: value}
        r = http.post("/files", params={"path": "bad"}, content=b"x", headers=headers)
        assert r.status_code == 400 and "metadata" in r.json()["message"], r.text


# --- watching --------------------------------------------------------------------------------


def _wait_for(get, want, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    seen: list = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen += get()
        if all(w in [(e.name, e.type) for e in seen] for w in want):
            return seen
        time.sleep(0.1)
    raise AssertionError(f"missing {want} in {seen}")


def test_watch_dir_polling(sbx: Sandbox) -> None:
    sbx.files.make_dir("watched/sub")
    handle = sbx.files.watch_dir("watched", recursive=True)
    try:
        sbx.files.write("watched/a.txt", "1")
        sbx.files.write("watched/sub/b.txt", "2")
        sbx.files.rename("watched/a.txt", "watched/c.txt")
        sbx.files.remove("watched/sub/b.txt")
        seen = _wait_for(
            handle.get_new_events,
            [
                ("a.txt", FilesystemEventType.CREATE),
                ("a.txt", FilesystemEventType.WRITE),
                ("sub/b.txt", FilesystemEventType.WRITE),
                ("a.txt", FilesystemEventType.RENAME),
                ("c.txt", FilesystemEventType.CREATE),
                ("sub/b.txt", FilesystemEventType.REMOVE),
            ],
        )
        assert not [e for e in seen if ".cove-" in e.name]  # upload temporaries are not events
        assert handle.get_new_events() == []  # events are handed out once
    finally:
        handle.stop()
    with pytest.raises(SandboxException):
        handle.get_new_events()
    flat = sbx.files.watch_dir("watched")
    try:
        sbx.files.write("watched/sub/deeper.txt", "x")
        sbx.files.write("watched/top.txt", "x")
        seen = _wait_for(flat.get_new_events, [("top.txt", FilesystemEventType.WRITE)])
        assert "sub/deeper.txt" not in [e.name for e in seen]
    finally:
        flat.stop()
    with pytest.raises(InvalidArgumentException):
        sbx.files.watch_dir("watched/top.txt")


def test_polling_watchers_are_bounded(sbx: Sandbox) -> None:
    handles = [sbx.files.watch_dir(".") for _ in range(WATCHERS_PER_SANDBOX)]
    try:
        with pytest.raises(SandboxException, match="too many watchers"):
            sbx.files.watch_dir(".")
        handles.pop().stop()
        handles.append(sbx.files.watch_dir("."))  # room again
    finally:
        for h in handles:
            h.stop()


def test_watch_dir_streaming(e2b_env: Server) -> None:
    async def go() -> None:
        s = await AsyncSandbox.create(timeout=300)
        try:
            await s.files.make_dir("w")
            events: list = []
            handle = await s.files.watch_dir("w", events.append, recursive=True, include_entry=True)
            await s.files.write("w/d/x.txt", "hello")
            deadline = time.monotonic() + 10
            while not any(e.name == "d/x.txt" and e.type == FilesystemEventType.WRITE for e in events):
                assert time.monotonic() < deadline, events
                await asyncio.sleep(0.05)
            written = next(e for e in events if e.name == "d/x.txt" and e.type == FilesystemEventType.WRITE)
            assert written.entry is not None and written.entry.size == 5
            await handle.stop()
        finally:
            await s.kill()

    run(go())


# --- limits and bad input --------------------------------------------------------------------


def test_upload_over_the_limit(sbx: Sandbox, http: httpx.Client) -> None:
    too_big = b"x" * (UPLOAD_LIMIT + 1)
    with pytest.raises(SandboxException, match=f"limit of {UPLOAD_LIMIT} bytes"):
        sbx.files.write("big.bin", too_big)
    with pytest.raises(SandboxException, match=f"limit of {UPLOAD_LIMIT} bytes"):
        sbx.files.write("big.bin", io.BytesIO(too_big))  # streamed: no length known up front
    # A gzip bomb: 40 KiB on the wire, over the limit once inflated.
    bomb = gzip.compress(b"\0" * (UPLOAD_LIMIT + 1024))
    assert len(bomb) < 100_000
    r = http.post(
        "/files",
        params={"path": "bomb"},
        content=bomb,
        headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
    )
    assert r.status_code == 413 and "limit" in r.json()["message"]
    assert not sbx.files.exists("big.bin") and not sbx.files.exists("bomb")
    assert [e.name for e in sbx.files.list(".") if ".cove-" in e.name] == []  # no half-written file


def _sdk_for(e2b_env: Server, sandbox_id: str, token: str) -> Sandbox:
    """The SDK's handle on a sandbox made through cove's own API (as `Sandbox.create` builds it)."""
    return Sandbox(
        sandbox_id=sandbox_id,
        sandbox_domain=None,
        envd_version=Version("0.6.4"),
        envd_access_token=token,
        connection_config=ConnectionConfig(
            extra_sandbox_headers={"X-Access-Token": token, "E2b-Sandbox-Id": sandbox_id}
        ),
    )


def test_disk_full_is_not_enough_space(e2b_env: Server) -> None:
    with e2b_env.client() as api:
        sid = api.post("/v1/sandboxes", json={"disk_mb": 32}).json()["id"]
        try:
            s = _sdk_for(e2b_env, sid, Signer(e2b_env.home / "secret").token("e2b-envd", sid))
            sh(e2b_env, sid, "dd if=/dev/zero of=/home/user/half bs=1M count=20 status=none")
            with pytest.raises(NotEnoughSpaceException):
                s.files.write("/tmp/big", b"x" * (20 << 20))
            assert not s.files.exists("/tmp/big")
            assert [e.name for e in s.files.list("/tmp") if ".cove-" in e.name] == []
        finally:
            api.delete(f"/v1/sandboxes/{sid}")


@pytest.mark.parametrize(
    ("headers", "body", "params", "words"),
    [
        ({"Content-Type": "multipart/form-data; boundary=xyz"}, b"garbage", {}, "multipart"),
        (
            {"Content-Type": "multipart/form-data; boundary=xyz"},
            b"--xyz\r\nContent-Disposition: form-data;",
            {},
            "multipart",
        ),
        ({"Content-Type": "multipart/form-data"}, b"", {}, "boundary"),
        (
            {"Content-Type": "multipart/form-data; boundary=xyz"},
            b"--xyz\r\n" + b"X-Many: hhhhhhhhhhhhhhhhhhhhhhhh\r\n" * 2000 + b"\r\nbody\r\n--xyz--\r\n",
            {},
            "header",
        ),
        ({"Content-Type": "application/octet-stream"}, b"x", {}, "path"),
        ({"Content-Type": "text/plain"}, b"x", {"path": "a"}, "content type"),
        (
            {"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
            b"not gzip",
            {"path": "a"},
            "gzip",
        ),
        (
            {"Content-Type": "application/octet-stream", "Content-Encoding": "br"},
            b"x",
            {"path": "a"},
            "Encoding",
        ),
    ],
)
def test_malformed_uploads_are_400(
    http: httpx.Client, headers: dict[str, str], body: bytes, params: dict[str, str], words: str
) -> None:
    r = http.post("/files", params=params, content=body, headers=headers)
    assert r.status_code == 400, r.text
    assert words in r.json()["message"]


def test_same_path_twice_in_one_upload(http: httpx.Client) -> None:
    r = http.post("/files", files=[("file", ("twice", b"1")), ("file", ("./twice", b"2"))])
    assert r.status_code == 400 and "same path" in r.json()["message"]


def test_wrong_token(e2b_env: Server, sbx: Sandbox) -> None:
    wrong = _sdk_for(e2b_env, sbx.sandbox_id, "wrong")
    with pytest.raises(AuthenticationException):
        wrong.files.read("x")
    with pytest.raises(AuthenticationException):
        wrong.files.write("x", "y")
    with pytest.raises(AuthenticationException):
        wrong.files.list(".")
    assert not sbx.files.exists("x")
    # /health needs no token.
    r = httpx.get(f"{e2b_env.url}/health", headers={"E2b-Sandbox-Id": sbx.sandbox_id})
    assert r.status_code == 204


# --- signed URLs -----------------------------------------------------------------------------


def test_signed_urls(e2b_env: Server, sbx: Sandbox) -> None:
    # With E2B_SANDBOX_URL the URL names no sandbox; the `{port}-{id}` host form does.
    host = {"Host": f"49983-{sbx.sandbox_id}.localhost"}
    up = sbx.upload_url("signed/up.txt", use_signature_expiration=60)
    r = httpx.post(up, files={"file": ("ignored", b"signed upload")}, headers=host)
    assert r.status_code == 200, r.text
    assert r.json()[0]["path"] == "/home/user/signed/up.txt"
    down = sbx.download_url("signed/up.txt")
    assert httpx.get(down, headers=host).content == b"signed upload"
    as_root = sbx.download_url("/etc/shadow", user="root")
    assert httpx.get(as_root, headers=host).status_code == 200
    # A signature is for one path, one operation and one user; it may expire.
    for url, method in (
        (down.replace("up.txt", "other.txt"), "GET"),
        (down, "POST"),
        (as_root.replace("username=root", "username=user"), "GET"),
        (sbx.download_url("signed/up.txt", use_signature_expiration=-10), "GET"),
        (down.replace("signature=v1_", "signature=v1_x"), "GET"),
        (down.split("?")[0] + "?path=signed%2Fup.txt", "GET"),
    ):
        r = httpx.request(
            method, url, headers=host, files={"file": ("f", b"x")} if method == "POST" else None
        )
        assert r.status_code == 401, (url, method, r.text)
