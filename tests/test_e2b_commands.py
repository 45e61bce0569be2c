"""envd's `process.Process` on cove: commands and terminals driven by the unmodified `e2b` SDK (sync
and async), plus the Connect protocol itself (JSON and binary codecs, streams, errors) over raw HTTP.

The SDK is configured only by the `e2b_env` fixture (E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY).
"""

from __future__ import annotations

import ast
import asyncio
import base64
import gzip
import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import e2b
import httpx
import pytest
from e2b import (
    AsyncSandbox,
    CommandExitException,
    InvalidArgumentException,
    NotFoundException,
    PtySize,
    Sandbox,
    TimeoutException,
)
from google.protobuf import descriptor_pb2

from conftest import Server
from cove.compat.e2b.proto import filesystem_pb2, process_pb2
from cove.controlplane.signing import Signer


def running_pids(sbx: Sandbox) -> set[int]:
    return {p.pid for p in sbx.commands.list()}


def wait_gone(sbx: Sandbox, pid: int, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while pid in running_pids(sbx):
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.05)


# --- commands, sync SDK ---------------------------------------------------------------------------


def test_run_foreground(sbx: Sandbox) -> None:
    r = sbx.commands.run("echo out; echo err >&2; whoami; pwd; echo $HOME")
    assert r.exit_code == 0
    assert r.stdout == "out\nuser\n/home/user\n/home/user\n"
    assert r.stderr == "err\n"
    assert r.error is None


def test_nonzero_exit_raises(sbx: Sandbox) -> None:
    with pytest.raises(CommandExitException) as info:
        sbx.commands.run("echo partial; echo bad >&2; exit 3")
    assert info.value.exit_code == 3
    assert info.value.stdout == "partial\n"
    assert info.value.stderr == "bad\n"
    assert info.value.error == "exit status 3"


def test_binary_and_large_output(sbx: Sandbox) -> None:
    r = sbx.commands.run("head -c 3000000 /dev/zero | tr '\\0' x; printf 'é'")
    assert len(r.stdout) == 3_000_001
    assert r.stdout.endswith("xé")


def test_slow_reader_misses_no_output(sbx: Sandbox) -> None:
    """A reader slower than the command holds the command back (as envd does) instead of losing the
    output beyond cove's kept window (8 MiB)."""
    h = sbx.commands.run("head -c 16000000 /dev/zero | tr '\\0' y; echo end", background=True)
    size = 0

    def slowly(chunk: str) -> None:
        nonlocal size
        size += len(chunk)
        time.sleep(0.01)

    r = h.wait(on_stdout=slowly)
    assert size == len(r.stdout) == 16_000_004
    assert r.stdout.endswith("yend\n")


def test_background_with_callbacks(sbx: Sandbox) -> None:
    h = sbx.commands.run("for i in 1 2 3; do echo o$i; echo e$i >&2; sleep 0.05; done", background=True)
    assert h.pid > 0
    out: list[str] = []
    err: list[str] = []
    r = h.wait(on_stdout=out.append, on_stderr=err.append)
    assert "".join(out) == "o1\no2\no3\n" == r.stdout
    assert "".join(err) == "e1\ne2\ne3\n" == r.stderr


def test_env_vars_and_cwd(sbx: Sandbox) -> None:
    r = sbx.commands.run('echo "$FOO|$BAR"; pwd', envs={"FOO": "foo value", "BAR": "b=2"}, cwd="/tmp")
    assert r.stdout == "foo value|b=2\n/tmp\n"
    with pytest.raises(InvalidArgumentException, match="does not exist"):
        sbx.commands.run("pwd", cwd="/no/such/dir")


def test_user(sbx: Sandbox) -> None:
    assert sbx.commands.run("whoami; echo $HOME; pwd", user="root").stdout == "root\n/root\n/root\n"
    assert sbx.commands.run("whoami; id -u", user="user").stdout == "user\n1000\n"
    # Permissions inside the sandbox apply to the acting user.
    with pytest.raises(CommandExitException):
        sbx.commands.run("touch /etc/cove-test", user="user")
    sbx.commands.run("touch /etc/cove-test", user="root")
    with pytest.raises(e2b.AuthenticationException, match="unknown user"):
        sbx.commands.run("true", user="nobody-here")  # type: ignore[arg-type]


