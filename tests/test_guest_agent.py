"""The guest agent, run for real on the host in test mode and driven through GuestClient."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from cove.node.guest_client import GuestClient, GuestError, GuestUnavailable, Idle
from guest_harness import Agent, children_of, proc_stat, run, wait_gone


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    a = Agent(tmp_path_factory.mktemp("agent"))
    try:
        yield a
    finally:
        a.stop()


@pytest.fixture
def client(agent: Agent) -> GuestClient:
    return agent.client


async def collect(client: GuestClient, *args: Any, **kwargs: Any) -> tuple[bytes, bytes, dict[str, Any]]:
    out, err, end = bytearray(), bytearray(), {}
    async for kind, data in client.exec(*args, **kwargs):
        if kind == "stdout":
            out += data  # type: ignore[operator]
        elif kind == "stderr":
            err += data  # type: ignore[operator]
        else:
            end = data  # type: ignore[assignment]
    return bytes(out), bytes(err), end  # type: ignore[return-value]


def sh(client: GuestClient, *args: Any, **kwargs: Any) -> tuple[bytes, bytes, dict[str, Any]]:
    return run(collect(client, *args, **kwargs))


def error_of(coro: Coroutine[Any, Any, Any]) -> GuestError:
    with pytest.raises(GuestError) as info:
        run(coro)
    return info.value


# --- basics -------------------------------------------------------------------------------------


def test_ping(agent: Agent, client: GuestClient) -> None:
    reply = run(client.ping())
    assert reply["pid"] == agent.proc.pid
    assert reply["version"] == 1


def test_unreachable_agent_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(GuestUnavailable):
        run(GuestClient(str(tmp_path / "nothing.sock")).ping())


def test_invalid_requests(client: GuestClient) -> None:
    assert error_of(client.call("frobnicate")).code == "invalid"
    assert error_of(collect(client, "true", argv=["true"])).code == "invalid"
    assert error_of(collect(client, argv=[])).code == "invalid"
    assert error_of(client.call("stat", path="a\0b")).code == "invalid"
    err = error_of(client.call("list", path="/", depth=0))
    assert err.code == "invalid"
    assert "Traceback" not in err.message


def test_malformed_frames_get_an_invalid_reply(agent: Agent) -> None:
    from cove.guest import protocol

    for frame in (protocol.encode_frame(b"D", b"x"), protocol.encode_frame(b"J", b"{nope"), b"J\0\0\0\x02[]"):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(agent.socket)
            sock.sendall(frame)
            kind, payload = protocol.recv_frame(sock) or (b"", b"")
            reply = protocol.decode_json(payload)
            assert kind == b"J" and reply["ok"] is False and reply["error"]["code"] == "invalid", reply
            assert "Traceback" not in payload.decode()


# --- exec -------------------------------------------------------------------------------------


def test_exec_shell_string(client: GuestClient) -> None:
    out, err, end = sh(client, "echo out; echo err >&2; exit 3")
    assert (out, err) == (b"out\n", b"err\n")
    assert end == {"exit_code": 3, "timed_out": False}


def test_exec_argv_is_not_interpreted_by_a_shell(client: GuestClient) -> None:
    out, _, end = sh(client, argv=["printf", "%s|", "a b", "$HOME", ";"])
    assert out == b"a b|$HOME|;|"
    assert end["exit_code"] == 0


def test_exit_code_of_a_signal_death_is_128_plus_signal(client: GuestClient) -> None:
    assert sh(client, "kill -TERM $$")[2]["exit_code"] == 128 + signal.SIGTERM


def test_command_not_found_is_127(client: GuestClient) -> None:
    _, err, end = sh(client, argv=["cove-no-such-command", "x"])
    assert end["exit_code"] == 127
    assert b"cove-no-such-command: command not found" in err
    _, err, end = sh(client, "cove-no-such-command")
    assert end["exit_code"] == 127
    assert b"not found" in err
    assert sh(client, argv=["/etc/passwd"])[2]["exit_code"] == 126  # not executable


def test_output_streams_while_the_command_runs(client: GuestClient) -> None:
    async def go() -> tuple[float, float]:
        start = time.monotonic()
        first = exit_at = 0.0
        async for kind, data in client.exec("echo first; sleep 0.8; echo second"):
            if kind == "stdout" and not first:
                assert data == b"first\n"
                first = time.monotonic() - start
            elif kind == "exit":
                exit_at = time.monotonic() - start
        return first, exit_at

    first, exit_at = run(go())
    assert 0 < first < 0.5
    assert exit_at - first >= 0.6


def test_stdin_is_forwarded_and_closed(client: GuestClient) -> None:
    async def slow_input() -> AsyncIterator[bytes]:
        for i in range(3):
            yield f"line {i}\n".encode()
            await asyncio.sleep(0.05)

    out, _, end = sh(client, "cat; echo eof", stdin=slow_input())
    assert out == b"line 0\nline 1\nline 2\neof\n"
    assert end["exit_code"] == 0
    big = os.urandom(3 * 1024 * 1024)
    out, _, _ = sh(client, "wc -c", stdin=big)
    assert out.strip() == str(len(big)).encode()
    # Without stdin the command reads /dev/null: cat ends at once instead of waiting.
    out, _, end = sh(client, "cat; echo done", timeout=5)
    assert (out, end["timed_out"]) == (b"done\n", False)


def test_stdin_the_command_does_not_read(client: GuestClient) -> None:
    out, _, end = sh(client, "echo ignored", stdin=os.urandom(8 * 1024 * 1024))
    assert out == b"ignored\n"
    assert end["exit_code"] == 0


def test_timeout_kills_the_whole_process_group(client: GuestClient) -> None:
    started = time.monotonic()
    out, _, end = sh(client, "sleep 30 & echo $!; sleep 30", timeout=0.5)
    assert time.monotonic() - started < 5
    assert end == {"exit_code": 128 + signal.SIGKILL, "timed_out": True}
    background = int(out.split()[0])
    assert wait_gone(background), "the background child survived the timeout"


def test_client_disconnect_kills_the_command(client: GuestClient) -> None:
    async def go() -> list[int]:
        events = client.exec("sleep 30 & echo $! $$; wait")
        async for kind, data in events:
            assert kind == "stdout"
            pids = [int(p) for p in data.split()]  # type: ignore[union-attr]
            break
        await events.aclose()  # type: ignore[attr-defined]
        return pids

    for pid in run(go()):
        assert wait_gone(pid), f"process {pid} survived the disconnect"


def test_env(client: GuestClient) -> None:
    out, _, _ = sh(client, "env", env={"SHADOWED": "request", "EXTRA": "x y", "LANG": None})
    env = dict(line.split("=", 1) for line in out.decode().splitlines())
    assert env["PATH"] == "/opt/cove/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert (env["HOME"], env["USER"], env["LOGNAME"], env["SHELL"]) == ("/root", "root", "root", "/bin/bash")
    assert env["FROM_CONFIG"] == "config"
    assert env["SHADOWED"] == "request"
    assert env["EXTRA"] == "x y"
    assert "LANG" not in env  # null unsets
    assert "TERM" not in env
    assert not [k for k in env if k.startswith("COVE_")]
    assert "HOST_ONLY" not in env  # nothing leaks from the agent's own environment
    assert sh(client, "echo $LANG")[0] == b"C.UTF-8\n"


def test_cwd(agent: Agent, client: GuestClient) -> None:
    assert sh(client, "pwd")[0].decode().strip() == str(agent.work)  # the config's workdir
    assert sh(client, "pwd", cwd="/tmp")[0] == b"/tmp\n"
    assert sh(client, "pwd", cwd=".")[0] == b"/root\n"  # relative: against the user's home
    err = error_of(collect(client, "pwd", cwd=str(agent.root / "missing")))
    assert err.code == "not_found"
    assert "working directory does not exist" in err.message
    err = error_of(collect(client, "cat", cwd=str(agent.root / "missing"), stdin=os.urandom(8 << 20)))
    assert err.code == "not_found"
    # Another user starts in its own home; nobody's (/nonexistent) does not exist.
    assert error_of(collect(client, "pwd", user="nobody")).code == "not_found"


def test_a_refused_exec_leaves_no_descriptor_in_a_kept_handler(agent: Agent) -> None:
    """A command refused before it starts (a missing cwd) must close its pipes: a kept connection's
    handler serves operation after operation and would pile them up."""

    async def go() -> tuple[int, int, set[str]]:
        client = GuestClient(agent.client.socket_path, idle=Idle())  # one kept connection, one handler
        handlers: set[str] = set()

        async def open_fds() -> int:
            out, _, _ = await collect(client, "echo $PPID; ls /proc/$PPID/fd | wc -l")
            handler, count = out.split()
            handlers.add(handler.decode())
            return int(count)

        before = await open_fds()
        for _ in range(10):
            with pytest.raises(GuestError):
                await collect(client, "true", cwd=str(agent.root / "missing"))
        return before, await open_fds(), handlers

    before, after, handlers = run(go())
    assert len(handlers) == 1, "the operations did not share one handler: the test proves nothing"
    # Each refused exec left 2-3 pipe ends before the fix (+20 or more here); the handler may hold
    # fewer at the end than in its first operation (a descriptor of its start closed meanwhile).
    assert after <= before, f"{after - before} descriptors piled up in the handler"


def test_exec_as_another_user(client: GuestClient) -> None:
    out, _, end = sh(client, "id -u; id -g; echo $HOME $USER", user="nobody", cwd="/")
    assert out == b"65534\n65534\n/nonexistent nobody\n"
    assert end["exit_code"] == 0
    assert sh(client, "id -u", user=65534, cwd="/")[0] == b"65534\n"
    assert error_of(collect(client, "true", user="cove-no-such-user")).code == "invalid"


def test_concurrent_execs(client: GuestClient) -> None:
    async def go() -> list[tuple[bytes, bytes, dict[str, Any]]]:
        return await asyncio.gather(*(collect(client, f"sleep 0.3; echo {i}") for i in range(20)))

    started = time.monotonic()
    results = run(go())
    assert time.monotonic() - started < 3  # 20 x 0.3 s would be 6 s if they ran one by one
    assert [r[0] for r in results] == [f"{i}\n".encode() for i in range(20)]
    assert all(r[2]["exit_code"] == 0 for r in results)


def test_a_taken_spare_handler_is_replaced(tmp_path: Path) -> None:
    """Pid 1 forks the next spare a little after one is taken (or at once for a waiting connection,
    as above): the handler that served leaves, and a new process waits for the next connection.
    An agent of its own: the shared one may still have other tests' handlers."""
    agent = Agent(tmp_path)
    try:

        def the_spare(other_than: int = 0) -> int:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                kids = children_of(agent.proc.pid)
                if len(kids) == 1 and kids[0][0] != other_than:
                    return kids[0][0]
                time.sleep(0.05)
            raise AssertionError(f"no single spare handler: {children_of(agent.proc.pid)}")

        first = the_spare()
        out, _, _ = sh(agent.client, "echo $PPID")
        assert int(out) == first, "the spare that waited serves the connection"
        assert wait_gone(first, timeout=Idle.EXPIRY + 6), "the handler exits once its kept connection expires"
        second = the_spare(other_than=first)
        out, _, _ = sh(agent.client, "echo $PPID")
        assert int(out) == second, "and its replacement the next one"
    finally:
        agent.stop()


