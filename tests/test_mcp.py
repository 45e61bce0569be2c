"""cove's MCP server (cove.integrations.mcp_server, `cove mcp`): in-process, stdio, streamable HTTP, and
driven by an OpenAI agent (agents.testing.ScriptedModel, no API key)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from mcp import Client, StdioServerParameters

from cove.devserver import free_port
from cove.integrations.mcp_server import MANAGEMENT_TOOLS, create_server
from cove.integrations.toolset import TOOL_NAMES

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def text(result: Any) -> str:
    return "".join(c.text for c in result.content if c.type == "text")


def state_of(server: Any, sandbox_id: str) -> str:
    with server.client() as api:
        return api.get(f"/v1/sandboxes/{sandbox_id}").json()["state"]


@pytest.fixture
def kill_after(server: Any) -> Iterator[list[str]]:
    """Ids of sandboxes to kill at the end of the test, whatever happened."""
    ids: list[str] = []
    yield ids
    with server.client() as api:
        for sid in ids:
            api.delete(f"/v1/sandboxes/{sid}")


def test_schemas_are_anthropics(server: Any) -> None:
    pytest.importorskip("anthropic")
    from anthropic.lib.tools.agent_toolset import AgentToolContext, beta_agent_toolset_20260401

    theirs = {t.name: t.to_dict() for t in beta_agent_toolset_20260401(AgentToolContext(workdir="/tmp"))}

    async def main() -> None:
        async with Client(create_server(url=server.url, api_key=server.api_key)) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == set(TOOL_NAMES) | set(MANAGEMENT_TOOLS)
        for name, definition in theirs.items():
            assert tools[name].input_schema == definition["input_schema"], name
            assert tools[name].description == definition["description"]
        assert tools["sandbox_kill"].annotations.destructive_hint is True
        assert tools["sandbox_use"].input_schema["required"] == ["sandbox_id"]

    asyncio.run(main())


def test_in_process_session_creates_works_and_hibernates(server: Any, kill_after: list[str]) -> None:
    """The first tool call creates the session's sandbox; the session's end hibernates it; a new
    session bound to it (sandbox_id=) finds the files."""

    async def first() -> str:
        async with Client(create_server(url=server.url, api_key=server.api_key)) as client:
            r = await client.call_tool("bash", {"command": "cd /tmp && export X=41 && echo $((X+1))"})
            assert not r.is_error and text(r) == "42"
            assert text(await client.call_tool("bash", {"command": "pwd; echo $X"})) == "/tmp\n41"
            r = await client.call_tool("write", {"file_path": "proj/app.py", "content": "print('hi')\n"})
            assert text(r) == "wrote 12 bytes to proj/app.py"
            r = await client.call_tool(
                "edit", {"file_path": "proj/app.py", "old_string": "hi", "new_string": "yo"}
            )
            assert text(r) == "edited proj/app.py (1 replacement(s))"
            assert (
                text(await client.call_tool("read", {"file_path": "/home/user/proj/app.py"}))
                == "print('yo')\n"
            )
            assert text(await client.call_tool("glob", {"pattern": "**/*.py"})) == "/home/user/proj/app.py"
            r = await client.call_tool("grep", {"pattern": "yo", "path": "proj"})
            assert text(r) == "/home/user/proj/app.py:1:print('yo')"
            # Errors are tool errors with the toolset's words; the server goes on.
            r = await client.call_tool(
                "edit", {"file_path": "proj/app.py", "old_string": "zz", "new_string": "y"}
            )
            assert r.is_error and text(r) == "edit: old_string not found in proj/app.py"
            r = await client.call_tool("bash", {"command": "(exit 3)"})
            assert r.is_error and text(r) == "exit code 3"
            r = await client.call_tool("read", {"file_path": 5})
            assert r.is_error and "file_path" in text(r)
            # Images come back as MCP image content.
            await client.call_tool(
                "bash", {"command": f"echo {base64.b64encode(PNG).decode()} | base64 -d > ~/dot.png"}
            )
            r = await client.call_tool("read", {"file_path": "dot.png"})
            assert not r.is_error, text(r)
            [image] = r.content
            assert image.type == "image" and image.mime_type == "image/png"
            assert base64.b64decode(image.data) == PNG
            listed = json.loads(text(await client.call_tool("sandbox_list", {})))
            [mine] = [s for s in listed if s["current"]]
            kill_after.append(mine["id"])
            assert mine["state"] == "running"
            return mine["id"]

    sandbox_id = asyncio.run(first())
    assert state_of(server, sandbox_id) == "hibernated"

    async def second() -> None:
        server_ = create_server(url=server.url, api_key=server.api_key, sandbox_id=sandbox_id, on_end="keep")
        async with Client(server_) as client:
            assert text(await client.call_tool("read", {"file_path": "proj/app.py"})) == "print('yo')\n"
            # A fresh shell: the session's variables are gone, the files are not.
            assert text(await client.call_tool("bash", {"command": "pwd; echo [$X]"})) == "/home/user\n[]"

    asyncio.run(second())
    assert state_of(server, sandbox_id) == "running"  # on_end="keep"


def test_management_tools(server: Any, kill_after: list[str]) -> None:
    async def main() -> None:
        async with Client(create_server(url=server.url, api_key=server.api_key, on_end="kill")) as client:

            async def call(name: str, args: dict[str, Any]) -> Any:
                r = await client.call_tool(name, args)
                assert not r.is_error, text(r)
                return json.loads(text(r)) if text(r)[:1] in "[{" else text(r)

            a = await call("sandbox_create", {"metadata": {"purpose": "test"}})
            kill_after.append(a["id"])
            assert a["current"] and a["state"] == "running" and a["metadata"]["purpose"] == "test"
            await call("write", {"file_path": "a.txt", "content": "from a"})
            b = await call("sandbox_create", {"use": False})
            kill_after.append(b["id"])
            assert not b["current"]
            # A program can aim one call elsewhere with sandbox_id; the current sandbox stays.
            await call("write", {"file_path": "b.txt", "content": "from b", "sandbox_id": b["id"]})
            r = await client.call_tool("read", {"file_path": "b.txt"})
            assert r.is_error and text(r) == "read: b.txt: no such file or directory"
            assert (await call("sandbox_use", {"sandbox_id": b["id"]}))["current"]
            assert await call("read", {"file_path": "b.txt"}) == "from b"
            await call("sandbox_use", {"sandbox_id": a["id"]})

            snap = await call("sandbox_snapshot", {"name": "a-files"})
            c = await call("sandbox_create", {"snapshot": snap["snapshot_id"], "use": False})
            kill_after.append(c["id"])
            assert await call("read", {"file_path": "a.txt", "sandbox_id": c["id"]}) == "from a"
            forks = (await call("sandbox_fork", {"count": 2}))["sandbox_ids"]
            kill_after.extend(forks)
            assert len(forks) == 2
            assert await call("bash", {"command": "cat a.txt", "sandbox_id": forks[1]}) == "from a"

            ids = {s["id"] for s in await call("sandbox_list", {})}
            assert {a["id"], b["id"], c["id"], *forks} <= ids
            assert await call("sandbox_kill", {"sandbox_id": b["id"]}) == f"killed {b['id']}"
            assert b["id"] not in {s["id"] for s in await call("sandbox_list", {})}
            r = await client.call_tool("sandbox_use", {"sandbox_id": "sb_doesnotexist"})
            assert r.is_error and "not found" in text(r) and "sandbox_create makes a new sandbox" in text(r)
            r = await client.call_tool("bash", {"command": "true", "sandbox_id": b["id"]})  # killed
            assert r.is_error and "sandbox_create makes a new sandbox" in text(r), text(r)
            # Killing the current sandbox: the next call makes a new one.
            await call("sandbox_kill", {})
            assert state_of(server, a["id"]) == "killed"
            assert await call("bash", {"command": "ls a.txt 2>&1 || echo none"}) == (
                "ls: cannot access 'a.txt': No such file or directory\nnone"
            )
            [new] = [s for s in await call("sandbox_list", {}) if s["current"]]
            kill_after.append(new["id"])
            assert new["id"] != a["id"]
            with server.client() as api:
                api.delete(f"/v1/snapshots/{snap['snapshot_id']}")

    asyncio.run(main())


def test_expose_port(server: Any, kill_after: list[str]) -> None:
    async def main() -> None:
        async with Client(create_server(url=server.url, api_key=server.api_key, on_end="kill")) as client:
            r = await client.call_tool(
                "bash",
                {"command": "mkdir -p site && echo hello-port > site/index.html && "
                 "(cd site && nohup python3 -m http.server 8123 --bind 127.0.0.1 >/dev/null 2>&1 &) && sleep 0.5"},
            )  # fmt: skip
            assert not r.is_error, text(r)
            listed = json.loads(text(await client.call_tool("sandbox_list", {})))
            kill_after.extend(s["id"] for s in listed if s["current"])
            url = text(await client.call_tool("expose_port", {"port": 8123, "by": "path"}))
            r = await client.call_tool("expose_port", {"port": 70000})
            assert r.is_error and "1-65535" in text(r)
            assert url.startswith(server.url + "/v1/sandboxes/")
            async with httpx.AsyncClient() as http:
                response = await http.get(url)  # no API key: the URL is signed
            assert response.status_code == 200 and response.text == "hello-port\n"

    asyncio.run(main())


# --- out of process: stdio and streamable HTTP --------------------------------------------------------


def cove_env(server: Any) -> dict[str, str]:
    return {**server.env, "PYTHONUNBUFFERED": "1"}


def test_stdio(server: Any, kill_after: list[str]) -> None:
    params = StdioServerParameters(command=sys.executable, args=["-m", "cove", "mcp"], env=cove_env(server))

    async def main() -> str:
        async with Client(params) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            assert set(TOOL_NAMES) <= names
            await client.call_tool("bash", {"command": "export N=7"})
            assert text(await client.call_tool("bash", {"command": "echo $N"})) == "7"
            r = await client.call_tool("read", {"file_path": "/nope"})
            assert r.is_error and text(r) == "read: /nope: no such file or directory"
            listed = json.loads(text(await client.call_tool("sandbox_list", {})))
            [mine] = [s["id"] for s in listed if s["current"]]
            kill_after.append(mine)
            return mine

    sandbox_id = asyncio.run(main())
    deadline = time.monotonic() + 20
    while state_of(server, sandbox_id) != "hibernated" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert state_of(server, sandbox_id) == "hibernated"  # the stdio session ended: hibernated


def test_stdio_sigterm_still_hibernates(server: Any, kill_after: list[str]) -> None:
    """A client that ends the server with SIGTERM instead of closing stdin: the session still ends cleanly."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cove", "mcp"],
        env=cove_env(server),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdin is not None and proc.stdout is not None

    def rpc(message: dict[str, Any]) -> dict[str, Any] | None:
        proc.stdin.write((json.dumps({"jsonrpc": "2.0", **message}) + "\n").encode())  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        return json.loads(proc.stdout.readline()) if "id" in message else None  # type: ignore[union-attr]

    try:
        init = {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        }
        assert "result" in rpc({"id": 1, "method": "initialize", "params": init})  # type: ignore[operator]
        rpc({"method": "notifications/initialized"})
        call = {"name": "sandbox_list", "arguments": {}}
        rpc({"id": 2, "method": "tools/call", "params": {"name": "bash", "arguments": {"command": "true"}}})
        reply = rpc({"id": 3, "method": "tools/call", "params": call})
        listed = json.loads(reply["result"]["content"][0]["text"])  # type: ignore[index]
        [sandbox_id] = [s["id"] for s in listed if s["current"]]
        kill_after.append(sandbox_id)
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert state_of(server, sandbox_id) == "hibernated"


