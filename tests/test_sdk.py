"""The Python SDK: unit tests of the shared core (no server), then end-to-end tests against the real server."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypedDict

import httpx
import pytest

from cove.errors import (
    AuthError,
    CommandTimeout,
    Conflict,
    ConnectionFailed,
    CoveError,
    FileNotFound,
    InvalidArgument,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RateLimited,
    SandboxNotFound,
    SandboxUnavailable,
    ServerError,
    TooLarge,
    error_from_response,
)
from cove.sdk import AsyncSandbox, EntryInfo, ExecEvent, ExecResult, Sandbox, SandboxInfo, _core

# =============================================================================== unit: error mapping


def _err(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


@pytest.mark.parametrize(
    ("status", "code", "path", "cls"),
    [
        (401, "unauthorized", "/v1/sandboxes", AuthError),
        (403, "forbidden", "/v1/keys", AuthError),
        (403, "permission_denied", "/v1/sandboxes/sb1/files", PermissionDenied),
        (404, "sandbox_not_found", "/v1/sandboxes/sb1", SandboxNotFound),
        (404, "sandbox_not_found", "/v1/sandboxes/sb1/files", SandboxNotFound),
        (404, "not_found", "/v1/sandboxes/sb1/files", FileNotFound),
        (404, "not_found", "/v1/sandboxes/sb1/files/stat", FileNotFound),
        (404, "not_found", "/v1/sandboxes/sb1", SandboxNotFound),
        (404, "not_found", "/v1/keys/k1", NotFound),
        (400, "is_a_directory", "/v1/sandboxes/sb1/files", InvalidRequest),
        (422, "validation_error", "/v1/sandboxes", InvalidRequest),
        (409, "not_running", "/v1/sandboxes/sb1/exec", Conflict),
        (409, "exists", "/v1/sandboxes/sb1/files/mkdir", Conflict),
        (413, "too_large", "/v1/sandboxes/sb1/files", TooLarge),
        (429, "rate_limited", "/v1/sandboxes", RateLimited),
        (500, "internal", "/v1/sandboxes", ServerError),
        (502, "bad_gateway", "/v1/sandboxes", ServerError),
        (503, "guest_unavailable", "/v1/sandboxes/sb1/exec", SandboxUnavailable),
    ],
)
def test_error_mapping(status: int, code: str, path: str, cls: type[CoveError]) -> None:
    exc = error_from_response(status, _err(code, f"the {code} message"), path=path)
    assert type(exc) is cls
    assert exc.status == status
    assert exc.code == code
    assert exc.message == f"the {code} message"
    assert str(exc) == f"the {code} message"


def test_error_hierarchy() -> None:
    assert issubclass(SandboxNotFound, NotFound)
    assert issubclass(FileNotFound, NotFound)
    assert issubclass(SandboxUnavailable, ServerError)
    assert issubclass(PermissionDenied, AuthError)
    assert issubclass(CommandTimeout, CoveError)
    assert issubclass(InvalidArgument, InvalidRequest)
    assert issubclass(InvalidArgument, ValueError)


def test_error_non_json_body_names_the_problem() -> None:
    exc = error_from_response(502, b"<html><body>Bad Gateway from nginx</body></html>", path="/v1/sandboxes")
    assert type(exc) is ServerError
    assert exc.status == 502
    assert "502" in exc.message and "Bad Gateway" in exc.message and "/v1/sandboxes" in exc.message

    empty = error_from_response(503, b"")
    assert type(empty) is SandboxUnavailable
    assert "503 Service Unavailable" in empty.message


def test_error_fastapi_detail_shape() -> None:
    body = {"detail": [{"loc": ["body", "memory_mb"], "msg": "Input should be >= 16", "type": "x"}]}
    exc = error_from_response(422, json.dumps(body))
    assert isinstance(exc, InvalidRequest)
    assert exc.message == "memory_mb: Input should be >= 16"
    assert exc.code == "validation_error"


def test_error_from_decoded_json() -> None:
    exc = error_from_response(409, {"error": {"code": "conflict", "message": "sandbox is killed"}})
    assert isinstance(exc, Conflict) and exc.message == "sandbox is killed"


# ============================================================================ unit: core over MockTransport


def _mock(handler: Any) -> httpx.MockTransport:
    return httpx.MockTransport(handler)


def _sandbox_json(sid: str, **extra: Any) -> dict[str, Any]:
    base = {
        "id": sid,
        "template": "base",
        "state": "running",
        "runtime": "namespaces",
        "created_at": "2024-05-01T10:00:00Z",
        "expires_at": None,
        "timeout": 0,
        "metadata": {},
        "user": "user",
        "workdir": "/home/user",
        "limits": {"cpu": 1.0, "memory_mb": 512, "pids": None, "disk_mb": None},
        "end_reason": None,
    }
    base.update(extra)
    return base


def test_list_follows_next_cursor_and_sends_filters() -> None:
    seen: list[httpx.URL] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        cursor = request.url.params.get("cursor")
        if cursor is None:
            return httpx.Response(
                200, json={"items": [_sandbox_json("a"), _sandbox_json("b")], "next_cursor": "c1"}
            )
        if cursor == "c1":
            return httpx.Response(200, json={"items": [_sandbox_json("c")], "next_cursor": "c2"})
        return httpx.Response(200, json={"items": [], "next_cursor": None})

    items = Sandbox.list(
        state="running",
        metadata={"team": "a", "env": "x=y"},
        url="http://cove.test",
        transport=_mock(handler),
    )
    assert [i.id for i in items] == ["a", "b", "c"]
    assert len(seen) == 3
    assert seen[0].params.get_list("metadata") == ["team=a", "env=x=y"]
    assert seen[0].params.get("state") == "running"
    assert seen[1].params.get("cursor") == "c1"
    info = items[0]
    assert isinstance(info, SandboxInfo)
    assert info.created_at is not None and info.created_at.year == 2024 and info.created_at.tzinfo is not None
    assert info.limits.memory_mb == 512 and info.limits.pids is None


def test_auth_header_and_env_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COVE_URL", "http://from-env:1234/")
    monkeypatch.setenv("COVE_API_KEY", "env-key")
    config = _core.Config.resolve()
    assert config.url == "http://from-env:1234"
    assert config.api_key == "env-key"
    assert _core.Config.resolve(url="http://x", api_key="k").api_key == "k"
    monkeypatch.delenv("COVE_URL")
    monkeypatch.delenv("COVE_API_KEY")
    assert _core.Config.resolve().url == "http://127.0.0.1:7770"

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer sekrit"
        assert request.url.raw_path == b"/v1/sandboxes/sb%2F1"
        return httpx.Response(200, json=_sandbox_json("sb/1"))

    sb = Sandbox.connect("sb/1", url="http://cove.test", api_key="sekrit", transport=_mock(handler))
    assert sb.id == "sb/1"
    sb.close()


def test_missing_key_hint() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert "authorization" not in request.headers
        return httpx.Response(401, content=_err("unauthorized", "missing API key"))

    with pytest.raises(AuthError, match="COVE_API_KEY"):
        Sandbox.list(url="http://cove.test", api_key="", transport=_mock(handler))


def test_exec_timeout_and_nonzero_exit_core() -> None:
    results = iter(
        [
            {"stdout": "", "stderr": "boom\n", "exit_code": 3, "timed_out": False, "duration_ms": 1.5},
            {"stdout": "partial\n", "stderr": "", "exit_code": -9, "timed_out": True, "duration_ms": 1000.0},
        ]
    )

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body in ({"cmd": "false"}, {"argv": ["sleep", "10"], "timeout": 1})
        return httpx.Response(200, json=next(results))

    sb = Sandbox("sb1", url="http://cove.test", transport=_mock(handler))
    r = sb.exec("false")
    assert r == ExecResult(stdout="", stderr="boom\n", exit_code=3, timed_out=False, duration_ms=1.5)
    assert not r.ok
    with pytest.raises(CommandTimeout) as info:
        sb.exec(["sleep", "10"], timeout=1)
    assert info.value.stdout == "partial\n"
    assert info.value.duration_ms == 1000.0
    sb.close()


def test_exec_stream_parsing_and_error_event() -> None:
    lines = [
        {"type": "stdout", "data": "a"},
        {"type": "stderr", "data": "b"},
        {"type": "stdout", "data": "c"},
        {"type": "exit", "exit_code": 0, "timed_out": False, "duration_ms": 2.0},
    ]
    body = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/sandboxes/sb1/exec/stream"
        if b"fail" in request.content:
            return httpx.Response(
                200,
                content=b'{"type":"stdout","data":"x"}\n{"type":"error","code":"guest_unavailable","message":"agent died"}\n',
            )
        return httpx.Response(200, content=body)

    sb = Sandbox("sb1", url="http://cove.test", transport=_mock(handler))
    r = sb.exec(
        "x", on_stdout=lambda d: calls.append("out:" + d), on_stderr=lambda d: calls.append("err:" + d)
    )
    assert calls == ["out:a", "err:b", "out:c"]
    assert r.stdout == "ac" and r.stderr == "b" and r.exit_code == 0
    events = list(sb.exec_stream("x"))
    assert events[-1] == ExecEvent(type="exit", exit_code=0, duration_ms=2.0)
    with pytest.raises(SandboxUnavailable, match="agent died"):
        sb.exec("fail", on_stdout=lambda d: None)
    sb.close()


def test_connection_refused_is_readable() -> None:
    with pytest.raises(ConnectionFailed, match="is the cove server running"):
        Sandbox.list(url="http://127.0.0.1:1", api_key="k")


def test_invalid_arguments_fail_before_any_request() -> None:
    def handler(request: httpx.Request) -> httpx.Response:  # pragma: no cover - must not be called
        raise AssertionError("no request expected")

    sb = Sandbox("sb1", url="http://cove.test", transport=_mock(handler))
    with pytest.raises(InvalidArgument):
        sb.exec([])
    with pytest.raises(InvalidArgument):
        sb.files.read("a", format="json")  # type: ignore[call-overload]
    with pytest.raises(InvalidArgument):
        sb.files.write("a", 12345)
    sb.close()


def test_async_core_over_mock_transport() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/v1/sandboxes":
            assert json.loads(request.content)["metadata"] == {"k": "v"}
            return httpx.Response(201, json=_sandbox_json("sbA", metadata={"k": "v"}))
        if request.method == "DELETE":
            return httpx.Response(204)
        if request.url.path.endswith("/files/stat"):
            return httpx.Response(404, content=_err("not_found", "no such file: /nope"))
        raise AssertionError(request)

    async def main() -> None:
        async with AsyncSandbox.create(
            metadata={"k": "v"}, url="http://cove.test", transport=_mock(handler)
        ) as sb:
            assert sb.id == "sbA"
            assert await sb.files.exists("/nope") is False
            with pytest.raises(FileNotFound, match="no such file"):
                await sb.files.stat("/nope")

    asyncio.run(main())


def test_sandbox_construction_is_cheap() -> None:
    sb = Sandbox("sb1", url="http://cove.test")
    assert sb._http._client is None  # no client until the first request
    sb.close()


# ==================================================================================== end to end


class Conn(TypedDict):
    url: str
    api_key: str


@pytest.fixture
def conn(server: Any) -> Conn:
    return {"url": server.url, "api_key": server.api_key}


def _label() -> str:
    return uuid.uuid4().hex[:12]


def test_create_exec_output(conn: Conn) -> None:
    with Sandbox.create(template="base", env={"A": "1"}, timeout=120, metadata={"k": "v"}, **conn) as sb:
        r = sb.exec("python3 -c 'print(6*7)'")
        assert r.stdout == "42\n"
        assert r.exit_code == 0 and not r.timed_out and r.ok
        assert sb.exec("echo $A").stdout == "1\n"
        assert sb.exec(["printf", "%s|", "a b", "c"]).stdout == "a b|c|"
        assert sb.exec("echo $B; pwd", env={"B": "2"}, cwd="/tmp").stdout == "2\n/tmp\n"
        assert sb.exec("cat", stdin="from stdin").stdout == "from stdin"
        info = sb.info()
        assert info.id == sb.id and info.state == "running" and info.metadata == {"k": "v"}
        assert info.timeout == 120 and info.expires_at is not None
    assert Sandbox.connect(sb.id, **conn).info().state == "killed"


def test_exec_nonzero_exit_is_a_result(conn: Conn) -> None:
    with Sandbox.create(**conn) as sb:
        r = sb.exec("echo out; echo err >&2; exit 7")
        assert (r.stdout, r.stderr, r.exit_code, r.timed_out) == ("out\n", "err\n", 7, False)
        assert not r.ok


def test_exec_timeout_raises(conn: Conn) -> None:
    with Sandbox.create(**conn) as sb:
        with pytest.raises(CommandTimeout) as info:
            sb.exec("echo started; sleep 30", timeout=1)
        assert info.value.stdout == "started\n"
        streamed = list(sb.exec_stream("sleep 30", timeout=0.5))
        assert streamed[-1].type == "exit" and streamed[-1].timed_out
        with pytest.raises(CommandTimeout):
            sb.exec("sleep 30", timeout=0.5, on_stdout=lambda d: None)


def test_exec_streaming_callbacks_in_order(conn: Conn) -> None:
    with Sandbox.create(**conn) as sb:
        seen: list[tuple[str, str]] = []
        script = "for i in 1 2 3; do echo out$i; sleep 0.1; echo err$i >&2; sleep 0.1; done"
        r = sb.exec(
            script, on_stdout=lambda d: seen.append(("out", d)), on_stderr=lambda d: seen.append(("err", d))
        )
        assert r.exit_code == 0
        assert "".join(d for k, d in seen if k == "out") == "out1\nout2\nout3\n"
        # the sleeps separate the writes, so the interleaving is preserved
        flat = [d.strip() for _, d in seen]
        assert flat == ["out1", "err1", "out2", "err2", "out3", "err3"]
        assert r.stdout == "out1\nout2\nout3\n" and r.stderr == "err1\nerr2\nerr3\n"

        events = list(sb.exec_stream(["sh", "-c", "echo a; exit 5"]))
        assert events[0] == ExecEvent(type="stdout", data="a\n")
        assert events[-1].type == "exit" and events[-1].exit_code == 5 and not events[-1].timed_out


def test_files_roundtrip(conn: Conn) -> None:
    with Sandbox.create(**conn) as sb:
        entry = sb.files.write("/home/user/a.txt", "héllo\n")
        assert isinstance(entry, EntryInfo) and entry.type == "file" and entry.size == len("héllo\n".encode())
        assert sb.files.read("/home/user/a.txt") == "héllo\n"
        assert sb.exec("cat /home/user/a.txt").stdout == "héllo\n"

        blob = bytes(range(256)) * 10
        sb.files.write("bin/blob", blob)  # relative: from the user's home; parents are created
        assert sb.files.read("/home/user/bin/blob", format="bytes") == blob
        assert sb.files.write("f.txt", io.BytesIO(b"from a file object")).size == 18
        assert sb.files.read("f.txt") == "from a file object"

        # 5 MiB, streamed both ways
        chunk = os.urandom(64 * 1024)
        total = 80 * len(chunk)

        def gen() -> Iterator[bytes]:
            for _ in range(80):
                yield chunk

        assert sb.files.write("big.bin", gen()).size == total
        received = 0
        pieces = 0
        for piece in sb.files.read("big.bin", format="stream"):
            received += len(piece)
            pieces += 1
        assert received == total and pieces > 1
        r = sb.exec("sha256sum big.bin")
        assert r.stdout.split()[0] == hashlib.sha256(chunk * 80).hexdigest()


def test_files_listing_and_management(conn: Conn) -> None:
    with Sandbox.create(**conn) as sb:
        d = sb.files.mkdir("/home/user/proj/sub")
        assert d.is_dir and d.path == "/home/user/proj/sub"
        sb.files.mkdir("/home/user/proj/sub")  # existing directory is fine
        sb.files.write("/home/user/proj/x.txt", "x")
        sb.files.write("/home/user/proj/sub/y.txt", "yy")

        names = sorted(e.name for e in sb.files.list("/home/user/proj"))
        assert names == ["sub", "x.txt"]
        deep = sorted(e.path for e in sb.files.list("/home/user/proj", depth=2))
        assert deep == ["/home/user/proj/sub", "/home/user/proj/sub/y.txt", "/home/user/proj/x.txt"]

        st = sb.files.stat("/home/user/proj/sub/y.txt")
        assert st.size == 2 and st.is_file and st.mtime is not None and st.owner == "user"
        assert sb.files.exists("/home/user/proj/x.txt")
        assert not sb.files.exists("/home/user/proj/nope")

        moved = sb.files.rename("/home/user/proj/x.txt", "/home/user/proj/sub/z.txt")
        assert moved.path == "/home/user/proj/sub/z.txt"
        assert not sb.files.exists("/home/user/proj/x.txt")
        assert sb.files.read("/home/user/proj/sub/z.txt") == "x"

        sb.files.remove("/home/user/proj/sub/z.txt")
        assert not sb.files.exists("/home/user/proj/sub/z.txt")
        with pytest.raises(Conflict):
            sb.files.remove("/home/user/proj")  # not empty
        sb.files.remove("/home/user/proj", recursive=True)
        assert not sb.files.exists("/home/user/proj")


def test_file_not_found(conn: Conn) -> None:
    with Sandbox.create(**conn) as sb:
        with pytest.raises(FileNotFound) as info:
            sb.files.read("/home/user/missing.txt")
        assert info.value.status == 404 and "missing.txt" in info.value.message
        with pytest.raises(FileNotFound):
            sb.files.read("/home/user/missing.txt", format="stream")
        with pytest.raises(FileNotFound):
            sb.files.stat("/home/user/missing.txt")
        with pytest.raises(FileNotFound):
            sb.files.remove("/home/user/missing.txt")


def test_sandbox_not_found(conn: Conn) -> None:
    with pytest.raises(SandboxNotFound) as info:
        Sandbox.connect("sb-does-not-exist", **conn)
    assert info.value.status == 404 and "sb-does-not-exist" in info.value.message
    ghost = Sandbox("sb-does-not-exist", **conn)
    with pytest.raises(SandboxNotFound):
        ghost.exec("true")
    with pytest.raises(SandboxNotFound):
        ghost.files.read("/etc/hostname")
    with pytest.raises(SandboxNotFound):
        ghost.kill()


def test_auth_error_with_wrong_key(server: Any) -> None:
    with pytest.raises(AuthError) as info:
        Sandbox.list(url=server.url, api_key="wrong-key")
    assert info.value.status == 401
    with pytest.raises(AuthError):
        Sandbox.create(url=server.url, api_key="wrong-key")


def test_invalid_limits(conn: Conn) -> None:
    with pytest.raises(InvalidRequest) as info:
        Sandbox.create(memory_mb=1, **conn)
    assert info.value.status == 422 and "memory_mb" in info.value.message


def test_list_filters_by_metadata_and_state(conn: Conn) -> None:
    label = _label()
    a = Sandbox.create(metadata={"suite": label, "role": "a"}, **conn)
    b = Sandbox.create(metadata={"suite": label, "role": "b"}, **conn)
    try:
        mine = Sandbox.list(metadata={"suite": label}, **conn)
        assert sorted(i.id for i in mine) == sorted([a.id, b.id])
        only_a = Sandbox.list(metadata={"suite": label, "role": "a"}, **conn)
        assert [i.id for i in only_a] == [a.id]
        b.kill()
        running = Sandbox.list(state="running", metadata={"suite": label}, **conn)
        assert [i.id for i in running] == [a.id]
        killed = Sandbox.list(state="killed", metadata={"suite": label}, **conn)
        assert [i.id for i in killed] == [b.id]
        both = Sandbox.list(state=["running", "killed"], metadata={"suite": label}, **conn)
        assert len(both) == 2
    finally:
        a.kill()
        Sandbox.kill_by_id(b.id, **conn)  # idempotent on a dead sandbox


def test_set_timeout_and_kill_by_id(conn: Conn) -> None:
    sb = Sandbox.create(timeout=60, **conn)
    try:
        info = sb.set_timeout(0)
        assert info.timeout == 0 and info.expires_at is None
        assert sb.set_timeout(600).expires_at is not None
    finally:
        Sandbox.kill_by_id(sb.id, **conn)
    assert Sandbox.connect(sb.id, **conn).info().state == "killed"
    with pytest.raises(Conflict):
        sb.exec("true")
    sb.close()


def test_async_main_paths(conn: Conn) -> None:
    async def main() -> None:
        label = _label()
        async with AsyncSandbox.create(metadata={"suite": label}, **conn) as sb:
            r = await sb.exec("python3 -c 'print(6*7)'")
            assert r.stdout == "42\n"
            assert (await sb.exec("exit 3")).exit_code == 3
            with pytest.raises(CommandTimeout):
                await sb.exec("sleep 30", timeout=0.5)

            got: list[str] = []

            async def on_err(data: str) -> None:
                got.append("err:" + data)

            r = await sb.exec(
                "echo a; sleep 0.1; echo b >&2", on_stdout=lambda d: got.append("out:" + d), on_stderr=on_err
            )
            assert got == ["out:a\n", "err:b\n"]
            events = [ev async for ev in sb.exec_stream("echo x; exit 2")]
            assert events[0].data == "x\n" and events[-1].exit_code == 2

            await sb.files.write("/home/user/t.txt", "text")
            assert await sb.files.read("/home/user/t.txt") == "text"

            async def agen() -> AsyncIterator[bytes]:
                for _ in range(4):
                    yield b"z" * 100_000

            assert (await sb.files.write("/home/user/z.bin", agen())).size == 400_000
            stream = await sb.files.read("/home/user/z.bin", format="stream")
            assert sum([len(c) async for c in stream]) == 400_000
            assert await sb.files.read("/home/user/z.bin", format="bytes") == b"z" * 400_000
            await sb.files.mkdir("/home/user/d")
            assert [e.name for e in await sb.files.list("/home/user/d")] == []
            assert await sb.files.exists("/home/user/d")
            await sb.files.rename("/home/user/t.txt", "/home/user/d/t.txt")
            assert (await sb.files.stat("/home/user/d/t.txt")).size == 4
            await sb.files.remove("/home/user/d", recursive=True)
            with pytest.raises(FileNotFound):
                await sb.files.read("/home/user/d/t.txt")

            listed = await AsyncSandbox.list(metadata={"suite": label}, **conn)
            assert [i.id for i in listed] == [sb.id]
            assert (await sb.info()).state == "running"
            other = await AsyncSandbox.connect(sb.id, **conn)
            assert (await other.exec("echo hi")).stdout == "hi\n"
            await other.close()
        assert (await AsyncSandbox.list(state="running", metadata={"suite": label}, **conn)) == []

        with pytest.raises(SandboxNotFound):
            await AsyncSandbox.connect("sb-does-not-exist", **conn)
        with pytest.raises(AuthError):
            await AsyncSandbox.list(url=conn["url"], api_key="wrong-key")

        sb2 = await AsyncSandbox.create(**conn)
        try:
            assert (await sb2.set_timeout(0)).timeout == 0
        finally:
            await AsyncSandbox.kill_by_id(sb2.id, **conn)
            await sb2.close()

    asyncio.run(main())


def test_pause_resume_and_auto_resume(server: Any) -> None:
    with Sandbox.create(url=server.url, api_key=server.api_key, auto_resume=False) as sb:
        assert sb.pause().state == "paused"
        with pytest.raises(Conflict):
            sb.exec("true")
        assert sb.resume().state == "running"
        assert sb.exec("echo ok").stdout == "ok\n"


def test_async_pause_resume(server: Any) -> None:
    async def main() -> None:
        async with AsyncSandbox.create(url=server.url, api_key=server.api_key) as sb:
            assert (await sb.pause()).state == "paused"
            assert (await sb.exec("echo woke")).stdout == "woke\n"  # auto-resumes
            assert (await sb.info()).state == "running"

    asyncio.run(main())


def test_snapshot_fork_hibernate(server: Any) -> None:
    conn = {"url": server.url, "api_key": server.api_key}
    with Sandbox.create(**conn) as sb:
        sb.files.write("/home/user/x.txt", "v1")
        snap = sb.snapshot("sdk-snap")
        assert snap.name == "sdk-snap" and snap.id in [s.id for s in Sandbox.list_snapshots(**conn)]
        with Sandbox.create(snapshot=snap.id, **conn) as restored:
            assert restored.files.read("/home/user/x.txt") == "v1"
        children = sb.fork(2, metadata={"branch": "b"})
        try:
            assert [c.info().metadata["branch"] for c in children] == ["b", "b"]
            assert all(c.files.read("/home/user/x.txt") == "v1" for c in children)
        finally:
            for child in children:
                child.kill()
        info = sb.hibernate()
        assert info.state == "hibernated" and info.hibernation is not None
        assert sb.files.read("/home/user/x.txt") == "v1"  # resumes
        Sandbox.delete_snapshot(snap.id, **conn)
        assert snap.id not in [s.id for s in Sandbox.list_snapshots(**conn)]