def test_stdin(sbx: Sandbox) -> None:
    h = sbx.commands.run("cat; echo done", background=True, stdin=True)
    h.send_stdin("hello ")
    sbx.commands.send_stdin(h.pid, b"world\n")
    sbx.commands.stream_input(h.pid, ["a", "b", "c\n"])
    h.close_stdin()
    r = h.wait()
    assert r.stdout == "hello world\nabc\ndone\n"
    # Without stdin=True the command reads EOF and input is refused.
    h = sbx.commands.run("cat; sleep 5", background=True)
    with pytest.raises(e2b.SandboxException):
        h.send_stdin("x")
    h.kill()


def test_kill_and_list(sbx: Sandbox) -> None:
    a = sbx.commands.run("sleep 30", background=True, cwd="/tmp", envs={"K": "v"})
    b = sbx.commands.run("sleep 31", background=True)
    procs = {p.pid: p for p in sbx.commands.list()}
    assert {a.pid, b.pid} <= procs.keys()
    assert procs[a.pid].cmd == "/bin/bash"
    assert procs[a.pid].args == ["-l", "-c", "sleep 30"]
    assert procs[a.pid].cwd == "/tmp"
    assert procs[a.pid].envs == {"K": "v"}
    assert procs[b.pid].cwd is None

    assert a.kill() is True
    with pytest.raises(CommandExitException) as info:
        a.wait()
    assert info.value.exit_code == -1
    assert info.value.error == "signal: killed"
    wait_gone(sbx, a.pid)
    assert b.pid in running_pids(sbx)
    assert sbx.commands.kill(a.pid) is False  # already gone: not found
    assert sbx.commands.kill(b.pid) is True
    wait_gone(sbx, b.pid)


def test_exit_137_is_not_a_signal(sbx: Sandbox) -> None:
    with pytest.raises(CommandExitException) as info:
        sbx.commands.run("exit 137")
    assert info.value.exit_code == 137
    assert info.value.error == "exit status 137"


def test_connect_to_background_command(sbx: Sandbox) -> None:
    h = sbx.commands.run(
        "sleep 0.5; for i in 1 2 3; do echo line$i; sleep 0.2; done; exit 4", background=True
    )
    h.disconnect()
    again = sbx.commands.connect(h.pid)
    assert again.pid == h.pid
    with pytest.raises(CommandExitException) as info:
        again.wait()
    assert info.value.exit_code == 4
    assert "line3\n" in info.value.stdout
    with pytest.raises(NotFoundException):
        sbx.commands.connect(h.pid)  # it has exited