@pytest.fixture
def http_server(server: Any) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cove", "mcp", "--transport", "http", "--port", str(port), "--on-end", "kill"],
        env=cove_env(server),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}/mcp"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(url, timeout=1)
            break
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(
                    f"cove mcp --transport http did not start: {proc.stderr.read().decode()}"
                ) from None
            time.sleep(0.1)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_streamable_http(server: Any, http_server: str, kill_after: list[str]) -> None:
    async def main() -> None:
        async with Client(http_server) as client:
            r = await client.call_tool("write", {"file_path": "h.txt", "content": "over http"})
            assert text(r) == "wrote 9 bytes to h.txt"
            assert text(await client.call_tool("read", {"file_path": "h.txt"})) == "over http"
            r = await client.call_tool("edit", {"file_path": "h.txt", "old_string": "x", "new_string": "y"})
            assert r.is_error and text(r) == "edit: old_string not found in h.txt"
            listed = json.loads(text(await client.call_tool("sandbox_list", {})))
            kill_after.extend(s["id"] for s in listed if s["current"])

    asyncio.run(main())


def test_openai_agent_through_mcp_stdio(server: Any, kill_after: list[str]) -> None:
    """A plain OpenAI agent whose scripted tool calls go through `cove mcp` over stdio."""
    pytest.importorskip("agents")
    from agents import Agent, RunConfig, Runner
    from agents.mcp import MCPServerStdio
    from agents.testing import ScriptedModel, assistant_message, function_call

    model = ScriptedModel(
        [
            [
                function_call(
                    "write", {"file_path": "agent/out.txt", "content": "written by the agent"}, call_id="c1"
                )
            ],
            [function_call("bash", {"command": "cat agent/out.txt | tr a-z A-Z"}, call_id="c2")],
            [function_call("sandbox_list", {}, call_id="c3")],
            [assistant_message("done")],
        ]
    )

    async def main() -> Any:
        params = {
            "command": sys.executable,
            "args": ["-m", "cove", "mcp", "--on-end", "kill"],
            "env": cove_env(server),
        }
        async with MCPServerStdio(
            params=params, name="cove", client_session_timeout_seconds=60
        ) as mcp_server:
            agent = Agent(name="worker", model=model, mcp_servers=[mcp_server])
            return await Runner.run(agent, "write a file", run_config=RunConfig(tracing_disabled=True))

    result = asyncio.run(main())
    assert result.final_output == "done"
    outputs = [item.output for item in result.new_items if item.type == "tool_call_output_item"]
    assert outputs[0] == {"type": "text", "text": "wrote 20 bytes to agent/out.txt"}
    assert outputs[1] == {"type": "text", "text": "WRITTEN BY THE AGENT"}
    listed = json.loads(outputs[2]["text"])
    [mine] = [s["id"] for s in listed if s["current"]]
    kill_after.append(mine)
    assert state_of(server, mine) == "killed"  # --on-end kill


