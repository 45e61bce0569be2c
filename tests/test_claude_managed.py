"""Claude Managed Agents on cove: the tool factory against real sandboxes, and the stock
``EnvironmentWorker`` loop against a fake of the work-queue and session-events endpoints (the only
fake here: the real service cannot be reached from tests)."""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest

pytest.importorskip("anthropic")

import anyio
import httpx2
from anthropic import AsyncAnthropic
from anthropic.lib.tools import ToolError
from anthropic.lib.tools.agent_toolset import AgentToolContext, beta_agent_toolset_20260401
from typer.testing import CliRunner

from cove.cli.main import app
from cove.devserver import Server
from cove.integrations.claude_managed import SESSION_METADATA_KEY, cove_tool_factory, cove_toolset, run_worker
from cove.sdk import AsyncSandbox

T = TypeVar("T")


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for the module: the shared tools keep an HTTP client bound to it."""
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture
def run(loop: asyncio.AbstractEventLoop) -> Any:
    def _run(coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))

    return _run


def _ctx(session_id: str | None = None, **kw: Any) -> AgentToolContext:
    ctx = AgentToolContext(workdir=kw.pop("workdir", None) or tempfile.mkdtemp(prefix="cove-claude-"), **kw)
    if session_id:
        ctx.session = SimpleNamespace(id=session_id, environment_id="env_test")  # type: ignore[assignment]
    return ctx


async def _session_sandboxes(server: Server, session_id: str) -> list[Any]:
    return await AsyncSandbox.list(
        metadata={SESSION_METADATA_KEY: session_id}, url=server.url, api_key=server.api_key
    )


@pytest.fixture(scope="module")
def shared(server: Server, loop: asyncio.AbstractEventLoop) -> Iterator[dict[str, Any]]:
    """The six tools of one session, shared by the tests that only use its sandbox."""
    session_id = f"sesn_{uuid.uuid4().hex[:12]}"
    tools = cove_toolset(_ctx(session_id), on_session_end="kill", url=server.url, api_key=server.api_key)
    yield {t.name: t for t in tools}
    loop.run_until_complete(tools[0].close())  # type: ignore[misc]
    # Every session sandbox these tests made has been killed by now (the last test to finish is this one's).
    left = loop.run_until_complete(
        AsyncSandbox.list(state=["running", "paused", "hibernated"], url=server.url, api_key=server.api_key)
    )
    assert [i.id for i in left if SESSION_METADATA_KEY in i.metadata] == []


# ---------------------------------------------------------------------------------- schemas


def test_tools_have_the_reference_names_and_schemas(server: Server) -> None:
    ours = cove_toolset(_ctx(), url=server.url, api_key=server.api_key)
    reference = beta_agent_toolset_20260401(AgentToolContext(workdir=tempfile.mkdtemp()))
    assert [t.name for t in ours] == ["bash", "read", "write", "edit", "glob", "grep"]
    assert [t.to_dict() for t in ours] == [t.to_dict() for t in reference]


def test_bad_options_are_refused(server: Server) -> None:
    with pytest.raises(ValueError, match="on_session_end"):
        cove_toolset(_ctx(), on_session_end="pause")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="absolute"):
        cove_tool_factory(workdir="work")(_ctx())
    with pytest.raises(ValueError, match="timeout must be 60"):
        cove_toolset(_ctx(), timeout=5)
    with pytest.raises(ValueError, match="keep_hibernated"):
        cove_toolset(_ctx(), keep_hibernated=-1)


# ---------------------------------------------------------------------------------- tools


def test_bash_keeps_its_shell_and_runs_in_the_sandbox(shared: dict[str, Any], run: Any) -> None:
    bash = shared["bash"]
    assert run(bash.call({"command": "mkdir -p sub && cd sub && export GREETING=hi"})) == ""
    assert run(bash.call({"command": "pwd; echo $GREETING; id -un"})) == "/workspace/sub\nhi\nuser"
    assert run(bash.call({"restart": True})) == "bash session restarted"
    assert run(bash.call({"command": "pwd; echo ${GREETING:-unset}"})) == "/workspace\nunset"


def test_file_tools(shared: dict[str, Any], run: Any) -> None:
    call = {name: tool.call for name, tool in shared.items()}
    assert run(call["write"]({"file_path": "notes/a.txt", "content": "one\ntwo\nthree\n"})) == (
        "wrote 14 bytes to notes/a.txt"
    )
    assert run(call["read"]({"file_path": "/workspace/notes/a.txt", "view_range": [2, 3]})) == "two\nthree"
    assert run(call["edit"]({"file_path": "notes/a.txt", "old_string": "two", "new_string": "2"})).startswith(
        "edited notes/a.txt"
    )
    assert run(call["bash"]({"command": "cat notes/a.txt"})) == "one\n2\nthree"
    assert run(call["glob"]({"pattern": "**/*.txt"})) == "/workspace/notes/a.txt"
    assert run(call["grep"]({"pattern": "^th", "path": "notes"})) == "/workspace/notes/a.txt:3:three"


def test_errors_are_tool_errors(shared: dict[str, Any], run: Any) -> None:
    call = {name: tool.call for name, tool in shared.items()}
    with pytest.raises(ToolError, match=r"read: missing\.txt: no such file or directory"):
        run(call["read"]({"file_path": "missing.txt"}))
    with pytest.raises(ToolError, match="exit code 3"):
        run(call["bash"]({"command": "(exit 3)"}))
    with pytest.raises(ToolError, match="boom"):
        run(call["bash"]({"command": "echo boom; false"}))
    with pytest.raises(ToolError, match="file_path is required"):
        run(call["write"]({"content": "x"}))
    run(call["write"]({"file_path": "dup.txt", "content": "a a"}))
    with pytest.raises(ToolError, match="appears 2 times"):
        run(call["edit"]({"file_path": "dup.txt", "old_string": "a", "new_string": "b"}))
    with pytest.raises(ToolError, match="glob: absolute pattern"):
        run(call["glob"]({"pattern": "/etc/*"}))


# ---------------------------------------------------------------------------------- lifecycle


def test_session_lifecycle_resources_and_wake(server: Server, run: Any, tmp_path: Path) -> None:
    """Skills and memory stores are copied in; memory edits come back at the end; the hibernated
    sandbox is what the session's next work item gets."""
    session_id = f"sesn_{uuid.uuid4().hex[:12]}"
    host = tmp_path / "host"
    skill = host / "skills" / "greeter"
    skill.mkdir(parents=True)
    (skill / "SKILL.md").write_text("say hi")
    memory, shelf = tmp_path / "mem" / "notes", tmp_path / "mem" / "shelf"
    memory.mkdir(parents=True)
    shelf.mkdir(parents=True)
    (memory / "keep.md").write_text("kept")
    (memory / "drop.md").write_text("dropped")
    (shelf / "ro.md").write_text("read only")

    def ctx() -> AgentToolContext:
        c = _ctx(session_id, workdir=str(host))
        c._skill_dirs = [skill]
        c.allowed_roots = [memory, shelf]
        c.read_only_roots = [shelf]
        return c

    options = {"url": server.url, "api_key": server.api_key}
    tools = {t.name: t for t in cove_toolset(ctx(), **options)}
    try:
        assert run(_session_sandboxes(server, session_id)) == []  # nothing until a tool runs
        assert run(tools["read"].call({"file_path": "skills/greeter/SKILL.md"})) == "say hi"
        assert run(tools["read"].call({"file_path": f"{memory}/keep.md"})) == "kept"
        run(tools["write"].call({"file_path": f"{memory}/new.md", "content": "learned"}))
        run(tools["bash"].call({"command": f"rm {memory}/drop.md && echo changed > {memory}/keep.md"}))
        with pytest.raises(ToolError, match="denied"):
            run(tools["write"].call({"file_path": f"{shelf}/ro.md", "content": "no"}))
        run(tools["bash"].call({"command": "echo state > /workspace/state.txt"}))
        run(tools["bash"].close())  # what the session tool runner does at the session's end
        run(tools["grep"].close())  # every tool's close: the second is a no-op
        assert sorted(p.name for p in memory.iterdir()) == ["keep.md", "new.md"]
        assert (memory / "keep.md").read_text() == "changed\n"
        assert (memory / "new.md").read_text() == "learned"
        infos = run(_session_sandboxes(server, session_id))
        assert [i.state for i in infos] == ["hibernated"]
        with pytest.raises(ToolError, match="session has ended"):
            run(tools["bash"].call({"command": "true"}))

        again = {t.name: t for t in cove_toolset(ctx(), **options)}  # the session's next work item
        assert run(again["read"].call({"file_path": "state.txt"})) == "state\n"
        assert [i.id for i in run(_session_sandboxes(server, session_id))] == [infos[0].id]
        run(again["bash"].close())
    finally:
        for info in run(_session_sandboxes(server, session_id)):
            run(AsyncSandbox.kill_by_id(info.id, **options))