def test_orphans_are_reaped(agent: Agent, client: GuestClient) -> None:
    out, _, end = sh(client, "for i in 1 2 3 4 5 6 7 8; do (sleep 2 &); done; echo started")
    assert (out, end["exit_code"]) == (b"started\n", 0)
    # The orphaned sleeps were re-parented to the agent (pid 1 in a sandbox, subreaper here)...
    orphans = [pid for pid, comm, _ in children_of(agent.proc.pid) if comm == "sleep"]
    assert len(orphans) == 8
    # ...which reaps them when they end: no zombies pile up.
    for pid in orphans:
        assert wait_gone(pid), f"orphan {pid} was not reaped: {proc_stat(pid)}"
    assert not [c for c in children_of(agent.proc.pid) if c[2] == "Z"]


# --- files ------------------------------------------------------------------------------------


def test_write_read_stat(agent: Agent, client: GuestClient) -> None:
    path = str(agent.root / "files" / "deep" / "er" / "a.txt")
    reply = run(client.write(path, [b"hello ", b"world"], mode=0o640))
    entry = reply["entry"]
    assert (entry["path"], entry["name"], entry["type"], entry["size"]) == (path, "a.txt", "file", 11)
    assert (entry["mode"], entry["permissions"], entry["owner"], entry["group"]) == (
        0o640,
        "-rw-r-----",
        "root",
        "root",
    )
    assert Path(path).read_bytes() == b"hello world"

    async def read_all(p: str) -> bytes:
        return b"".join([chunk async for chunk in client.read(p)])

    assert run(read_all(path)) == b"hello world"
    assert run(client.call("stat", path=path))["entry"] == entry
    # Overwriting keeps the mode; an empty upload makes an empty file.
    assert run(client.write(path, b""))["entry"]["mode"] == 0o640
    assert run(read_all(path)) == b""