def test_timeout_kills_the_command(sbx: Sandbox) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutException):
        sbx.commands.run("echo started; sleep 30", timeout=1)
    assert time.monotonic() - started < 10
    # As in envd, the command's timeout is its lifetime: it is killed, not only disconnected.
    deadline = time.monotonic() + 10
    while any("sleep 30" in " ".join(p.args) for p in sbx.commands.list()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # timeout=0: no limit, the command runs on after the call.
    h = sbx.commands.run("sleep 2; echo late", background=True, timeout=0)
    assert h.wait().stdout == "late\n"


def test_unknown_pid(sbx: Sandbox) -> None:
    assert sbx.commands.kill(999_999) is False
    with pytest.raises(NotFoundException, match="999999"):
        sbx.commands.send_stdin(999_999, "x")
    with pytest.raises(NotFoundException):
        sbx.commands.connect(999_999)
    with pytest.raises(NotFoundException):
        sbx.commands.close_stdin(999_999)


def test_paused_sandbox_resumes_for_commands(e2b_env: Server, sandboxes: list[str]) -> None:
    sb = Sandbox.create(timeout=300, lifecycle={"on_timeout": "pause", "auto_resume": True})
    sandboxes.append(sb.sandbox_id)
    h = sb.commands.run("sleep 60", background=True)
    with e2b_env.client() as api:
        r = api.post(f"/v1/sandboxes/{sb.sandbox_id}/pause")
        assert r.status_code == 200 and r.json()["state"] == "paused", r.text
        assert sb.commands.run("echo back").stdout == "back\n"
        assert api.get(f"/v1/sandboxes/{sb.sandbox_id}").json()["state"] == "running"
    assert h.pid in running_pids(sb)


def test_sandbox_killed_during_a_command(sbx: Sandbox) -> None:
    cmd = sbx.commands.run("sleep 60", background=True)
    sbx.kill()
    with pytest.raises(e2b.SandboxException, match="sandbox was killed or reached its end of life"):
        cmd.wait()


# --- terminals ------------------------------------------------------------------------------------


def test_pty(sbx: Sandbox) -> None:
    t = sbx.pty.create(PtySize(rows=24, cols=80), envs={"FOO": "bar"})
    assert t.pid in running_pids(sbx)
    sbx.pty.resize(t.pid, PtySize(rows=40, cols=100))
    sbx.pty.send_stdin(t.pid, b"echo $FOO; stty size; tty\nexit 5\n")
    out: list[bytes] = []
    with pytest.raises(CommandExitException) as info:
        t.wait(on_pty=out.append)
    assert info.value.exit_code == 5
    text = b"".join(out).decode()
    assert "bar\r\n" in text
    assert "40 100\r\n" in text
    assert "/dev/pts/" in text


def read_until(handle: object, marker: bytes) -> bytes:
    """A terminal's output until `marker` appears (the stream stays open)."""
    seen = b""
    for _, _, pty in handle:  # type: ignore[attr-defined]
        seen += pty or b""
        if marker in seen:
            return seen
    raise AssertionError(f"the terminal ended before {marker!r}: {seen!r}")


def test_pty_kill_and_reconnect(sbx: Sandbox) -> None:
    t = sbx.pty.create(PtySize(rows=24, cols=80), envs={"FOO": "bar"})
    sbx.pty.send_stdin(t.pid, b"echo one-$FOO\n")
    read_until(t, b"one-bar")
    t.disconnect()
    again = sbx.pty.connect(t.pid)
    assert again.pid == t.pid
    sbx.pty.send_stdin(t.pid, b"echo two-$FOO\n")
    assert b"one-bar" not in read_until(again, b"two-bar")  # a reconnect streams from now on
    assert sbx.pty.kill(t.pid) is True
    with pytest.raises(CommandExitException) as info:
        again.wait()
    assert info.value.exit_code == -1
    wait_gone(sbx, t.pid)
    assert sbx.pty.kill(t.pid) is False


# --- async SDK ------------------------------------------------------------------------------------


def test_async_commands(e2b_env: Server, sandboxes: list[str]) -> None:
    async def main() -> None:
        sb = await AsyncSandbox.create(timeout=300)
        sandboxes.append(sb.sandbox_id)
        r = await sb.commands.run("echo $A; whoami", envs={"A": "1"}, user="root")
        assert r.stdout == "1\nroot\n"
        with pytest.raises(CommandExitException):
            await sb.commands.run("exit 2")

        out: list[str] = []
        h = await sb.commands.run(
            "echo a; sleep 0.2; echo b", background=True, on_stdout=out.append, on_stderr=out.append
        )
        assert (await h.wait()).stdout == "a\nb\n"
        assert "".join(out) == "a\nb\n"

        h = await sb.commands.run("cat", background=True, stdin=True)
        await h.send_stdin("x")
        async with sb.commands.stream_input(h.pid) as stream:
            await stream.send("y")
            await stream.send(b"z\n")
        await sb.commands.close_stdin(h.pid)
        assert (await h.wait()).stdout == "xyz\n"

        h = await sb.commands.run("sleep 30", background=True)
        assert h.pid in {p.pid for p in await sb.commands.list()}
        again = await sb.commands.connect(h.pid)
        assert await sb.commands.kill(h.pid) is True
        with pytest.raises(CommandExitException):
            await again.wait()

        with pytest.raises(TimeoutException):
            await sb.commands.run("sleep 30", timeout=0.5)

        data: list[bytes] = []
        t = await sb.pty.create(PtySize(rows=10, cols=50), on_data=data.append)
        await sb.pty.resize(t.pid, PtySize(rows=12, cols=60))
        await sb.pty.send_stdin(t.pid, b"stty size\nexit\n")
        assert (await t.wait()).exit_code == 0
        assert "12 60\r\n" in b"".join(data).decode()

    asyncio.run(main())


# --- the Connect protocol, raw --------------------------------------------------------------------


def envd_headers(server: Server, sandbox_id: str, token: str | None = "valid") -> dict[str, str]:
    headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "49983"}
    if token == "valid":
        token = Signer(Path(server.home) / "secret").token("e2b-envd", sandbox_id)
    if token is not None:
        headers["X-Access-Token"] = token
    return headers


