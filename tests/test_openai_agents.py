"""cove's OpenAI Agents SDK sandbox provider (`cove.integrations.openai_agents`) against a real server.

Direct session tests share one started session (module scope, one event loop); lifecycle, persistence
and resume tests make their own. The Runner tests use `agents.testing.ScriptedModel` (no API key, no
network): the tool calls it scripts really run in cove sandboxes, and the assertions are on what they did.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import shlex
import tarfile
import time
import zipfile
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import pytest
from agents import RunConfig, Runner, RunState, function_tool
from agents.sandbox import Manifest, SandboxAgent, SandboxRunConfig
from agents.sandbox.capabilities import Capability, Filesystem, Shell
from agents.sandbox.entries import File
from agents.sandbox.errors import (
    ExecNonZeroError,
    ExecTimeoutError,
    ExecTransportError,
    ExposedPortUnavailableError,
    InvalidManifestPathError,
    PtySessionNotFoundError,
    WorkspaceArchiveWriteError,
    WorkspaceReadNotFoundError,
    WorkspaceWriteTypeError,
)
from agents.sandbox.files import EntryKind
from agents.sandbox.manifest import Environment
from agents.sandbox.session.sandbox_session import SandboxSession
from agents.sandbox.snapshot import LocalSnapshotSpec
from agents.sandbox.types import Group, User
from agents.testing import ScriptedModel, assistant_message, function_call

from conftest import Server
from cove.integrations.openai_agents import (
    CoveSandboxClient,
    CoveSandboxClientOptions,
    CoveSandboxSession,
    CoveSandboxSessionState,
    snapshot_ref,
)

pytestmark = pytest.mark.timeout(180)
T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]


@pytest.fixture(scope="module")
def run() -> Iterator[Run[Any]]:
    """One event loop for the module, so a session (and its HTTP client) can serve many tests."""
    loop = asyncio.new_event_loop()

    def go(coro: Coroutine[Any, Any, T]) -> T:
        return loop.run_until_complete(asyncio.wait_for(coro, 120))

    yield go
    loop.close()


@pytest.fixture(scope="module")
def client(server: Server) -> CoveSandboxClient:
    return CoveSandboxClient(url=server.url, api_key=server.api_key)


def _inner(session: SandboxSession) -> CoveSandboxSession:
    inner = session._inner
    assert isinstance(inner, CoveSandboxSession)
    return inner


def _cove_state(server: Server, sandbox_id: str) -> str:
    with server.client() as api:
        r = api.get(f"/v1/sandboxes/{sandbox_id}")
        assert r.status_code == 200, r.text
        return str(r.json()["state"])


def _kill(server: Server, *sandbox_ids: str) -> None:
    with server.client() as api:
        for sandbox_id in sandbox_ids:
            api.delete(f"/v1/sandboxes/{sandbox_id}")


async def _text(session: SandboxSession, path: str) -> str:
    return (await session.read(Path(path))).read().decode()


@pytest.fixture(scope="module")
def session(server: Server, client: CoveSandboxClient, run: Run[Any]) -> Iterator[SandboxSession]:
    """A started session shared by the direct tests (they use distinct file names)."""
    manifest = Manifest(
        entries={"brief.txt": File(content=b"the brief\n")},
        environment=Environment(value={"FROM_MANIFEST": "m"}),
    )
    options = CoveSandboxClientOptions(env={"FROM_OPTIONS": "o"}, exposed_ports=(8000,), timeout=600)
    s = run(client.create(manifest=manifest, options=options))
    run(s.start())
    yield s
    sandbox_id = _inner(s).sandbox_id
    run(s.aclose())
    run(client.delete(s))
    assert _cove_state(server, sandbox_id) == "killed"


# ------------------------------------------------------------------------------------- commands


def test_exec_runs_in_the_workspace_with_env_and_exit_codes(session: SandboxSession, run: Run[Any]) -> None:
    r = run(session.exec('pwd; id -un; cat brief.txt; echo "$FROM_OPTIONS$FROM_MANIFEST"; exit 3'))
    assert r.exit_code == 3
    assert r.stdout.decode() == "/workspace\nuser\nthe brief\nom\n"
    r = run(session.exec("echo oops >&2; false"))
    assert (r.exit_code, r.stdout, r.stderr) == (1, b"", b"oops\n")
    r = run(session.exec("whoami", user="root"))  # cove runs it as root itself: no sudo needed
    assert r.ok() and r.stdout == b"root\n"


def test_exec_quoting_reaches_the_program_unchanged(session: SandboxSession, run: Run[Any]) -> None:
    args = ["a b", "it's", 'say "hi"', "$HOME", "`id`", "back\\slash", "*", ""]
    script = "import json, sys; print(json.dumps(sys.argv[1:]))"
    r = run(session.exec("python3", "-c", script, *args))  # joined for `sh -lc`, then split again
    assert r.ok(), r.stderr
    assert json.loads(r.stdout) == args
    r = run(session.exec("python3", "-c", script, *args, shell=False))  # argv straight through
    assert json.loads(r.stdout) == args


def test_exec_timeout_and_transport_errors(
    server: Server, session: SandboxSession, client: CoveSandboxClient, run: Run[Any]
) -> None:
    started = time.monotonic()
    with pytest.raises(ExecTimeoutError) as timed_out:
        run(session.exec("echo started; sleep 30", timeout=0.5))
    assert time.monotonic() - started < 10
    assert timed_out.value.context["stdout"] == "started\n"
    assert run(session.exec("echo still fine")).stdout == b"still fine\n"

    # A sandbox that is gone: exec fails as a transport error, not as a command's exit code.
    doomed = run(client.create(options=CoveSandboxClientOptions()))
    _kill(server, _inner(doomed).sandbox_id)
    with pytest.raises(ExecTransportError) as gone:
        run(doomed.exec("true"))
    assert "killed" in str(gone.value.cause)


# ---------------------------------------------------------------------------------------- files


def test_read_write_round_trip_bytes_and_missing_files(session: SandboxSession, run: Run[Any]) -> None:
    payload = bytes(range(256)) * 64 + b"\x00\xff"
    run(session.write(Path("rw/data.bin"), io.BytesIO(payload)))
    assert run(session.read(Path("rw/data.bin"))).read() == payload
    assert run(session.read(Path("/workspace/rw/data.bin"))).read() == payload
    r = run(session.exec("sha256sum rw/data.bin"))
    assert r.stdout.decode().split()[0] == hashlib.sha256(payload).hexdigest()
    assert run(session.read_bounded(Path("rw/data.bin"), max_bytes=10)) == payload[:10]

    with pytest.raises(WorkspaceReadNotFoundError):
        run(session.read(Path("rw/missing.txt")))
    with pytest.raises(WorkspaceReadNotFoundError):
        run(session.read_bounded(Path("rw/missing.txt"), max_bytes=10))
    run(session.write(Path("rw/text.txt"), io.StringIO("text")))  # type: ignore[arg-type]
    assert run(_text(session, "rw/text.txt")) == "text"  # text is written as UTF-8, as E2B's provider does

    class NotAStream(io.RawIOBase):
        def read(self, size: int = -1) -> Any:
            return 42

    with pytest.raises(WorkspaceWriteTypeError):
        run(session.write(Path("rw/bad.txt"), NotAStream()))


def test_paths_are_confined_to_the_workspace(session: SandboxSession, run: Run[Any]) -> None:
    with pytest.raises(InvalidManifestPathError):
        run(session.read(Path("/etc/passwd")))
    with pytest.raises(InvalidManifestPathError):
        run(session.write(Path("../escape.txt"), io.BytesIO(b"x")))
    # A symlink out of the workspace is resolved in the sandbox and refused.
    assert run(session.exec("ln -sfn /etc confined-link")).ok()
    with pytest.raises(InvalidManifestPathError):
        run(session.read(Path("confined-link/passwd")))
    with pytest.raises(InvalidManifestPathError):
        run(session.write(Path("confined-link/evil"), io.BytesIO(b"x")))
    assert not run(session.exec("test -e /etc/evil")).ok()
    # The path helper lives in the sandbox; if something deletes it, it is installed again.
    assert run(session.exec("rm -rf /tmp/openai-agents/bin && ! ls /tmp/openai-agents/bin")).ok()
    assert run(_text(session, "brief.txt")) == "the brief\n"
    with pytest.raises(InvalidManifestPathError):
        run(session.read(Path("confined-link/passwd")))


def test_ls_rm_mv_mkdir_use_the_file_api(session: SandboxSession, run: Run[Any]) -> None:
    run(session.mkdir(Path("tree/a/b"), parents=True))
    with pytest.raises(ExecNonZeroError):
        run(session.mkdir(Path("tree/missing/c")))  # no parents: the parent must exist
    run(session.mkdir(Path("tree/a/c")))
    run(session.write(Path("tree/a/f.txt"), io.BytesIO(b"12345")))
    entries = {e.path: e for e in run(session.ls(Path("tree/a")))}
    assert set(entries) == {"/workspace/tree/a/b", "/workspace/tree/a/c", "/workspace/tree/a/f.txt"}
    assert (
        entries["/workspace/tree/a/b"].kind == EntryKind.DIRECTORY and entries["/workspace/tree/a/b"].is_dir()
    )
    f = entries["/workspace/tree/a/f.txt"]
    assert (f.kind, f.size, f.owner) == (EntryKind.FILE, 5, "user")
    assert [e.path for e in run(session.ls(Path("tree/a/f.txt")))] == ["/workspace/tree/a/f.txt"]

    run(session.mv(Path("tree/a/f.txt"), Path("tree/a/c/g.txt")))
    assert run(_text(session, "tree/a/c/g.txt")) == "12345"
    with pytest.raises(ExecNonZeroError):
        run(session.mv(Path("tree/a/b"), Path("tree/moved")))  # directories are not moved
    run(session.write(Path("tree/h.txt"), io.BytesIO(b"new")))
    run(session.mv(Path("tree/h.txt"), Path("tree/a/c/g.txt")))  # replaces the destination
    assert run(_text(session, "tree/a/c/g.txt")) == "new"

    with pytest.raises(ExecNonZeroError):
        run(session.rm(Path("tree/a")))  # not empty, not recursive
    with pytest.raises(ExecNonZeroError):
        run(session.rm(Path("tree/nothing-here")))
    run(session.rm(Path("tree/nothing-here"), recursive=True))  # like rm -rf
    run(session.rm(Path("tree"), recursive=True))
    assert not run(session.exec("test -e tree")).ok()
    with pytest.raises(ExecNonZeroError):
        run(session.ls(Path("tree")))


def test_extract_tar_and_zip(session: SandboxSession, run: Run[Any]) -> None:
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
        for name, data in (("pkg/a.txt", b"from tar"), ("pkg/sub/b.txt", b"nested")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tar_bytes.seek(0)
    run(session.extract(Path("arch/in.tar"), tar_bytes))
    assert run(_text(session, "arch/pkg/a.txt")) == "from tar"
    assert run(_text(session, "arch/pkg/sub/b.txt")) == "nested"

    zip_bytes = io.BytesIO()
    with zipfile.ZipFile(zip_bytes, "w") as zf:
        zf.writestr("z/c.txt", "from zip")
    zip_bytes.seek(0)
    run(session.extract(Path("arch/in.zip"), zip_bytes))
    assert run(_text(session, "arch/z/c.txt")) == "from zip"

    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tar:
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    evil.seek(0)
    with pytest.raises(Exception):  # noqa: B017 - the SDK's own error type for an unsafe member
        run(session.extract(Path("arch/evil.tar"), evil))
    assert not run(session.exec("test -e /escaped.txt || test -e /workspace/../escaped.txt")).ok()


def test_apply_patch(session: SandboxSession, run: Run[Any]) -> None:
    run(
        session.apply_patch(
            {"type": "create_file", "path": "patch/notes.txt", "diff": "+one\n+two\n+three\n"}
        )
    )
    assert run(_text(session, "patch/notes.txt")) == "one\ntwo\nthree"  # V4A keeps no final newline
    diff = "@@\n one\n-two\n+TWO\n three\n"
    run(session.apply_patch({"type": "update_file", "path": "patch/notes.txt", "diff": diff}))
    assert run(session.exec("cat patch/notes.txt")).stdout == b"one\nTWO\nthree"
    run(session.apply_patch({"type": "delete_file", "path": "patch/notes.txt"}))
    assert not run(session.exec("test -e patch/notes.txt")).ok()


# ------------------------------------------------------------------------------ terminals, ports


def test_pty_start_poll_stdin_and_terminate(session: SandboxSession, run: Run[Any]) -> None:
    update = run(session.pty_exec_start("python3 -q -i", tty=True, yield_time_s=1))
    assert update.process_id is not None and update.exit_code is None
    pid = update.process_id
    update = run(session.pty_write_stdin(session_id=pid, chars="print(6 * 7)\n", yield_time_s=1))
    assert b"42" in update.output and update.process_id == pid
    update = run(session.pty_write_stdin(session_id=pid, chars="import sys; sys.exit(5)\n", yield_time_s=2))
    assert (update.exit_code, update.process_id) == (5, None)
    with pytest.raises(PtySessionNotFoundError):
        run(session.pty_write_stdin(session_id=pid, chars="x"))

    # Without a terminal: output is collected, stdin is refused; a poll with no input waits for output.
    update = run(session.pty_exec_start("for i in 1 2 3; do echo tick$i; sleep 0.3; done", yield_time_s=0.25))
    assert update.process_id is not None
    with pytest.raises(RuntimeError):
        run(session.pty_write_stdin(session_id=update.process_id, chars="x"))
    seen = update.output
    while update.process_id is not None:
        update = run(session.pty_write_stdin(session_id=update.process_id, chars=""))
        seen += update.output
    assert seen.split() == [b"tick1", b"tick2", b"tick3"] and update.exit_code == 0

    # A timeout kills it; terminate_all kills whatever is left.
    update = run(session.pty_exec_start("sleep 30", timeout=0.5, yield_time_s=3))
    assert update.process_id is None and update.exit_code not in (None, 0)
    update = run(session.pty_exec_start("sleep 300; echo done > pty-left.txt", yield_time_s=0.25))
    assert update.process_id is not None
    run(session.pty_terminate_all())
    procs = run(_inner(session).sandbox.processes.list())
    assert not [p for p in procs if p.running and p.tag == "openai-agents-pty"]


def test_exposed_port_reaches_a_server_in_the_sandbox(
    server: Server, session: SandboxSession, run: Run[Any]
) -> None:
    run(session.write(Path("site/hello.txt"), io.BytesIO(b"hello through cove")))
    update = run(session.pty_exec_start("cd site && exec python3 -m http.server 8000", yield_time_s=0.25))
    assert update.process_id is not None
    try:
        endpoint = run(session.resolve_exposed_port(8000))
        url = endpoint.url_for("http")
        assert endpoint.host == f"8000-{_inner(session).sandbox_id}.localhost"  # the server's default domain
        assert endpoint.port == server.port and not endpoint.tls and endpoint.query
        # `*.localhost` does not resolve here: connect to the server and name the host.
        direct = f"http://127.0.0.1:{endpoint.port}/hello.txt?{endpoint.query}"
        deadline = time.monotonic() + 15
        while True:
            r = httpx.get(direct, headers={"Host": f"{endpoint.host}:{endpoint.port}"})
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.status_code == 200, r.text
        assert r.text == "hello through cove"
        assert url.startswith(f"http://{endpoint.host}:{endpoint.port}/?")
        # No signature, no entry.
        r = httpx.get(f"http://127.0.0.1:{endpoint.port}/hello.txt", headers={"Host": endpoint.host})
        assert r.status_code in (401, 403), r.text
    finally:
        run(session.pty_terminate_all())
    with pytest.raises(ExposedPortUnavailableError):
        run(session.resolve_exposed_port(9000))  # not among the options' exposed_ports


def test_manifest_users_and_acting_as_them(client: CoveSandboxClient, run: Run[Any]) -> None:
    alice = User(name="alice")
    manifest = Manifest(
        users=[alice],
        groups=[Group(name="team", users=[alice])],
        entries={"shared.txt": File(content=b"all")},
    )

    async def scenario() -> tuple[str, str, str]:
        s = await client.create(manifest=manifest)
        async with s:  # accounts are made as root, by cove, without sudo in the sandbox
            ids = (await s.exec("id -un; id -Gn", user="alice")).stdout.decode()
            shared = (await s.read(Path("shared.txt"), user=alice)).read().decode()
            with pytest.raises(WorkspaceArchiveWriteError):  # the workspace belongs to the sandbox's user
                await s.write(Path("by-alice.txt"), io.BytesIO(b"x"), user=alice)
            assert (await s.exec("install -d -o alice tmp-alice", user="root")).ok()
            await s.write(Path("tmp-alice/by-alice.txt"), io.BytesIO(b"x"), user=alice)
            owner = (await s.exec("stat -c %U tmp-alice/by-alice.txt")).stdout.decode().strip()
        await client.delete(s)
        return ids, shared, owner

    ids, shared, owner = run(scenario())
    assert ids.split("\n")[0] == "alice" and "team" in ids.split("\n")[1]
    assert (shared, owner) == ("all", "alice")


# --------------------------------------------------------------------- lifecycle and persistence


def test_lifecycle_create_start_stop_shutdown_delete(
    server: Server, client: CoveSandboxClient, run: Run[Any]
) -> None:
    async def scenario() -> tuple[str, bool, bool, str]:
        s = await client.create(options=CoveSandboxClientOptions(metadata={"who": "oai-test"}))
        sandbox_id = _inner(s).sandbox_id
        before = await s.running()  # not started: the runner must start it
        async with s:
            assert await s.running()
            await s.write(Path("x.txt"), io.BytesIO(b"x"))
            state_in = _cove_state(server, sandbox_id)
        after = await s.running()
        await client.delete(s)
        return sandbox_id, before, after, state_in

    sandbox_id, before, after, state_in = run(scenario())
    assert (before, after, state_in) == (False, False, "running")
    assert _cove_state(server, sandbox_id) == "killed"


@pytest.mark.parametrize("mode", ["snapshot", "tar"])
def test_persist_delete_resume_restores_the_workspace(
    server: Server, client: CoveSandboxClient, run: Run[Any], tmp_path: Path, mode: Literal["snapshot", "tar"]
) -> None:
    options = CoveSandboxClientOptions(workspace_persistence=mode)
    manifest = Manifest(entries={"seed.txt": File(content=b"seed")})

    async def first() -> dict[str, object]:
        s = await client.create(
            manifest=manifest, options=options, snapshot=LocalSnapshotSpec(base_path=tmp_path)
        )
        async with s:
            await s.write(Path("work/result.txt"), io.BytesIO(b"made before the stop"))
            assert (await s.exec("mkdir -p .cache && echo skip > .cache/x")).ok()
        await client.delete(s)
        return client.serialize_session_state(s.state)

    payload = run(first())
    original = str(payload["sandbox_id"])
    assert _cove_state(server, original) == "killed"
    stored = next(tmp_path.iterdir()).read_bytes()
    if mode == "snapshot":
        assert snapshot_ref.decode(stored) == payload["cove_snapshot_id"]
    else:
        assert payload["cove_snapshot_id"] is None
        with tarfile.open(fileobj=io.BytesIO(stored)) as tar:
            names = tar.getnames()
        assert "./work/result.txt" in names and not any(n.startswith("/") for n in names)

    async def second() -> tuple[str, str, str, str, str | None]:
        state = client.deserialize_session_state(json.loads(json.dumps(payload)))
        s = await client.resume(state)
        started_on = _inner(s).sandbox_id
        async with s:
            # From a cove snapshot, the replacement already is the snapshot: no second sandbox.
            assert _inner(s).sandbox_id == started_on
            result = await _text(s, "work/result.txt")
            seed = await _text(s, "seed.txt")
            who = (await s.exec("stat -c %U work/result.txt")).stdout.decode().strip()
            sandbox_id = _inner(s).sandbox_id
        await client.delete(s)
        return result, seed, who, sandbox_id, _inner(s).state.cove_snapshot_id

    result, seed, who, replacement, last_snapshot = run(second())
    assert (result, seed, who) == ("made before the stop", "seed", "user")
    assert replacement != original
    assert _cove_state(server, replacement) == "killed"
    if mode == "snapshot":
        with server.client() as api:  # the stop persisted anew, and the older snapshot was dropped
            assert last_snapshot and last_snapshot != payload["cove_snapshot_id"]
            assert api.get(f"/v1/snapshots/{payload['cove_snapshot_id']}").status_code == 404
            assert api.delete(f"/v1/snapshots/{last_snapshot}").status_code == 204
    else:
        assert last_snapshot is None


def test_native_snapshot_hydrates_into_a_new_sandbox_and_tar_is_refused_when_unsafe(
    server: Server, client: CoveSandboxClient, run: Run[Any]
) -> None:
    async def scenario() -> tuple[str, str, str, str]:
        s = await client.create(options=CoveSandboxClientOptions())
        inner = _inner(s)
        await s.start()
        await s.write(Path("kept.txt"), io.BytesIO(b"v1"))
        blob = (await inner.persist_workspace()).read()
        first_snapshot = snapshot_ref.decode(blob)
        assert first_snapshot and inner.state.cove_snapshot_id == first_snapshot
        await s.write(Path("kept.txt"), io.BytesIO(b"v2"))
        old_id = inner.sandbox_id
        await inner.hydrate_workspace(io.BytesIO(blob))  # back to v1, in a sandbox started from it
        rolled_back = await _text(s, "kept.txt")
        new_id = inner.sandbox_id
        unsafe = io.BytesIO()
        with tarfile.open(fileobj=unsafe, mode="w") as tar:
            info = tarfile.TarInfo("../outside.txt")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
        with pytest.raises(WorkspaceArchiveWriteError):
            await inner.hydrate_workspace(io.BytesIO(unsafe.getvalue()))
        second = snapshot_ref.decode((await inner.persist_workspace()).read())
        await s.aclose()
        await client.delete(s)
        return old_id, new_id, rolled_back, f"{first_snapshot} {second}"

    old_id, new_id, rolled_back, snaps = run(scenario())
    first_snapshot, second = snaps.split()
    assert rolled_back == "v1" and new_id != old_id
    assert _cove_state(server, old_id) == "killed" and _cove_state(server, new_id) == "killed"
    with server.client() as api:  # a newer snapshot replaces the session's older one
        assert api.get(f"/v1/snapshots/{first_snapshot}").status_code == 404
        assert api.get(f"/v1/snapshots/{second}").status_code == 200
        api.delete(f"/v1/snapshots/{second}")


def test_state_round_trip_and_resume_after_hibernate(
    server: Server, client: CoveSandboxClient, run: Run[Any], tmp_path: Path
) -> None:
    options = CoveSandboxClientOptions(on_exit="hibernate", timeout=120)

    async def first() -> str:
        s = await client.create(options=options, snapshot=LocalSnapshotSpec(base_path=tmp_path))
        async with s:
            await s.write(Path("state.txt"), io.BytesIO(b"before hibernate"))
            # A background process: hibernation keeps processes, so it is still there after resume.
            await _inner(s).sandbox.processes.start("sleep 600", tag="keeper")
        await client.delete(s)  # hibernated, not deleted
        return json.dumps(client.serialize_session_state(s.state))

    text = run(first())
    payload = json.loads(text)
    assert "api_key" not in text and server.api_key not in text
    assert payload["type"] == "cove" and payload["on_exit"] == "hibernate"
    sandbox_id = payload["sandbox_id"]
    assert _cove_state(server, sandbox_id) == "hibernated"

    async def second() -> tuple[str, str, list[str], bool, str]:
        state = CoveSandboxClient(url=server.url, api_key=server.api_key).deserialize_session_state(
            json.loads(text)
        )
        assert isinstance(state, CoveSandboxSessionState) and state.sandbox_id == sandbox_id
        s = await client.resume(state)
        running = await s.running()
        await s.start()
        content = await _text(s, "state.txt")
        tags = [p.tag or "" for p in await _inner(s).sandbox.processes.list() if p.running]
        resumed_id = _inner(s).sandbox_id
        info = await _inner(s).sandbox.info()
        await s.aclose()  # hibernates again, and persists a new snapshot
        await client.delete(s)
        snapshot = s.state.cove_snapshot_id
        assert snapshot and _cove_state(server, resumed_id) == "hibernated"
        await client.discard(s.state)  # done for good: sandbox and snapshot go
        await client.discard(s.state)  # and again is fine
        return content, resumed_id, tags, running and info.expires_at is not None, snapshot

    content, resumed_id, tags, clock_restarted, snapshot = run(second())
    assert (content, resumed_id) == ("before hibernate", sandbox_id)
    assert "keeper" in tags
    assert clock_restarted  # shutdown stopped the timeout while it slept; resume set it again
    assert _cove_state(server, sandbox_id) == "killed"
    with server.client() as api:
        assert api.get(f"/v1/snapshots/{snapshot}").status_code == 404


def test_options_are_checked_and_defaults_come_from_the_environment(
    server: Server, run: Run[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError):
        CoveSandboxClientOptions(template="base", snapshot="snap")
    with pytest.raises(ValueError):
        CoveSandboxClientOptions(workspace_persistence="zip")  # type: ignore[arg-type]
    assert CoveSandboxClientOptions(pause_on_exit=True).effective_on_exit == "hibernate"
    assert "api_key" not in CoveSandboxClientOptions(api_key="secret").model_dump()
    monkeypatch.setenv("COVE_URL", server.url)
    monkeypatch.setenv("COVE_API_KEY", server.api_key)

    async def scenario() -> str:
        c = CoveSandboxClient()
        assert c.supports_default_options and c.backend_id == "cove"
        s = await c.create()  # no options at all
        sandbox_id = _inner(s).sandbox_id
        await c.delete(s)
        return sandbox_id

    assert _cove_state(server, run(scenario())) == "killed"
    monkeypatch.setenv("COVE_API_KEY", "cove_wrong")
    with pytest.raises(Exception, match=r"(?i)key|auth|401"):
        run(CoveSandboxClient().create())


# ------------------------------------------------------------------------------------- Runner


def _outputs(model: ScriptedModel) -> dict[str, str]:
    """The tools' outputs the model was shown, by call id."""
    found: dict[str, str] = {}
    for call in model.calls:
        for item in call.input if isinstance(call.input, list) else []:
            entry = item if isinstance(item, dict) else item.model_dump()  # type: ignore[union-attr]
            if entry.get("type") == "function_call_output":
                output = entry.get("output")
                found[entry["call_id"]] = output if isinstance(output, str) else str(output)
    return found