def test_read_errors(agent: Agent, client: GuestClient) -> None:
    async def first_chunk(p: str) -> bytes:
        async for chunk in client.read(p):
            return chunk
        return b""

    assert error_of(first_chunk(str(agent.root / "missing"))).code == "not_found"
    assert error_of(first_chunk(str(agent.root))).code == "is_a_directory"
    err = error_of(first_chunk("/etc/passwd/x"))
    assert err.code == "not_a_directory"


def test_relative_paths_resolve_against_home(client: GuestClient) -> None:
    assert run(client.call("stat", path="."))["entry"]["path"] == "/root"
    assert run(client.call("stat", path="../etc/./passwd"))["entry"]["path"] == "/etc/passwd"


def test_large_file_round_trip(agent: Agent, client: GuestClient) -> None:
    data = os.urandom(20 * 1024 * 1024)
    path = str(agent.root / "big.bin")

    async def upload() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 1024 * 1024):
            yield data[i : i + 1024 * 1024]

    async def go() -> tuple[list[int], str]:
        reply = await client.write(path, upload())
        assert reply["entry"]["size"] == len(data)
        digest, sizes = hashlib.sha256(), []
        async for chunk in client.read(path):
            sizes.append(len(chunk))
            digest.update(chunk)
        return sizes, digest.hexdigest()

    sizes, digest = run(go())
    assert digest == hashlib.sha256(data).hexdigest()
    assert len(sizes) >= 20 * 16 and max(sizes) <= 64 * 1024


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if ".cove-" in p.name]