def test_http_sessions_each_get_a_sandbox_ended_with_the_session(
    server: Any, http_server: str, kill_after: list[str]
) -> None:
    """Clients with an Mcp-Session-Id (the handshake era, as Claude Code speaks) each get their own
    sandbox, which ends with their session while the server goes on (--on-end kill here)."""

    async def current(client: Client) -> str:
        listed = json.loads(text(await client.call_tool("sandbox_list", {})))
        [mine] = [s["id"] for s in listed if s["current"]]
        kill_after.append(mine)
        return mine

    async def main() -> None:
        async with Client(http_server, mode="legacy") as one:
            await one.call_tool("bash", {"command": "export WHO=one"})
            async with Client(http_server, mode="legacy") as two:
                await two.call_tool("bash", {"command": "export WHO=two"})
                assert text(await one.call_tool("bash", {"command": "echo $WHO"})) == "one"
                assert text(await two.call_tool("bash", {"command": "echo $WHO"})) == "two"
                first, second = await current(one), await current(two)
                assert first != second
            deadline = time.monotonic() + 20
            while state_of(server, second) != "killed" and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert state_of(server, second) == "killed"
            assert state_of(server, first) == "running"  # the other session goes on
            assert text(await one.call_tool("bash", {"command": "echo $WHO"})) == "one"

    asyncio.run(main())


def test_cli_help_teaches() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cove", "mcp", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    for needle in ("--transport", "--sandbox", "--on-end", "sandbox_use", "claude mcp add cove", "/mcp"):
        assert needle in done.stdout, needle