def _session_state(client: CoveSandboxClient, result: Any) -> CoveSandboxSessionState:
    """The sandbox session state a finished (or paused) run keeps for resuming."""
    payload = result.to_state().to_json()["sandbox"]["session_state"]
    state = client.deserialize_session_state(payload)
    assert isinstance(state, CoveSandboxSessionState)
    return state


def _tool_names(model: ScriptedModel) -> set[str]:
    return {getattr(tool, "name", "") for call in model.calls for tool in call.tools}


def test_runner_runs_a_scripted_agents_tools_in_a_cove_sandbox(
    server: Server, client: CoveSandboxClient, run: Run[Any], tmp_path: Path
) -> None:
    model = ScriptedModel(
        [
            [
                function_call(
                    "exec_command",
                    {"cmd": "cat brief.txt && python3 -c 'print(6 * 7)' > answer.txt"},
                    call_id="w",
                )
            ],
            [function_call("exec_command", {"cmd": "cat answer.txt; pwd; id -un"}, call_id="r")],
            [function_call("exec_command", {"cmd": "exit 3"}, call_id="fail")],
            [assistant_message("The answer is in answer.txt.")],
        ]
    )
    agent = SandboxAgent(
        name="cove worker",
        instructions="Use the shell.",
        model=model,
        default_manifest=Manifest(entries={"brief.txt": File(content=b"compute six times seven\n")}),
    )
    config = RunConfig(
        sandbox=SandboxRunConfig(
            client=client, options=CoveSandboxClientOptions(), snapshot=LocalSnapshotSpec(base_path=tmp_path)
        ),
        tracing_disabled=True,
    )
    result = run(Runner.run(agent, "Compute 6 * 7 into answer.txt.", run_config=config))
    assert result.final_output == "The answer is in answer.txt."
    out = _outputs(model)
    assert "compute six times seven" in out["w"] and "Process exited with code 0" in out["w"]
    assert "42\n/workspace\nuser" in out["r"]
    assert "Process exited with code 3" in out["fail"]
    assert {"exec_command", "write_stdin", "apply_patch"} <= _tool_names(model)  # write_stdin: PTY support
    state = _session_state(client, result)
    assert _cove_state(server, state.sandbox_id) == "killed"
    assert state.cove_snapshot_id  # the run's end persisted the workspace as a cove snapshot
    run(client.discard(state))