def test_aborted_write_leaves_nothing(agent: Agent, client: GuestClient) -> None:
    directory = agent.root / "aborted"
    directory.mkdir()

    async def failing() -> AsyncIterator[bytes]:
        yield b"x" * 100_000
        await asyncio.sleep(0.05)
        raise RuntimeError("upload interrupted")

    with pytest.raises(RuntimeError, match="upload interrupted"):
        run(client.write(str(directory / "f.bin"), failing()))
    end = time.monotonic() + 3
    while (leftovers(directory) or (directory / "f.bin").exists()) and time.monotonic() < end:
        time.sleep(0.02)
    assert list(directory.iterdir()) == []


def test_write_errors(agent: Agent, client: GuestClient) -> None:
    directory = agent.root / "werr"
    (directory / "sub").mkdir(parents=True)
    (directory / "file").write_text("x")
    # A big upload refused up front: the error reply must not be lost while we are still sending.
    assert error_of(client.write(str(directory / "sub"), [os.urandom(8 << 20)])).code == "is_a_directory"
    assert error_of(client.write(str(directory / "file" / "x"), [b"data"])).code == "not_a_directory"
    assert error_of(client.write(str(directory / "m"), b"", mode=0o10000)).code == "invalid"
    assert leftovers(directory) == [] and leftovers(directory / "sub") == []


def test_xattrs(agent: Agent, client: GuestClient) -> None:
    path = str(agent.root / "xattrs" / "f.txt")
    meta = {"user.e2b.owner": "alice", "user.e2b.note": "ünïcode ok"}
    entry = run(client.write(path, b"x", xattrs=meta))["entry"]
    assert entry["xattrs"] == meta
    assert os.getxattr(path, "user.e2b.owner") == b"alice"
    # Only asked-for entries carry them; stat, list and rename can ask.
    assert "xattrs" not in run(client.call("stat", path=path))["entry"]
    assert run(client.call("stat", path=path, xattrs=True))["entry"]["xattrs"] == meta
    listed = run(client.call("list", path=str(agent.root / "xattrs"), xattrs=True))["entries"]
    assert [e["xattrs"] for e in listed] == [meta]
    moved = str(agent.root / "xattrs" / "g.txt")
    assert run(client.call("rename", src=path, dst=moved, xattrs=True))["entry"]["xattrs"] == meta
    # An upload replaces the file, and with it the whole set.
    assert run(client.write(moved, b"y", xattrs={"user.e2b.k": "v"}))["entry"]["xattrs"] == {
        "user.e2b.k": "v"
    }
    assert run(client.write(moved, b"z"))["entry"].get("xattrs") is None
    assert run(client.call("stat", path=moved, xattrs=True))["entry"]["xattrs"] == {}
    # Only the user namespace; a bad name leaves nothing behind.
    for bad in ({"trusted.x": "1"}, {"user.": "1"}, {"user.x": 1}, {"user." + "n" * 300: "1"}):
        assert error_of(client.write(moved, b"w", xattrs=bad)).code == "invalid"  # type: ignore[arg-type]
    assert Path(moved).read_bytes() == b"z"