def test_kill_at_session_end(server: Server, run: Any) -> None:
    session_id = f"sesn_{uuid.uuid4().hex[:12]}"
    tools = cove_toolset(_ctx(session_id), on_session_end="kill", url=server.url, api_key=server.api_key)
    run(tools[0].call({"command": "true"}))
    (info,) = run(_session_sandboxes(server, session_id))
    run(tools[0].close())
    states = [
        i.state for i in run(AsyncSandbox.list(url=server.url, api_key=server.api_key)) if i.id == info.id
    ]
    assert states in ([], ["killed"])


def test_a_reaped_sandbox_is_replaced(server: Server, run: Any) -> None:
    """A session quiet for longer than the timeout loses its sandbox to cove's reaper; the next
    tool call gets a new one instead of failing for the rest of the session."""
    tools = cove_toolset(
        _ctx(f"sesn_{uuid.uuid4().hex[:12]}"), on_session_end="kill", url=server.url, api_key=server.api_key
    )
    bash = tools[0]
    session = bash.cove_session
    run(bash.call({"command": "true"}))
    first = session.sandbox.id
    run(AsyncSandbox.kill_by_id(first, url=server.url, api_key=server.api_key))
    session._extended_at = float("-inf")  # as if the timeout had passed
    assert run(bash.call({"command": "echo again"})) == "again"
    assert session.sandbox.id != first
    run(bash.close())


