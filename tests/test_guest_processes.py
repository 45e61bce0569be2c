"""Background processes, terminals and file watching of the guest agent, run for real on the host in
test mode (as in test_guest_agent.py) and driven through GuestClient."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from cove.node.guest_client import GuestClient, GuestError
from guest_harness import PYTHON, Agent, run

OUTPUT_LIMIT = 8 * 1024 * 1024  # agent.OUTPUT_LIMIT


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    a = Agent(tmp_path_factory.mktemp("agent"))
    try:
        yield a
    finally:
        a.stop()


class Spawner:
    """Spawns background processes and kills them all at the end of the test."""

    def __init__(self, client: GuestClient) -> None:
        self.client = client
        self.ids: list[str] = []

    def __call__(self, **fields: Any) -> dict[str, Any]:
        proc = run(self.client.spawn(**fields))
        self.ids.append(proc["id"])
        return proc

    def cleanup(self) -> None:
        async def kill_all() -> None:
            for proc_id in self.ids:
                with contextlib.suppress(GuestError):
                    await self.client.kill(proc_id)

        run(kill_all())


@pytest.fixture
def client(agent: Agent) -> GuestClient:
    return agent.client


@pytest.fixture
def spawn(client: GuestClient) -> Iterator[Spawner]:
    s = Spawner(client)
    try:
        yield s
    finally:
        s.cleanup()


async def attach_all(
    client: GuestClient, proc_id: str, offset: int | None = None, timeout: float = 15.0, block: bool = False
) -> tuple[dict[str, Any], bytes, bytes, dict[str, Any]]:
    """Attach until the process ends: (attached event, stdout, stderr, exit)."""
    attached: dict[str, Any] = {}
    out, err = bytearray(), bytearray()
    end: dict[str, Any] = {}

    async def go() -> None:
        nonlocal attached, end
        async for kind, data in client.attach(proc_id, offset, block=block):
            if kind == "attached":
                attached = data  # type: ignore[assignment]
            elif kind == "stdout":
                out.extend(data)  # type: ignore[arg-type]
            elif kind == "stderr":
                err.extend(data)  # type: ignore[arg-type]
            elif kind == "exit":
                end = data  # type: ignore[assignment]

    await asyncio.wait_for(go(), timeout)
    return attached, bytes(out), bytes(err), end


async def read_until(client: GuestClient, proc_id: str, needle: bytes, offset: int = 0) -> bytes:
    """Attach from `offset` and read (stdout and stderr) until `needle` shows up; then detach."""

    async def go() -> bytes:
        seen = bytearray()
        async for kind, data in client.attach(proc_id, offset):
            if kind in ("stdout", "stderr"):
                seen += data  # type: ignore[operator]
                if needle in seen:
                    return bytes(seen)
            elif kind == "exit":
                break
        raise AssertionError(f"{needle!r} not in output: {bytes(seen)[-2000:]!r}")

    return await asyncio.wait_for(go(), 10)


def error_of(coro: Coroutine[Any, Any, Any]) -> GuestError:
    with pytest.raises(GuestError) as info:
        run(coro)
    return info.value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- background processes -----------------------------------------------------------------------


def test_background_server_outlives_its_spawn_connection(
    agent: Agent, client: GuestClient, spawn: Spawner
) -> None:
    (agent.work / "hello.txt").write_text("served\n")
    port = free_port()
    argv = [PYTHON, "-m", "http.server", "--bind", "127.0.0.1", str(port)]
    proc = spawn(argv=argv, tag="web")
    assert isinstance(proc["pid"], int) and proc["pid"] > 0

    def fetch() -> bytes:
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/hello.txt", timeout=2) as resp:
                    return bytes(resp.read())
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    assert fetch() == b"served\n"  # the spawn connection is long closed
    listed = {p["id"]: p for p in run(client.processes())}
    entry = listed[proc["id"]]
    assert entry["running"] is True and entry["exit_code"] is None
    assert (entry["pid"], entry["tag"], entry["argv"], entry["cmd"], entry["pty"]) == (
        proc["pid"],
        "web",
        argv,
        None,
        None,
    )
    assert entry["started_at"] > 0 and entry["ended_at"] is None
    assert run(client.wait(proc["id"], 0.1)) == {"running": True, "exit_code": None}
    assert fetch() == b"served\n"  # still serving between calls
    # Its log (stderr) is kept and readable by attaching; detaching does not stop it.
    assert b"GET /hello.txt" in run(read_until(client, proc["id"], b"GET /hello.txt"))
    assert fetch() == b"served\n"
    run(client.signal(proc["id"], "SIGTERM"))
    assert run(client.wait(proc["id"], 5)) == {"running": False, "exit_code": 128 + signal.SIGTERM}
    entry = {p["id"]: p for p in run(client.processes())}[proc["id"]]
    assert entry["running"] is False and entry["exit_code"] == 128 + signal.SIGTERM
    assert entry["ended_at"] >= entry["started_at"]


def test_repl_through_stdin(client: GuestClient, spawn: Spawner) -> None:
    proc = spawn(argv=[PYTHON, "-I", "-u", "-i", "-q"], stdin=True)

    async def go() -> None:
        await client.input(proc["id"], b"x = 41\n")
        await client.input(proc["id"], b"print(x + 1)\n")
        await read_until(client, proc["id"], b"42\n")
        await client.input(proc["id"], b"print('second', x)\n")
        await read_until(client, proc["id"], b"second 41\n")
        await client.close_stdin(proc["id"])  # the REPL ends at end of input
        assert await client.wait(proc["id"], 5) == {"running": False, "exit_code": 0}
        with pytest.raises(GuestError) as info:
            await client.input(proc["id"], b"x\n")
        assert info.value.code == "conflict"

    run(go())


def test_reattach_gets_history_then_live_output(client: GuestClient, spawn: Spawner) -> None:
    proc = spawn(
        cmd='echo first; echo oops >&2; read line; echo "got $line"; sleep 0.2; echo last', stdin=True
    )
    run(read_until(client, proc["id"], b"oops"))  # output produced while nobody else is attached

    async def go() -> list[tuple[dict[str, Any], bytes, bytes, dict[str, Any]]]:
        # Two attach connections at once, both from the start.
        readers = [asyncio.create_task(attach_all(client, proc["id"], 0)) for _ in range(2)]
        await asyncio.sleep(0.2)
        await client.input(proc["id"], b"typed\n")
        return list(await asyncio.gather(*readers))

    for attached, out, err, end in run(go()):
        assert attached == {"event": "attached", "offset": 0, "truncated": False}
        assert out == b"first\ngot typed\nlast\n"
        assert err == b"oops\n"
        assert end == {"exit_code": 0, "end_offset": len(out) + len(err)}
    # After the exit, from an offset in the middle (offsets count stdout and stderr together).
    attached, out, err, end = run(attach_all(client, proc["id"], len(b"first\noops\n")))
    assert attached["offset"] == 11 and not attached["truncated"]
    assert (out, err, end["exit_code"]) == (b"got typed\nlast\n", b"", 0)
    assert run(attach_all(client, proc["id"], end["end_offset"]))[1:3] == (b"", b"")
    assert error_of(attach_all(client, proc["id"], end["end_offset"] + 1)).code == "invalid"


def test_output_beyond_the_buffer_is_dropped_from_the_front(client: GuestClient, spawn: Spawner) -> None:
    expected = subprocess.run(["seq", "1", "1500000"], capture_output=True, check=True).stdout
    assert len(expected) > OUTPUT_LIMIT
    proc = spawn(argv=["seq", "1", "1500000"])  # nobody attached: it must not block
    assert run(client.wait(proc["id"], 10)) == {"running": False, "exit_code": 0}
    attached, out, _, end = run(attach_all(client, proc["id"], 0))
    assert attached == {"event": "attached", "offset": len(expected) - OUTPUT_LIMIT, "truncated": True}
    assert end["end_offset"] == len(expected)
    assert out == expected[-OUTPUT_LIMIT:]


def test_signals_and_exit_codes(client: GuestClient, spawn: Spawner) -> None:
    async def go() -> None:
        procs = [await client.spawn(argv=["sleep", "30"]) for _ in range(3)]
        spawn.ids += [p["id"] for p in procs]
        await client.signal(procs[0]["id"], "SIGTERM")
        await client.signal(procs[1]["id"], int(signal.SIGINT))
        await client.kill(procs[2]["id"])
        codes = [(await client.wait(p["id"], 5))["exit_code"] for p in procs]
        assert codes == [128 + signal.SIGTERM, 128 + signal.SIGINT, 128 + signal.SIGKILL]
        with pytest.raises(GuestError) as info:
            await client.signal(procs[0]["id"], "SIGTERM")
        assert info.value.code == "conflict"

        # The whole process group gets the signal.
        group = await client.spawn(cmd="sleep 30 & sleep 30 & wait")
        spawn.ids.append(group["id"])
        await asyncio.sleep(0.2)
        await client.signal(group["id"], "SIGTERM")
        assert (await client.wait(group["id"], 5))["running"] is False

        with pytest.raises(GuestError) as info:
            await client.signal(group["id"], "SIGNOPE")
        assert info.value.code == "invalid"

        exited = await client.spawn(cmd="echo out; exit 3")
        assert await client.wait(exited["id"], 5) == {"running": False, "exit_code": 3}
        missing = await client.spawn(argv=["no-such-program-here"])
        _, out, err, end = await attach_all(client, missing["id"])
        assert (out, err, end["exit_code"]) == (b"", b"no-such-program-here: command not found\n", 127)

    run(go())


def test_wait_returns_at_its_timeout(client: GuestClient, spawn: Spawner) -> None:
    proc = spawn(argv=["sleep", "30"])
    started = time.monotonic()
    assert run(client.wait(proc["id"], 0.3)) == {"running": True, "exit_code": None}
    assert 0.3 <= time.monotonic() - started < 1.5
    assert run(client.wait(proc["id"], 0)) == {"running": True, "exit_code": None}


def test_wait_returns_once_the_output_is_all_in(client: GuestClient, spawn: Spawner) -> None:
    """A process that exits while one it started still writes to its output: `wait` answers after
    that output arrived (within the agent's grace for such writers), so what a reader attaches to
    next is final. It used to answer at the exit, and a reader then raced the last writes."""
    proc = spawn(cmd="(sleep 0.3; date +%s.%N) & echo early")
    assert run(client.wait(proc["id"], 30)) == {"running": False, "exit_code": 0}
    answered = time.time()
    _, stdout, _, end = run(attach_all(client, proc["id"]))
    early, written = stdout.decode().split()
    assert early == "early"
    assert float(written) <= answered, "wait answered before the process's last output was written"
    assert end == {"exit_code": 0, "end_offset": len(stdout)}


def test_held_spawn_waits_for_its_blocking_reader(client: GuestClient, spawn: Spawner) -> None:
    """`hold`: a reader that attaches (blocking) well after the spawn still gets every byte of an
    output larger than the agent keeps; without it, the front is gone by then."""
    cmd = "head -c 12000000 /dev/zero | tr '\\0' y; echo end"
    for hold in (True, False):
        proc = spawn(cmd=cmd, hold=hold)
        time.sleep(1.0)  # the reader is late
        attached, stdout, _, end = run(attach_all(client, proc["id"], 0, block=True))
        if hold:
            assert attached["truncated"] is False and len(stdout) == 12_000_004, attached
            assert end == {"exit_code": 0, "end_offset": 12_000_004}
        else:
            assert attached["truncated"] is True, "the unheld process should have outrun the buffer"


def test_spawn_errors(agent: Agent, client: GuestClient) -> None:
    assert error_of(client.spawn(cmd="true", cwd=str(agent.root / "missing"))).code == "not_found"
    assert error_of(client.spawn(cmd="true", user="no-such-user")).code == "invalid"
    assert error_of(client.spawn(argv=[])).code == "invalid"
    assert error_of(client.spawn(cmd="true", pty={"rows": 0, "cols": 80})).code == "invalid"


def test_stdin_conflicts(client: GuestClient, spawn: Spawner) -> None:
    no_stdin = spawn(argv=["sleep", "30"])
    assert error_of(client.input(no_stdin["id"], b"x")).code == "conflict"
    closed = spawn(argv=["sleep", "30"], stdin=True)
    run(client.close_stdin(closed["id"]))
    assert error_of(client.input(closed["id"], b"x")).code == "conflict"
    done = spawn(argv=["true"], stdin=True)
    run(client.wait(done["id"], 5))
    assert error_of(client.input(done["id"], b"x" * 1_000_000)).code == "conflict"
    assert error_of(client.resize(no_stdin["id"], 10, 10)).code == "invalid"  # no terminal


def test_unknown_process(client: GuestClient) -> None:
    assert error_of(attach_all(client, "0123abcd")).code == "not_found"
    assert error_of(client.input("0123abcd", b"x")).code == "not_found"
    assert error_of(client.wait("0123abcd", 1)).code == "not_found"
    assert error_of(client.signal("0123abcd", "SIGTERM")).code == "not_found"
    assert error_of(client.wait("../etc", 1)).code == "invalid"


# --- terminals ----------------------------------------------------------------------------------


def test_pty_bash_resize(client: GuestClient, spawn: Spawner) -> None:
    proc = spawn(argv=["/bin/bash", "--norc", "--noprofile", "-i"], pty={"rows": 24, "cols": 80})

    async def go() -> None:
        # The terminal echoes the input: wait for what only the command's output contains.
        await client.input(proc["id"], b"stty size; echo TERM=$TERM; tty -s && echo has-$((6*7))\n")
        seen = await read_until(client, proc["id"], b"has-42\r\n")
        assert b"24 80\r\n" in seen and b"TERM=xterm-256color\r\n" in seen
        await client.resize(proc["id"], 40, 132)
        await client.input(proc["id"], b"stty size\n")
        assert b"40 132\r\n" in await read_until(client, proc["id"], b"40 132\r\n")
        assert {p["id"]: p for p in await client.processes()}[proc["id"]]["pty"] == {"rows": 40, "cols": 132}
        await client.input(proc["id"], b"exit 7\n")
        assert await client.wait(proc["id"], 5) == {"running": False, "exit_code": 7}

    run(go())


def test_pty_sigwinch_and_ctrl_c(client: GuestClient, spawn: Spawner) -> None:
    script = "trap 'echo winch' WINCH; echo ready; while true; do sleep 0.05; done"
    proc = spawn(cmd=script, pty={"rows": 10, "cols": 10})

    async def go() -> None:
        await read_until(client, proc["id"], b"ready")
        await client.resize(proc["id"], 11, 12)
        await read_until(client, proc["id"], b"winch")
        try:
            await client.input(proc["id"], b"\x03")  # ^C through the terminal: SIGINT to its group
        except GuestError as e:  # rarely the terminal's hang-up has already ended it: same outcome
            assert e.code == "conflict", e
        assert (await client.wait(proc["id"], 5))["running"] is False

    run(go())


def test_pty_10mb_complete_and_in_order(tmp_path: Path, client: GuestClient, spawn: Spawner) -> None:
    data = os.urandom(10_000_000)
    (tmp_path / "blob").write_bytes(data)
    # Raw mode: the terminal passes the bytes unchanged (no \n -> \r\n, no echo).
    cmd = f"stty raw -echo; echo READY; head -c1 >/dev/null; cat {tmp_path}/blob"
    proc = spawn(cmd=cmd, pty={"rows": 24, "cols": 80})

    async def go() -> tuple[bytes, dict[str, Any]]:
        out = bytearray()
        end: dict[str, Any] = {}
        sent = False
        async for kind, chunk in client.attach(proc["id"], 0):
            if kind == "stdout":
                out += chunk  # type: ignore[operator]
                if not sent and b"READY\n" in out:
                    sent = True
                    await client.input(proc["id"], b"x")
            elif kind == "exit":
                end = chunk  # type: ignore[assignment]
            else:
                assert kind == "attached", (kind, chunk)
        return bytes(out), end

    out, end = run(asyncio.wait_for(go(), 30))
    assert end["exit_code"] == 0
    assert out.startswith(b"READY\n")
    body = out[len(b"READY\n") :]
    assert len(body) == len(data)
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(data).hexdigest()


# --- watch --------------------------------------------------------------------------------------


async def watch_events(
    client: GuestClient, path: str, recursive: bool, action: Coroutine[Any, Any, Any], last: str
) -> list[tuple[str, str, bool, str | None]]:
    """Start a watch, run `action`, collect (type, relative path, is_dir, old_path) until `last` is
    written."""
    events: list[tuple[str, str, bool, str | None]] = []

    async def go() -> None:
        iterator = client.watch(path, recursive=recursive)
        try:
            first = await iterator.__anext__()
            assert first == {"event": "watching"}
            task = asyncio.create_task(action)
            async for event in iterator:
                assert event["event"] == "watch", event
                rel = os.path.relpath(event["path"], path)
                old = event.get("old_path")
                events.append(
                    (event["type"], rel, event["is_dir"], None if old is None else os.path.relpath(old, path))
                )
                if event["type"] == "write" and rel == last:
                    break
            await task
        finally:
            await iterator.aclose()

    await asyncio.wait_for(go(), 10)
    return events


def test_watch_reports_changes_made_by_a_process(tmp_path: Path, client: GuestClient) -> None:
    watched = tmp_path / "watched"
    watched.mkdir()
    (watched / "old").mkdir()  # existing subdirectories are watched too

    async def act() -> None:
        script = (
            "echo a > f1; mv f1 f2; echo b >> f2; rm f2; echo c > old/x; mkdir sub; sleep 0.3; "
            "echo d > sub/g; mv sub sub2; echo e > sub2/h"
        )
        _, _, end = await _exec(client, script, str(watched))
        assert end["exit_code"] == 0

    events = run(watch_events(client, str(watched), True, act(), "sub2/h"))
    assert events == [
        ("create", "f1", False, None),
        ("write", "f1", False, None),
        ("rename", "f2", False, "f1"),
        ("write", "f2", False, None),
        ("remove", "f2", False, None),
        ("create", "old/x", False, None),
        ("write", "old/x", False, None),
        ("create", "sub", True, None),
        ("create", "sub/g", False, None),
        ("write", "sub/g", False, None),
        ("rename", "sub2", True, "sub"),
        ("create", "sub2/h", False, None),
        ("write", "sub2/h", False, None),
    ]


def test_watch_not_recursive(tmp_path: Path, client: GuestClient) -> None:
    (tmp_path / "sub").mkdir()

    async def act() -> None:
        await _exec(client, "echo x > sub/inner; echo y > top", str(tmp_path))

    events = run(watch_events(client, str(tmp_path), False, act(), "top"))
    assert events == [("create", "top", False, None), ("write", "top", False, None)]


def test_watch_errors(tmp_path: Path, client: GuestClient) -> None:
    (tmp_path / "file").write_text("x")

    async def first(path: str) -> dict[str, Any]:
        iterator = client.watch(path)
        try:
            return await iterator.__anext__()
        finally:
            await iterator.aclose()

    assert error_of(first(str(tmp_path / "missing"))).code == "not_found"
    assert error_of(first(str(tmp_path / "file"))).code == "not_a_directory"


async def _exec(client: GuestClient, cmd: str, cwd: str) -> tuple[bytes, bytes, dict[str, Any]]:
    out, err, end = bytearray(), bytearray(), {}
    async for kind, data in client.exec(cmd, cwd=cwd):
        if kind == "stdout":
            out += data  # type: ignore[operator]
        elif kind == "stderr":
            err += data  # type: ignore[operator]
        else:
            end = data  # type: ignore[assignment]
    return bytes(out), bytes(err), end  # type: ignore[return-value]


def test_watch_move_out_and_removal_of_the_watched_directory(tmp_path: Path, client: GuestClient) -> None:
    watched = tmp_path / "watched"
    watched.mkdir()
    (watched / "f").write_text("x")

    async def go() -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        async for event in client.watch(str(watched)):
            events.append(event)
            if event["event"] == "watching":
                _, err, end = await _exec(
                    client, f"mv f {tmp_path}/outside; cd / && rm -r {watched}", str(watched)
                )
                assert end["exit_code"] == 0, err
        return events  # the stream ended by itself: the directory is gone

    events = run(asyncio.wait_for(go(), 10))
    assert events == [
        {"event": "watching"},
        {"event": "watch", "type": "remove", "path": str(watched / "f"), "is_dir": False},
    ]


def test_old_exited_processes_are_forgotten(tmp_path: Path) -> None:
    a = Agent(tmp_path)
    try:

        async def go() -> None:
            first = await a.client.spawn(argv=["true"], tag="first")
            await a.client.wait(first["id"], 5)
            # PROCS_KEEP (100) + PROCS_SLACK (25): none forgotten yet, the spawns read no records
            ids = [(await a.client.spawn(argv=["true"]))["id"] for _ in range(125)]
            for proc_id in ids:
                await a.client.wait(proc_id, 5)
            listed = [p["id"] for p in await a.client.processes()]
            assert len(listed) == 126 and listed[0] == first["id"]
            last = await a.client.spawn(argv=["sleep", "30"])  # forgets all but the newest 100 exited
            listed = [p["id"] for p in await a.client.processes()]
            assert listed == [*ids[25:], last["id"]]
            with pytest.raises(GuestError) as info:
                await a.client.wait(first["id"], 1)
            assert info.value.code == "not_found"
            await a.client.kill(last["id"])

        run(go())
    finally:
        a.stop()


def test_large_input_reaches_the_process(client: GuestClient, spawn: Spawner) -> None:
    data = os.urandom(20_000_000)
    proc = spawn(argv=["sha256sum"], stdin=True)

    async def go() -> bytes:
        await client.input(proc["id"], (data[i : i + 1_000_000] for i in range(0, len(data), 1_000_000)))
        await client.close_stdin(proc["id"])
        _, out, _, end = await attach_all(client, proc["id"])
        assert end["exit_code"] == 0
        return out

    assert run(go()).split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_a_reader_that_falls_behind_is_told_what_it_missed(client: GuestClient, spawn: Spawner) -> None:
    expected = subprocess.run(["seq", "1", "3000000"], capture_output=True, check=True).stdout
    proc = spawn(cmd="sleep 0.3; seq 1 3000000")

    async def go() -> list[str]:
        kinds = []
        pos = 0
        events = client.attach(proc["id"], 0)
        try:
            kind, data = await anext(events)
            assert (kind, data) == ("attached", {"event": "attached", "offset": 0, "truncated": False})
            # Not reading meanwhile: the process is not held up, and ends with most output dropped.
            assert (await client.wait(proc["id"], 120))["running"] is False
            async for kind, data in events:
                kinds.append(kind)
                if kind == "stdout":
                    assert data == expected[pos : pos + len(data)]
                    pos += len(data)  # type: ignore[arg-type]
                elif kind == "truncated":
                    assert isinstance(data, dict) and data["offset"] - pos == data["dropped"] > 0
                    pos = data["offset"]
                else:
                    assert kind == "exit" and data == {"exit_code": 0, "end_offset": len(expected)}
        finally:
            await events.aclose()
        assert pos == len(expected)
        return kinds

    # At least one gap, each reported exactly (checked above). More than one is right too: while the
    # test awaits `wait`, its event loop keeps draining the attach socket into the stream's buffer,
    # and each time the agent refills it the reader may have fallen behind again.
    assert run(asyncio.wait_for(go(), 20)).count("truncated") >= 1


def test_spawn_and_attach_on_one_connection(client: GuestClient, spawn: Spawner) -> None:
    """`spawn` with `attach` (e2b's commands.run): the process's id first, then its whole output and
    exit as `attach` gives them; it is an ordinary background process meanwhile (listed, waitable)."""

    async def go() -> None:
        await client.ping()  # leaves a kept connection (if the client keeps them): the spawn takes it
        events = [
            item
            async for item in client.spawn_attach(
                offset=0, block=True, argv=["sh", "-c", "echo out; echo err >&2; exit 3"], hold=True
            )
        ]
        kind, spawned = events[0]
        assert kind == "spawned" and isinstance(spawned, dict) and spawned["pid"] > 0
        assert events[1][0] == "attached"
        out = b"".join(d for k, d in events if k == "stdout")  # type: ignore[misc]
        err = b"".join(d for k, d in events if k == "stderr")  # type: ignore[misc]
        assert (out, err) == (b"out\n", b"err\n")
        assert events[-1][0] == "exit" and events[-1][1]["exit_code"] == 3  # type: ignore[index]
        assert (await client.wait(spawned["id"], 5))["exit_code"] == 3
        assert spawned["id"] in [p["id"] for p in await client.processes()]
        assert (await client.ping())["ok"] is True  # the used-up kept handler was not given back
        with pytest.raises(GuestError) as info:  # errors before the start come first
            await anext(client.spawn_attach(argv=["true"], cwd="/no/such/dir"))
        assert info.value.code == "not_found"

    run(go())


def test_a_spawn_with_attach_uses_up_a_kept_connection(agent: Agent) -> None:
    """With the node's kept connections, `spawn_attach` takes a kept one (its handler becomes the
    supervisor) and never gives it back: the next call works on another."""
    from cove.node.guest_client import Idle

    idle = Idle()
    client = GuestClient(agent.socket, idle=idle)

    async def go() -> None:
        await client.ping()
        assert len(idle._conns.get(agent.socket, [])) == 1
        events = [item async for item in client.spawn_attach(offset=0, block=True, argv=["echo", "kept"])]
        assert events[0][0] == "spawned" and b"".join(d for k, d in events if k == "stdout") == b"kept\n"  # type: ignore[misc]
        assert not idle._conns.get(agent.socket)  # taken, not given back
        assert (await client.ping())["ok"] is True
        idle.close()

    run(go())


def test_spawn_attach_with_an_agent_from_before_attach(tmp_path: Path) -> None:
    """An agent that does not know spawn's `attach` (one sealed into a template's memory) answers a
    plain `{id, pid}`: the host then attaches on a connection of its own, and the caller sees the
    same events."""
    from cove.guest import protocol
    from cove.guest.protocol import KIND_STDOUT

    requests: list[dict[str, Any]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, length = protocol.HEADER.unpack(await reader.readexactly(protocol.HEADER_SIZE))
        req = protocol.decode_json(await reader.readexactly(length))
        requests.append(req)
        if req["op"] == "spawn":
            writer.write(protocol.encode_json({"ok": True, "id": "0badf00d", "pid": 42}))
        elif req["op"] == "attach":
            writer.write(protocol.encode_json({"event": "attached", "offset": 0, "truncated": False}))
            writer.write(protocol.encode_frame(KIND_STDOUT, b"old\n"))
            writer.write(protocol.encode_json({"ok": True, "exit_code": 0, "end_offset": 4}))
        await writer.drain()
        writer.close()

    async def go() -> None:
        sock = str(tmp_path / "old.sock")
        server = await asyncio.start_unix_server(serve, sock)
        try:
            client = GuestClient(sock)
            events = [item async for item in client.spawn_attach(offset=0, block=True, argv=["echo", "old"])]
        finally:
            server.close()
        assert events[0] == ("spawned", {"id": "0badf00d", "pid": 42})
        assert [k for k, _ in events[1:]] == ["attached", "stdout", "exit"]
        assert events[-1][1] == {"exit_code": 0, "end_offset": 4}
        assert requests[0]["op"] == "spawn" and requests[0]["attach"] == {"offset": 0, "block": True}
        assert requests[1] == {"op": "attach", "id": "0badf00d", "offset": 0, "block": True}

    run(go())


def test_background_commands_are_the_oom_killers_choice(client: GuestClient, spawn: Spawner) -> None:
    """Started by posix_spawn or by the fork path (a terminal), a command's oom_score_adj is 0."""

    async def output(proc_id: str) -> bytes:
        return b"".join([d async for k, d in client.attach(proc_id, offset=0) if k == "stdout"])  # type: ignore[misc]

    for pty in (None, {"rows": 24, "cols": 80}):
        proc = spawn(argv=["cat", "/proc/self/oom_score_adj"], pty=pty)
        assert run(output(proc["id"])).strip() == b"0", pty