def test_write_through_a_symlink(agent: Agent, client: GuestClient) -> None:
    directory = agent.root / "wlink"
    directory.mkdir()
    (directory / "target").write_text("old")
    (directory / "link").symlink_to("target")
    run(client.write(str(directory / "link"), [b"new"]))
    assert (directory / "link").is_symlink()
    assert (directory / "target").read_text() == "new"


def test_mkdir(agent: Agent, client: GuestClient) -> None:
    path = agent.root / "mk" / "a" / "b"
    reply = run(client.call("mkdir", path=str(path)))
    assert reply["created"] is True and reply["entry"]["type"] == "dir"
    assert path.is_dir()
    assert run(client.call("mkdir", path=str(path)))["created"] is False
    (path / "f").write_text("x")
    assert error_of(client.call("mkdir", path=str(path / "f"))).code == "exists"
    assert error_of(client.call("mkdir", path=str(path / "f" / "g"))).code == "not_a_directory"


def test_list(agent: Agent, client: GuestClient) -> None:
    top = agent.root / "ls"
    (top / "b" / "c" / "d").mkdir(parents=True)
    (top / "a.txt").write_text("aa")
    (top / "b" / "x").write_text("x")
    (top / "b" / "c" / "d" / "deep").write_text("deep")
    (top / "link").symlink_to("b")

    def names(depth: int) -> list[str]:
        entries = run(client.call("list", path=str(top), depth=depth))["entries"]
        return [str(Path(e["path"]).relative_to(top)) for e in entries]

    assert names(1) == ["a.txt", "b", "link"]
    assert names(2) == ["a.txt", "b", "b/c", "b/x", "link"]  # sorted by path; the symlink not followed
    assert len(names(4)) == 7
    assert error_of(client.call("list", path=str(top / "a.txt"))).code == "not_a_directory"
    assert error_of(client.call("list", path=str(top / "missing"))).code == "not_found"


def test_stat_does_not_follow_symlinks(agent: Agent, client: GuestClient) -> None:
    directory = agent.root / "st"
    directory.mkdir()
    (directory / "dangling").symlink_to("nowhere")
    entry = run(client.call("stat", path=str(directory / "dangling")))["entry"]
    assert (entry["type"], entry["symlink_target"]) == ("symlink", "nowhere")
    assert error_of(client.call("stat", path=str(directory / "nowhere"))).code == "not_found"


def test_remove(agent: Agent, client: GuestClient) -> None:
    directory = agent.root / "rm"
    (directory / "full" / "sub").mkdir(parents=True)
    (directory / "full" / "sub" / "f").write_text("x")
    (directory / "empty").mkdir()
    (directory / "file").write_text("x")
    (directory / "link").symlink_to(directory / "full")

    err = error_of(client.call("remove", path=str(directory / "full")))
    assert err.code == "not_empty"
    assert run(client.call("remove", path=str(directory / "link"))) == {"ok": True}
    assert (directory / "full" / "sub" / "f").exists()  # the symlink went, not what it points to
    run(client.call("remove", path=str(directory / "full"), recursive=True))
    run(client.call("remove", path=str(directory / "empty")))
    run(client.call("remove", path=str(directory / "file")))
    assert list(directory.iterdir()) == []
    assert error_of(client.call("remove", path=str(directory / "file"))).code == "not_found"


def test_rename(agent: Agent, client: GuestClient) -> None:
    directory = agent.root / "mv"
    directory.mkdir()
    (directory / "src").write_text("content")
    entry = run(client.call("rename", src=str(directory / "src"), dst=str(directory / "new" / "dir" / "dst")))
    assert entry["entry"]["path"] == str(directory / "new" / "dir" / "dst")
    assert (directory / "new" / "dir" / "dst").read_text() == "content"
    assert not (directory / "src").exists()
    err = error_of(client.call("rename", src=str(directory / "src"), dst=str(directory / "x")))
    assert err.code == "not_found"