# ---------------------------------------------------------------------------------- the worker loop


def _now() -> str:
    return datetime.now(UTC).isoformat()


class FakeManagedAgents:
    """The work queue and session-events endpoints for one work item of one session."""

    def __init__(self, env_id: str, session_id: str, tool_uses: list[tuple[str, dict[str, Any]]]) -> None:
        self.env_id, self.session_id, self.work_id = env_id, session_id, "work_1"
        self.tool_uses = [(f"sevt_{i}", name, args) for i, (name, args) in enumerate(tool_uses)]
        self.results: dict[str, dict[str, Any]] = {}
        self.heartbeats = 0
        self.polls = 0
        self.stops: list[dict[str, Any]] = []
        self.auth: set[str] = set()
        self.downloads: list[str] = []
        self.answered = anyio.Event()
        self.stopped = anyio.Event()

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        self.auth.add(request.headers.get("authorization", ""))
        path, method = request.url.path, request.method
        work, session = f"/v1/environments/{self.env_id}/work", f"/v1/sessions/{self.session_id}"
        if (method, path) == ("GET", f"{work}/poll"):
            self.polls += 1
            if self.polls == 1:
                return httpx2.Response(200, json=self._work("starting"))
            await anyio.sleep(0.2)  # an empty long poll
            return httpx2.Response(200, content=b"null", headers={"content-type": "application/json"})
        if (method, path) == ("POST", f"{work}/{self.work_id}/ack"):
            return httpx2.Response(200, json=self._work("active"))
        if (method, path) == ("POST", f"{work}/{self.work_id}/heartbeat"):
            self.heartbeats += 1
            beat = {"last_heartbeat": _now(), "lease_extended": True, "state": "active", "ttl_seconds": 60}
            return httpx2.Response(200, json={"type": "work_heartbeat", **beat})
        if (method, path) == ("POST", f"{work}/{self.work_id}/stop"):
            self.stops.append(json.loads(request.content or b"{}"))
            self.stopped.set()
            return httpx2.Response(200, json=self._work("stopped"))
        if (method, path) == ("GET", "/v1/files/file_1/content"):
            self.downloads.append(request.headers.get("anthropic-beta", ""))
            return httpx2.Response(200, content=b"a,b\n1,2\n")
        if (method, path) == ("GET", session):
            return httpx2.Response(200, json=self._session())
        if (method, path) == ("GET", f"{session}/events"):
            return httpx2.Response(200, json={"data": [], "next_page": None})
        if (method, path) == ("POST", f"{session}/events"):
            for event in json.loads(request.content)["events"]:
                self.results[event["tool_use_id"]] = event
            if len(self.results) == len(self.tool_uses):
                self.answered.set()
            return httpx2.Response(200, json={"data": []})
        if (method, path) == ("GET", f"{session}/events/stream"):
            return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=self._stream())
        return httpx2.Response(
            404, json={"type": "error", "error": {"type": "not_found_error", "message": path}}
        )

    async def _stream(self) -> AsyncIterator[bytes]:
        for event_id, name, args in self.tool_uses:
            yield self._sse(
                {
                    "type": "agent.tool_use",
                    "id": event_id,
                    "name": name,
                    "input": args,
                    "processed_at": _now(),
                }
            )
        await self.answered.wait()
        yield self._sse({"type": "session.status_terminated", "id": "sevt_end", "processed_at": _now()})

    @staticmethod
    def _sse(event: dict[str, Any]) -> bytes:
        return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()

    def _work(self, state: str) -> dict[str, Any]:
        return {
            "type": "work",
            "id": self.work_id,
            "environment_id": self.env_id,
            "state": state,
            "created_at": _now(),
            "metadata": {},
            "data": {"type": "session", "id": self.session_id},
        }

    def _session(self) -> dict[str, Any]:
        agent = {"type": "agent", "id": "agent_1", "name": "t", "version": 1, "skills": [], "tools": []}
        return {
            "type": "session",
            "id": self.session_id,
            "status": "running",
            "environment_id": self.env_id,
            "created_at": _now(),
            "updated_at": _now(),
            "metadata": {},
            "resources": [
                {
                    "type": "file",
                    "id": "sesrsc_1",
                    "file_id": "file_1",
                    "mount_path": "/mnt/session/uploads/data.csv",
                    "created_at": _now(),
                    "updated_at": _now(),
                }
            ],
            "vault_ids": [],
            "agent": {**agent, "mcp_servers": [], "model": {"id": "claude"}},
        }


