"""Claude Managed Agents' six tools (cove.integrations.toolset) against a real sandbox."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from cove import AsyncSandbox
from cove.integrations.toolset import TOOL_DEFINITIONS, BashError, Toolset, ToolsetError

T = TypeVar("T")

# A 1x1 PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


@pytest.fixture(scope="module")
def sandbox_id(server: Any) -> Iterator[str]:
    """One sandbox for the module: each test works in its own directory."""
    with server.client() as api:
        r = api.post("/v1/sandboxes", json={"timeout": 600})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        yield sid
        api.delete(f"/v1/sandboxes/{sid}")


def run(server: Any, sandbox_id: str, body: Callable[[Toolset], Awaitable[T]], **kwargs: Any) -> T:
    async def main() -> T:
        sb = await AsyncSandbox.connect(sandbox_id, url=server.url, api_key=server.api_key)
        try:
            async with Toolset(sb, **kwargs) as tools:
                return await body(tools)
        finally:
            await sb.close()

    return asyncio.run(main())


def test_bash_keeps_cwd_and_exports_and_restart_resets(server: Any, sandbox_id: str) -> None:
    async def body(tools: Toolset) -> None:
        assert await tools.bash(command="mkdir -p /tmp/t1 && cd /tmp/t1 && export GREETING=hi") == ""
        assert await tools.bash(command="pwd; echo $GREETING") == "/tmp/t1\nhi"
        assert await tools.bash(command="echo out; echo err >&2") == "out\nerr"  # stderr merged
        # A command reading stdin gets EOF instead of swallowing the next command.
        assert await tools.bash(command="cat; echo after") == "after"
        assert await tools.bash(restart=True) == "bash session restarted"
        assert await tools.bash(command="pwd; echo [$GREETING]") == "/home/user\n[]"

    run(server, sandbox_id, body)


def test_bash_errors_and_exit_codes(server: Any, sandbox_id: str) -> None:
    async def body(tools: Toolset) -> None:
        with pytest.raises(BashError) as e:
            await tools.bash(command="echo partial; exit_with() { return 3; }; exit_with")
        assert str(e.value) == "partial" and e.value.exit_code == 3
        with pytest.raises(BashError, match="exit code 1"):  # no output: the code is the text
            await tools.bash(command="false")
        with pytest.raises(ToolsetError, match=r"^bash: command is required$"):
            await tools.bash()
        # Output written by a background job between calls shows up in the next call, not lost.
        await tools.bash(command="(sleep 0.2; echo late) &")
        await asyncio.sleep(0.5)
        assert "late" in await tools.bash(command="echo now")
        # Output that is not UTF-8 does not break the framing of later calls.
        await tools.bash(command="printf '\\xff\\xfe\\xc3'; echo")
        assert await tools.bash(command="echo still") == "still"
        # Exiting the shell ends the session: a restart is needed, as in the reference. (The shell
        # may exit while the rest of the wrapped command is still being written: then the call
        # itself already reports the ended session.)
        with pytest.raises(ToolsetError):
            await tools.bash(command="exit 0")
        with pytest.raises(ToolsetError, match="restart required"):
            await tools.bash(command="echo x")
        await tools.bash(restart=True)
        assert await tools.bash(command="echo back") == "back"

    run(server, sandbox_id, body)


def test_bash_timeout_kills_the_command(server: Any, sandbox_id: str) -> None:
    async def body(tools: Toolset) -> None:
        await tools.bash(command="echo $$ > /tmp/shell.pid")
        started = time.monotonic()
        with pytest.raises(ToolsetError, match=r"^bash: bash command timed out after 0\.5s$"):
            await tools.bash(command="sleep 30; echo never > /tmp/never", timeout_ms=500)
        assert time.monotonic() - started < 5
        with pytest.raises(ToolsetError, match="restart required"):
            await tools.bash(command="echo x")
        await tools.bash(restart=True)
        # The shell and its sleep are gone.
        await asyncio.sleep(0.3)
        out = await tools.bash(
            command="kill -0 $(cat /tmp/shell.pid) 2>&1 || echo gone; pgrep -x sleep || true"
        )
        assert "gone" in out and out.strip().endswith("gone")

    run(server, sandbox_id, body)


def test_bash_large_output_keeps_the_tail(server: Any, sandbox_id: str) -> None:
    async def body(tools: Toolset) -> None:
        out = await tools.bash(command="seq 1 60000")
        assert out.startswith("[output truncated]\n") and out.endswith("\n60000")
        assert len(out) <= 100 * 1024 + 20
        assert await tools.bash(command="echo next") == "next"

    run(server, sandbox_id, body)


def test_write_read_view_range_and_relative_paths(server: Any, sandbox_id: str) -> None:
    async def body(tools: Toolset) -> None:
        text = "one\ntwo\nthree\nfour\n"
        assert await tools.write("rw/notes.txt", text) == f"wrote {len(text)} bytes to rw/notes.txt"
        assert await tools.read("/home/user/rw/notes.txt") == text  # relative = under the workdir
        assert await tools.read("rw/notes.txt", view_range=[2, 3]) == "two\nthree"
        assert await tools.read("rw/notes.txt", view_range=[3, 0]) == "three\nfour\n"
        assert await tools.read("rw/./../rw/notes.txt", view_range=[4, -1]) == "four\n"
        with pytest.raises(ToolsetError, match=r"view_range must be \[start_line, end_line\]"):
            await tools.read("rw/notes.txt", view_range=[1])
        with pytest.raises(ToolsetError, match=r"^read: rw/missing\.txt: no such file or directory$"):
            await tools.read("rw/missing.txt")
        with pytest.raises(ToolsetError, match=r"^read: rw: not a regular file$"):
            await tools.read("rw")
        await tools.bash(command="printf '\\xff\\xfe' > rw/blob.bin")
        with pytest.raises(ToolsetError, match="not valid UTF-8 text"):
            await tools.read("rw/blob.bin")
        with pytest.raises(ToolsetError, match="permission denied"):
            await tools.write("/root/x.txt", "no")

    run(server, sandbox_id, body)


def test_read_large_files_need_a_view_range(server: Any, sandbox_id: str) -> None:
    async def body(tools: Toolset) -> None:
        await tools.bash(command="mkdir -p big && seq 1 5000 > big/nums.txt")  # 23893 bytes
        with pytest.raises(ToolsetError, match=r"exceeds 1000-byte limit\. Use the view_range"):
            await tools.read("big/nums.txt")
        assert await tools.read("big/nums.txt", view_range=[4998, 5000]) == "4998\n4999\n5000"
        assert await tools.read("big/nums.txt", view_range=[10, 12]) == "10\n11\n12"
        with pytest.raises(
            ToolsetError, match=r"view_range \[1, 0\] of big/nums.txt exceeds 1000-byte limit"
        ):
            await tools.read("big/nums.txt", view_range=[1, 0])

    run(server, sandbox_id, body, max_file_bytes=1000)


def test_read_images_and_pdfs_as_content_blocks(server: Any, sandbox_id: str) -> None:
    async def body(tools: Toolset) -> None:
        await tools.sandbox.files.write("/home/user/img/dot.png", PNG)
        await tools.sandbox.files.write("/home/user/img/doc.pdf", b"%PDF-1.4 tiny")
        [block] = await tools.read("img/dot.png")  # type: ignore[misc]
        assert block == {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(PNG).decode()},
        }
        [doc] = await tools.read("img/doc.pdf")  # type: ignore[misc]
        assert doc["type"] == "document" and doc["source"]["media_type"] == "application/pdf"
        assert base64.b64decode(doc["source"]["data"]) == b"%PDF-1.4 tiny"
        with pytest.raises(ToolsetError, match="view_range is not supported for image/PDF files"):
            await tools.read("img/dot.png", view_range=[1, 2])

    run(server, sandbox_id, body)


def test_edit_replaces_and_refuses_missing_or_ambiguous(server: Any, sandbox_id: str) -> None:
    async def body(tools: Toolset) -> None:
        await tools.write("ed/a.py", "x = 1\ny = 1\nz = 2\n")
        assert await tools.edit("ed/a.py", "z = 2", "z = 3") == "edited ed/a.py (1 replacement(s))"
        with pytest.raises(ToolsetError, match=r"^edit: old_string not found in ed/a\.py$"):
            await tools.edit("ed/a.py", "w = 0", "w = 1")
        with pytest.raises(
            ToolsetError, match=r"^edit: old_string appears 2 times in ed/a.py \(must be unique\)$"
        ):
            await tools.edit("ed/a.py", "= 1", "= 5")
        assert await tools.read("ed/a.py") == "x = 1\ny = 1\nz = 3\n"  # refused edits change nothing
        assert (
            await tools.edit("ed/a.py", "= 1", "= 5", replace_all=True) == "edited ed/a.py (2 replacement(s))"
        )
        assert await tools.read("ed/a.py") == "x = 5\ny = 5\nz = 3\n"
        with pytest.raises(ToolsetError, match=r"^edit: ed/none\.py: no such file or directory$"):
            await tools.edit("ed/none.py", "a", "b")

    run(server, sandbox_id, body)


def test_glob_and_grep(server: Any, sandbox_id: str) -> None:
    async def body(tools: Toolset) -> None:
        await tools.write("g/src/old.py", "import os\n")
        await tools.bash(command="sleep 0.05")  # mtimes differ: newest first
        await tools.write("g/src/pkg/new.py", "import sys\nprint('needle')\n")
        await tools.write("g/README.md", "a needle here\n")
        await tools.write("g/.git/config", "needle\n")
        assert await tools.glob("**/*.py", path="g") == "/home/user/g/src/pkg/new.py\n/home/user/g/src/old.py"
        assert await tools.glob("*.md", path="/home/user/g") == "/home/user/g/README.md"
        assert await tools.glob("*.nothing") == "no matches"
        with pytest.raises(ToolsetError, match="absolute pattern not permitted"):
            await tools.glob("/etc/*")
        with pytest.raises(ToolsetError, match=r"'\.\.' is not permitted"):
            await tools.glob("../*")
        out = await tools.grep("need+le", path="g")
        assert sorted(out.splitlines()) == [
            "/home/user/g/README.md:1:a needle here",
            "/home/user/g/src/pkg/new.py:2:print('needle')",
        ]  # .git is skipped
        assert await tools.grep("^import", path="g/src/old.py") == "/home/user/g/src/old.py:1:import os"
        assert await tools.grep("absent-word", path="g") == "no matches"
        with pytest.raises(ToolsetError, match=r"^grep: invalid regex: "):
            await tools.grep("(unclosed", path="g")

    run(server, sandbox_id, body)


def test_call_dispatches_and_checks_arguments(server: Any, sandbox_id: str) -> None:
    async def body(tools: Toolset) -> None:
        assert await tools.call("bash", {"command": "echo via-call", "extra": 1}) == "via-call"
        assert (
            await tools.call("write", {"file_path": "c/x.txt", "content": "hi"}) == "wrote 2 bytes to c/x.txt"
        )
        with pytest.raises(ToolsetError, match=r"^read: file_path is required$"):
            await tools.call("read", {})
        with pytest.raises(ToolsetError, match=r"^read: view_range must be a list of integers$"):
            await tools.call("read", {"file_path": "c/x.txt", "view_range": ["1", 2]})
        with pytest.raises(ToolsetError, match=r"^bash: timeout_ms must be an integer$"):
            await tools.call("bash", {"command": "true", "timeout_ms": True})
        with pytest.raises(ToolsetError, match="unknown tool 'rm'"):
            await tools.call("rm", {})

    run(server, sandbox_id, body)


def test_definitions_match_anthropic() -> None:
    """The six definitions are anthropic 2.14.0's, field for field."""
    pytest.importorskip("anthropic")
    from anthropic.lib.tools.agent_toolset import AgentToolContext, beta_agent_toolset_20260401

    theirs = [t.to_dict() for t in beta_agent_toolset_20260401(AgentToolContext(workdir="/tmp"))]
    assert theirs == TOOL_DEFINITIONS