class _Publish(Capability):
    """A tool that needs a human's approval before it touches the sandbox."""

    type: str = "publish"

    def tools(self) -> list[Any]:
        session = self.session
        assert session is not None

        @function_tool(needs_approval=True)
        async def publish(text: str) -> str:
            """Publish text into published.txt (needs approval)."""
            r = await session.exec(f"printf '%s\\n' {shlex.quote(text)} > published.txt && cat seed.txt")
            return r.stdout.decode()

        return [publish]


def test_runner_pauses_for_approval_and_resumes_later_on_the_same_sandbox(
    server: Server, run: Run[Any], tmp_path: Path
) -> None:
    def agent(model: ScriptedModel) -> SandboxAgent[Any]:
        return SandboxAgent(
            name="publisher",
            instructions="Prepare, then publish.",
            model=model,
            capabilities=[Filesystem(), Shell(), _Publish()],
        )

    def config(c: CoveSandboxClient) -> RunConfig:
        options = CoveSandboxClientOptions(on_exit="hibernate")
        snapshot = LocalSnapshotSpec(base_path=tmp_path)
        return RunConfig(
            sandbox=SandboxRunConfig(client=c, options=options, snapshot=snapshot), tracing_disabled=True
        )

    first_model = ScriptedModel(
        [
            [function_call("exec_command", {"cmd": "echo prepared > seed.txt"}, call_id="prep")],
            [function_call("publish", {"text": "hello world"}, call_id="pub")],
        ]
    )
    paused = run(
        Runner.run(
            agent(first_model), "publish it", run_config=config(CoveSandboxClient(server.url, server.api_key))
        )
    )
    assert [i.name for i in paused.interruptions] == ["publish"]
    saved = json.dumps(paused.to_state().to_json())  # e.g. into a database, until a human decides
    sandbox_id = json.loads(saved)["sandbox"]["session_state"]["sandbox_id"]
    assert _cove_state(server, sandbox_id) == "hibernated"

    # Later (a fresh client and model, as in another process): approve and resume.
    second_model = ScriptedModel(
        [
            [function_call("exec_command", {"cmd": "cat published.txt seed.txt"}, call_id="check")],
            [assistant_message("Published.")],
        ]
    )
    resumed_agent = agent(second_model)

    async def resume() -> Any:
        state = await RunState.from_json(resumed_agent, json.loads(saved))
        for item in state.get_interruptions():
            state.approve(item)
        return await Runner.run(
            resumed_agent, state, run_config=config(CoveSandboxClient(server.url, server.api_key))
        )

    client = CoveSandboxClient(server.url, server.api_key)
    try:
        result = run(resume())
        assert result.final_output == "Published."
        out = _outputs(second_model)
        assert out["pub"].strip() == "prepared"  # the tool ran after approval and saw the earlier file
        assert "hello world\nprepared" in out["check"]
        state = _session_state(client, result)
        assert state.sandbox_id == sandbox_id  # the same cove sandbox, woken from hibernation
        assert _cove_state(server, sandbox_id) == "hibernated"
        run(client.discard(state))
        assert _cove_state(server, sandbox_id) == "killed"
    finally:
        _kill(server, sandbox_id)
