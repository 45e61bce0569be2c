"""The OpenAI Agents SDK's own E2B sandbox provider, unmodified, running an agent's tools in cove.

A scripted model (`agents.testing.ScriptedModel`: no API key, no network) plays the model; the tool
calls it makes are really executed in a cove sandbox that the provider creates, fills from the
manifest, drives and kills through the e2b SDK, configured only by the `e2b_env` fixture's three
variables. The assertions are on what those tool calls produced.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from agents import RunConfig, Runner
from agents.extensions.sandbox.e2b import E2BSandboxClient, E2BSandboxClientOptions
from agents.sandbox import Manifest, SandboxAgent, SandboxRunConfig
from agents.sandbox.entries import File
from agents.testing import ScriptedModel, assistant_message, function_call

from conftest import Server

pytestmark = pytest.mark.timeout(300)
WORKSPACE = "/workspace"  # the SDK's default root: created through the files API, as on e2b


def _outputs(model: ScriptedModel) -> dict[str, str]:
    """The tools' outputs the model was shown, by call id."""
    found: dict[str, str] = {}
    for call in model.calls:
        items = call.input if isinstance(call.input, list) else []
        for item in items:
            entry = item if isinstance(item, dict) else item.model_dump()  # type: ignore[union-attr]
            if entry.get("type") == "function_call_output":
                output = entry.get("output")
                found[entry["call_id"]] = output if isinstance(output, str) else str(output)
    return found


def _cove_sandboxes(server: Server) -> dict[str, dict[str, Any]]:
    with server.client() as api:
        r = api.get("/v1/sandboxes", params={"limit": 1000, "state": ["running", "killed", "paused"]})
        assert r.status_code == 200, r.text
        return {sb["id"]: sb for sb in r.json()["items"]}


@pytest.mark.parametrize("sandbox_type", ["e2b", "e2b_code_interpreter"])
def test_scripted_agent_runs_its_tools_in_a_cove_sandbox(e2b_env: Server, sandbox_type: str) -> None:
    model = ScriptedModel(
        [
            [
                function_call(
                    "exec_command",
                    {"cmd": "cat brief.txt && python3 -c 'print(6 * 7)' > answer.txt && ls"},
                    call_id="write",
                )
            ],
            [function_call("exec_command", {"cmd": "cat answer.txt; id -un; pwd; uname -s"}, call_id="read")],
            [function_call("exec_command", {"cmd": "exit 3"}, call_id="fail")],
            [assistant_message("The answer is in answer.txt.")],
        ]
    )
    agent = SandboxAgent(
        name="cove worker",
        instructions="Do the task with the shell.",
        model=model,
        default_manifest=Manifest(entries={"brief.txt": File(content=b"compute six times seven\n")}),
    )
    before = set(_cove_sandboxes(e2b_env))

    async def main() -> Any:
        config = RunConfig(
            sandbox=SandboxRunConfig(
                client=E2BSandboxClient(),
                options=E2BSandboxClientOptions(sandbox_type=sandbox_type, timeout=300),
            ),
            tracing_disabled=True,
        )
        return await Runner.run(agent, "Compute 6 * 7 into answer.txt.", run_config=config)

    result = asyncio.run(main())
    assert result.final_output == "The answer is in answer.txt."
    assert model.remaining_steps == 0

    out = _outputs(model)
    assert "compute six times seven" in out["write"] and "answer.txt" in out["write"]
    assert "Process exited with code 0" in out["write"]
    read = out["read"]
    assert "42" in read and f"user\n{WORKSPACE}\nLinux" in read, read
    assert "Process exited with code 0" in read
    assert "Process exited with code 3" in out["fail"]

    # The work happened in a cove sandbox, which the provider killed at the end.
    after = _cove_sandboxes(e2b_env)
    made = set(after) - before
    assert len(made) == 1, after
    assert after[made.pop()]["state"] == "killed"


def test_provider_reports_a_bad_key_clearly(e2b_env: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2B_API_KEY", "cove_not_a_key")
    model = ScriptedModel([[assistant_message("unused")]])
    agent = SandboxAgent(name="w", instructions="x", model=model)

    async def main() -> None:
        config = RunConfig(
            sandbox=SandboxRunConfig(
                client=E2BSandboxClient(), options=E2BSandboxClientOptions(sandbox_type="e2b")
            ),
            tracing_disabled=True,
        )
        await Runner.run(agent, "hi", run_config=config)

    with pytest.raises(Exception) as failed:
        asyncio.run(main())
    assert (
        "401" in str(failed.value)
        or "auth" in str(failed.value).lower()
        or "key" in str(failed.value).lower()
    )
    with httpx.Client() as c:
        assert c.get(f"{e2b_env.url}/healthz").status_code == 200