def test_worker_runs_a_session_in_a_sandbox(server: Server, run: Any, tmp_path: Path) -> None:
    session_id = f"sesn_{uuid.uuid4().hex[:12]}"
    token = uuid.uuid4().hex
    fake = FakeManagedAgents(
        "env_test",
        session_id,
        [
            (
                "bash",
                {"command": f"echo {token} | tee marker.txt; uname -n; cat /mnt/session/uploads/data.csv"},
            ),
            ("write", {"file_path": "out/hello.txt", "content": "from the agent"}),
        ],
    )
    client = AsyncAnthropic(
        api_key="x",
        base_url="http://anthropic.test",
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(fake.handle)),
    )
    # What `cove worker -n 2` runs: two EnvironmentWorker.run() loops with cove_tool_factory tools.
    serving = run_worker(
        environment_id="env_test",
        environment_key="envkey",
        concurrency=2,
        host_workdir=tmp_path,
        client=client,
        url=server.url,
        api_key=server.api_key,
    )

    async def serve_one() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: serving)
            await fake.stopped.wait()
            tg.cancel_scope.cancel()

    try:
        run(serve_one(), timeout=60)
        bash, write = (fake.results[f"sevt_{i}"] for i in range(2))
        assert bash["type"] == "user.tool_result" and not bash["is_error"]
        assert bash["content"] == [{"type": "text", "text": f"{token}\nsandbox\na,b\n1,2"}]
        assert write["content"] == [{"type": "text", "text": "wrote 14 bytes to out/hello.txt"}]
        assert fake.stops == [{"force": True}] and fake.heartbeats >= 1 and fake.auth == {"Bearer envkey"}
        assert fake.downloads == ["files-api-2025-04-14"]  # the session's file resource, fetched once
        assert fake.polls >= 2  # both loops polled; one got the item

        (info,) = run(_session_sandboxes(server, session_id))
        assert info.state == "hibernated"
        assert info.metadata["anthropic.environment"] == "env_test"
        sb = run(AsyncSandbox.connect(info.id, url=server.url, api_key=server.api_key))
        assert run(sb.files.read("/workspace/marker.txt")) == f"{token}\n"  # the bash call ran there
        assert run(sb.files.read("/workspace/out/hello.txt")) == "from the agent"
        run(sb.kill())
    finally:
        for info in run(_session_sandboxes(server, session_id)):
            run(AsyncSandbox.kill_by_id(info.id, url=server.url, api_key=server.api_key))


# ---------------------------------------------------------------------------------- CLI


def test_worker_cli_help_and_errors(server: Server) -> None:
    runner = CliRunner()
    env = {"COLUMNS": "200", "ANTHROPIC_ENVIRONMENT_KEY": "", "ANTHROPIC_ENVIRONMENT_ID": ""}
    help_text = runner.invoke(app, ["worker", "--help"], env=env).output
    for words in (
        "--environment-id",
        "ANTHROPIC_ENVIRONMENT_KEY",
        "--on-session-end",
        "hibernate|kill",
        "--single-item",
    ):
        assert words in help_text
    result = runner.invoke(app, ["worker"], env=env)
    assert result.exit_code == 1 and "no environment: pass --environment-id" in result.output
    result = runner.invoke(app, ["worker", "--environment-id", "env_1"], env=env)
    assert result.exit_code == 1 and "no environment key" in result.output
    result = runner.invoke(app, ["worker", "--environment-id", "env_1", "--on-session-end", "pause"], env=env)
    assert result.exit_code == 2 and "pause" in result.output


def test_worker_cli_without_anthropic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "anthropic", None)  # as if the extra were not installed
    result = CliRunner().invoke(
        app, ["worker", "--environment-id", "env_1"], env={"ANTHROPIC_ENVIRONMENT_KEY": "k"}
    )
    assert result.exit_code == 1 and "pip install 'cove[claude]'" in result.output