# --- users ------------------------------------------------------------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user can reach (pytest's tmp dirs are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="cove-guest-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_file_ops_run_as_the_requested_user(client: GuestClient, shared_dir: Path) -> None:
    locked = shared_dir / "root-only"
    locked.mkdir(mode=0o755)
    open_dir = shared_dir / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)

    err = error_of(client.write(str(locked / "f"), [b"x"], user="nobody"))
    assert err.code == "permission_denied"
    assert list(locked.iterdir()) == []
    assert error_of(client.call("mkdir", path=str(locked / "d"), user="nobody")).code == "permission_denied"
    # As root the same write works; as nobody it works where nobody may write, owned by nobody.
    run(client.write(str(locked / "f"), [b"x"]))
    entry = run(client.write(str(open_dir / "g"), [b"y"], user="nobody"))["entry"]
    assert (entry["owner"], entry["group"]) == ("nobody", "nogroup")
    assert (open_dir / "g").stat().st_uid == 65534
    locked.chmod(0o700)
    assert error_of(client.call("list", path=str(locked), user="nobody")).code == "permission_denied"


def test_agent_not_running_as_root(shared_dir: Path) -> None:
    """Outside a sandbox, as an ordinary user: acting as yourself works, as anyone else is refused."""
    shared_dir.chmod(0o777)
    a = Agent(shared_dir, run_as=65534, default_user="nobody")
    try:
        client = a.client
        assert sh(client, "id -u", cwd="/")[0] == b"65534\n"
        assert run(client.write(str(shared_dir / "mine"), [b"x"]))["entry"]["owner"] == "nobody"
        assert error_of(collect(client, "id -u", user="root", cwd="/")).code == "permission_denied"
        assert error_of(client.call("stat", path="/", user="root")).code == "permission_denied"
        assert run(client.call("stat", path="/", user="nobody"))["entry"]["owner"] == "root"
    finally:
        a.stop()


def test_connection_drop_is_unavailable(agent: Agent, client: GuestClient) -> None:
    """The agent's handler dies mid-command: the client reports GuestUnavailable, not a result."""

    async def go() -> int:
        pgid = 0
        with pytest.raises(GuestUnavailable):
            async for kind, data in client.exec("echo $PPID $$; exec sleep 30"):
                if kind == "stdout":
                    handler, pgid = (int(p) for p in data.split())  # type: ignore[union-attr]
                    os.kill(handler, signal.SIGKILL)
        return pgid

    pgid = run(go())
    os.killpg(pgid, signal.SIGKILL)  # nobody was left to kill it: clean up ourselves


def test_os_errors_map_to_protocol_codes() -> None:
    import errno

    from cove.guest.errors import os_error

    cases = {
        errno.ENOENT: "not_found",
        errno.EEXIST: "exists",
        errno.EACCES: "permission_denied",
        errno.EPERM: "permission_denied",
        errno.EROFS: "permission_denied",
        errno.ENOTDIR: "not_a_directory",
        errno.EISDIR: "is_a_directory",
        errno.ENOTEMPTY: "not_empty",
        errno.ENOSPC: "too_large",
        errno.EIO: "internal",
    }
    for number, code in cases.items():
        err = os_error(OSError(number, os.strerror(number), "/some/path"))
        assert err.code == code
        assert err.message.endswith(": /some/path")
    assert (
        os_error(OSError(errno.EROFS, os.strerror(errno.EROFS), "/x")).message == "read-only file system: /x"
    )
    assert os_error(OSError(errno.EIO, os.strerror(errno.EIO))).message == os.strerror(errno.EIO)


def test_group_lists_are_cached_until_the_group_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user switch reuses getgrouplist()'s answer only while /etc/group is the same, unchanged file
    (a command that adds the user to a group is seen by the next exec)."""
    from cove.guest import users

    group = tmp_path / "group"
    group.write_text("users:x:100:\n")
    calls: list[tuple[str, int]] = []
    answers = iter([[100], [100, 27], [100, 27, 44]])

    def fake(name: str, gid: int) -> list[int]:
        calls.append((name, gid))
        return next(answers)

    monkeypatch.setattr(users, "GROUP_FILE", str(group))
    monkeypatch.setattr(users, "_GROUPS", {})
    monkeypatch.setattr(users.os, "getgrouplist", fake)
    who = users.User("alice", 1000, 100, "/home/alice", True)
    assert users.group_list(who) == [100]
    assert users.group_list(who) == [100]
    assert len(calls) == 1
    group.write_text("users:x:100:\nsudo:x:27:alice\n")  # changed in place: size and mtime
    assert users.group_list(who) == [100, 27]
    replacement = tmp_path / "group.new"
    replacement.write_text("users:x:100:\nsudo:x:27:alice\n")
    os.replace(replacement, group)  # same size, another file
    assert users.group_list(who) == [100, 27, 44]
    assert len(calls) == 3