def envelopes(body: bytes) -> list[tuple[int, bytes]]:
    out = []
    while body:
        flags, size = struct.unpack(">BI", body[:5])
        out.append((flags, body[5 : 5 + size]))
        body = body[5 + size :]
    return out


def envelope(data: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(data)) + data


@pytest.fixture
def raw(e2b_env: Server, sbx: Sandbox) -> Iterator[tuple[httpx.Client, str]]:
    with httpx.Client(base_url=e2b_env.url, timeout=30) as c:
        yield c, sbx.sandbox_id


def test_connect_json_and_proto(e2b_env: Server, raw: tuple[httpx.Client, str]) -> None:
    c, sid = raw
    h = envd_headers(e2b_env, sid)
    # Server stream, JSON: start, data, end, then the end-of-stream envelope.
    req = {"process": {"cmd": "/bin/sh", "args": ["-c", "printf hi; exit 2"]}, "stdin": False}
    r = c.post(
        "/process.Process/Start",
        content=envelope(json.dumps(req).encode()),
        headers={**h, "Content-Type": "application/connect+json"},
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/connect+json"
    frames = envelopes(r.content)
    events = [json.loads(data)["event"] for flags, data in frames if flags == 0]
    assert set(events[0]) == {"start"} and events[0]["start"]["pid"] > 0
    assert base64.b64decode(events[1]["data"]["stdout"]) == b"hi"
    assert events[-1]["end"] == {
        "exitCode": 2,
        "exited": True,
        "status": "exit status 2",
        "error": "exit status 2",
    }
    assert frames[-1] == (2, b"{}")

    # The same over the binary codec, with the proto field names in JSON's place.
    sreq = process_pb2.StartRequest(process=process_pb2.ProcessConfig(cmd="/bin/echo", args=["proto"]))
    r = c.post(
        "/process.Process/Start",
        content=envelope(sreq.SerializeToString()),
        headers={**h, "Content-Type": "application/connect+proto"},
    )
    assert r.headers["content-type"] == "application/connect+proto"
    msgs = [process_pb2.StartResponse.FromString(d) for f, d in envelopes(r.content) if f == 0]
    assert msgs[1].event.data.stdout == b"proto\n"
    assert msgs[-1].event.end.exit_code == 0

    # Unary, both codecs.
    r = c.post("/process.Process/List", content=b"{}", headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == {}  # nothing runs
    r = c.post("/process.Process/List", content=b"", headers={**h, "Content-Type": "application/proto"})
    assert r.status_code == 200 and process_pb2.ListResponse.FromString(r.content).processes == []

    # Unknown JSON fields are ignored; snake_case names are accepted.
    body = {"process": {"pid": 1}, "signal": "SIGNAL_SIGTERM", "future_field": 1}
    r = c.post("/process.Process/SendSignal", json=body, headers=h)
    assert r.status_code == 404 and r.json()["code"] == "not_found"


def test_connect_errors(e2b_env: Server, raw: tuple[httpx.Client, str]) -> None:
    c, sid = raw
    h = envd_headers(e2b_env, sid)
    js = {**h, "Content-Type": "application/json"}
    # Malformed bodies: invalid_argument, never a 500.
    for body in (b"{not json", b'{"process": {"pid": "x"}}', b"\xff\xfe", b"[]"):
        r = c.post("/process.Process/SendSignal", content=body, headers=js)
        assert r.status_code == 400, body
        assert r.json()["code"] == "invalid_argument"
    r = c.post(
        "/process.Process/SendSignal",
        content=b"\xff\xff\xff",
        headers={**h, "Content-Type": "application/proto"},
    )
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument"
    r = c.post(
        "/process.Process/Start",
        content=envelope(b"{broken"),
        headers={**h, "Content-Type": "application/connect+json"},
    )
    assert r.status_code == 200
    assert envelopes(r.content) == [(2, envelopes(r.content)[0][1])]
    assert json.loads(envelopes(r.content)[0][1])["error"]["code"] == "invalid_argument"
    r = c.post(
        "/process.Process/Start",
        content=b"\x00\x00",
        headers={**h, "Content-Type": "application/connect+json"},
    )
    assert json.loads(envelopes(r.content)[-1][1])["error"]["code"] == "invalid_argument"

    # A signal other than SIGKILL/SIGTERM, an empty selector.
    r = c.post("/process.Process/SendSignal", json={"process": {"pid": 1}}, headers=h)
    assert r.status_code == 400 and "signal" in r.json()["message"]
    r = c.post("/process.Process/CloseStdin", json={"process": {}}, headers=h)
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument"

    # Unknown pid and tag.
    r = c.post("/process.Process/Connect", content=envelope(b'{"process":{"tag":"nope"}}'),
               headers={**h, "Content-Type": "application/connect+json"})  # fmt: skip
    assert json.loads(envelopes(r.content)[-1][1])["error"] == {
        "code": "not_found",
        "message": "process with tag nope not found",
    }

    # Unknown method, wrong HTTP method, wrong content type.
    r = c.post("/process.Process/Nope", content=b"{}", headers=js)
    assert r.status_code == 404 and r.json()["code"] == "unimplemented"
    assert c.get("/process.Process/List", headers=h).status_code == 405
    r = c.post("/process.Process/List", content=b"{}", headers={**h, "Content-Type": "text/plain"})
    assert r.status_code == 415

    # Access: no token, a wrong token, another sandbox's token.
    for token in (None, "wrong", Signer(Path(e2b_env.home) / "secret").token("e2b-envd", "other")):
        r = c.post(
            "/process.Process/List",
            content=b"{}",
            headers={**envd_headers(e2b_env, sid, token), "Content-Type": "application/json"},
        )
        assert r.status_code == 401, token
        assert r.json()["code"] == "unauthenticated"
    r = c.post(
        "/process.Process/Start",
        content=envelope(b'{"process":{"cmd":"/bin/true"}}'),
        headers={**envd_headers(e2b_env, sid, None), "Content-Type": "application/connect+json"},
    )
    assert json.loads(envelopes(r.content)[-1][1])["error"]["code"] == "unauthenticated"


def test_connect_client_stream_proto_gzip(
    e2b_env: Server, raw: tuple[httpx.Client, str], sbx: Sandbox
) -> None:
    """StreamInput over the binary codec with gzip-compressed envelopes; a unary gzip body."""
    c, sid = raw
    h = envd_headers(e2b_env, sid)
    cmd = sbx.commands.run("cat", background=True, stdin=True)
    start = process_pb2.StreamInputRequest(
        start=process_pb2.StreamInputRequest.StartEvent(process=process_pb2.ProcessSelector(pid=cmd.pid))
    )
    body = envelope(start.SerializeToString())
    for piece in (b"ab", b"cd\n"):
        data = process_pb2.StreamInputRequest(
            data=process_pb2.StreamInputRequest.DataEvent(input=process_pb2.ProcessInput(stdin=piece))
        )
        body += envelope(gzip.compress(data.SerializeToString()), flags=1)
    keepalive = process_pb2.StreamInputRequest(keepalive=process_pb2.StreamInputRequest.KeepAlive())
    body += envelope(keepalive.SerializeToString())
    r = c.post(
        "/process.Process/StreamInput",
        content=iter([body[:7], body[7:]]),  # chunked, split inside an envelope
        headers={**h, "Content-Type": "application/connect+proto", "Connect-Content-Encoding": "gzip"},
    )
    assert r.status_code == 200
    assert envelopes(r.content) == [(0, b""), (2, b"{}")]
    close = process_pb2.CloseStdinRequest(process=process_pb2.ProcessSelector(pid=cmd.pid))
    r = c.post(
        "/process.Process/CloseStdin",
        content=gzip.compress(close.SerializeToString()),
        headers={**h, "Content-Type": "application/proto", "Content-Encoding": "gzip"},
    )
    assert r.status_code == 200, r.text
    assert cmd.wait().stdout == "abcd\n"
    # A stream that does not begin with its start event.
    r = c.post(
        "/process.Process/StreamInput",
        content=envelope(keepalive.SerializeToString()),
        headers={**h, "Content-Type": "application/connect+proto"},
    )
    assert json.loads(envelopes(r.content)[-1][1])["error"]["code"] == "invalid_argument"


def test_connect_keepalive_and_deadline(e2b_env: Server, raw: tuple[httpx.Client, str]) -> None:
    c, sid = raw
    h = {**envd_headers(e2b_env, sid), "Content-Type": "application/connect+json"}
    body = envelope(b'{"process":{"cmd":"/bin/sleep","args":["1.2"]}}')
    r = c.post("/process.Process/Start", content=body, headers={**h, "Keepalive-Ping-Interval": "0.3"})
    events = [json.loads(d)["event"] for f, d in envelopes(r.content) if f == 0]
    assert sum("keepalive" in e for e in events) >= 2
    assert events[-1]["end"] == {"exited": True, "status": "exit status 0"}  # exitCode 0 is the default

    long = envelope(b'{"process":{"cmd":"/bin/sleep","args":["20"]}}')
    started = time.monotonic()
    r = c.post("/process.Process/Start", content=long, headers={**h, "Connect-Timeout-Ms": "300"})
    assert time.monotonic() - started < 10
    assert json.loads(envelopes(r.content)[-1][1])["error"]["code"] == "deadline_exceeded"
    r = c.post("/process.Process/Start", content=body, headers={**h, "Connect-Timeout-Ms": "soon"})
    assert json.loads(envelopes(r.content)[-1][1])["error"]["code"] == "invalid_argument"


def test_tags(e2b_env: Server, raw: tuple[httpx.Client, str]) -> None:
    """A tag names a process as well as its pid (List shows it; Connect and SendSignal select by it)."""
    c, sid = raw
    h = envd_headers(e2b_env, sid)
    start = {"process": {"cmd": "/bin/sh", "args": ["-c", "sleep 30"], "cwd": "/tmp"}, "tag": "job-1"}
    with c.stream(
        "POST",
        "/process.Process/Start",
        content=envelope(json.dumps(start).encode()),
        headers={**h, "Content-Type": "application/connect+json"},
    ) as stream:
        chunks = stream.iter_bytes()
        first = json.loads(envelopes(next(chunks))[0][1])["event"]
        pid = first["start"]["pid"]
        listed = c.post("/process.Process/List", json={}, headers=h).json()["processes"]
        assert {"config": {"cmd": "/bin/sh", "args": ["-c", "sleep 30"], "cwd": "/tmp"}, "pid": pid,
                "tag": "job-1"} in listed  # fmt: skip
        r = c.post("/process.Process/SendSignal", json={"process": {"tag": "job-1"}, "signal": 15}, headers=h)
        assert r.status_code == 200, r.text
        rest = b"".join(chunks)
    end = [json.loads(d)["event"] for f, d in envelopes(rest) if f == 0][-1]["end"]
    assert end == {"exitCode": -1, "status": "signal: terminated", "error": "signal: terminated"}


def test_messages_match_the_pinned_sdk() -> None:
    """cove's .proto files describe the same messages (names, numbers, types) as the SDK's."""
    sdk = Path(e2b.__file__).parent / "envd"
    for ours, theirs in (
        (process_pb2, sdk / "process" / "process_pb.py"),
        (filesystem_pb2, sdk / "filesystem" / "filesystem_pb.py"),
    ):
        calls = [n for n in ast.walk(ast.parse(theirs.read_text())) if isinstance(n, ast.Call)]
        serialized = next(c.args[0].value for c in calls if getattr(c.func, "id", "") == "file_desc")
        expected = descriptor_pb2.FileDescriptorProto.FromString(serialized)
        actual = descriptor_pb2.FileDescriptorProto()
        ours.DESCRIPTOR.CopyToProto(actual)
        for fd in (expected, actual):
            fd.ClearField("name")
            fd.ClearField("options")
            _clear_json_names(fd.message_type)
        assert actual == expected, ours.__name__


def _clear_json_names(messages: object) -> None:
    for m in messages:  # type: ignore[attr-defined]
        for f in m.field:
            f.ClearField("json_name")
        _clear_json_names(m.nested_type)


@pytest.mark.parametrize("version", ["1.1", "2"])
def test_both_http_version_settings(
    e2b_env: Server, sandboxes: list[str], monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    # Over http:// the SDK speaks HTTP/1.1 whichever it is told; both settings must work end to end.
    monkeypatch.setenv("E2B_HTTP_VERSION", version)
    sb = Sandbox.create(timeout=120)
    sandboxes.append(sb.sandbox_id)
    assert sb.commands.run("echo $((6*7))").stdout == "42\n"
    sb.files.write("v.txt", version)
    assert sb.files.read("v.txt") == version
    handle = sb.commands.run("sleep 0.2; echo done", background=True)
    assert handle.wait().stdout == "done\n"
