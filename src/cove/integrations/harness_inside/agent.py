"""An OpenAI Agents SDK loop meant to run *inside* a cove sandbox, one long-lived process per agent.

It needs only the `agents` package (openai-agents) and the standard library: cove is not importable
in the sandbox. Protocol, one JSON object per line: a turn comes in on stdin as
``{"message": "..."}`` and its answer goes out on stdout as
``{"turn": N, "reply": "...", "items": M}`` (``M``: items in the conversation so far), or
``{"turn": N, "error": "..."}`` when the turn failed (the loop goes on). Logs go to stderr.

The conversation lives in this process's memory only (nothing about it is written to disk), so it
survives exactly what keeps the process: pause, hibernation with memory, a server restart. The model
is reached at ``OPENAI_BASE_URL`` through the sandbox's egress proxy; ``OPENAI_API_KEY`` is a
placeholder, the proxy sets the real ``Authorization`` header host-side (docs/harness-inside.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

from agents import Agent, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
from openai import AsyncOpenAI

INSTRUCTIONS = "You are an agent living in a sandbox. Use the sh tool to act; answer briefly."


@function_tool
def sh(cmd: str) -> str:
    """Run a shell command in this sandbox and return its output (stdout, then stderr).

    Args:
        cmd: the command, run with bash.
    """
    done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    return done.stdout + done.stderr + ("" if done.returncode == 0 else f"[exit {done.returncode}]")


def build_agent() -> Agent[Any]:
    # The API key is a placeholder; `max_retries`: a model call that fails while the server restarts
    # is retried by the client rather than lost.
    client = AsyncOpenAI(api_key=os.environ.get("OPENAI_API_KEY") or "unused", max_retries=5)
    model = OpenAIChatCompletionsModel(model=os.environ.get("AGENT_MODEL", "gpt-5.1"), openai_client=client)
    return Agent(name="inside", instructions=INSTRUCTIONS, model=model, tools=[sh])


def say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main() -> None:
    set_tracing_disabled(True)  # traces would go to api.openai.com, which the policy refuses
    agent = build_agent()
    history: list[Any] = []  # the conversation: memory only
    turn = 0
    say({"ready": True, "pid": os.getpid()})
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            return  # stdin closed: the session is over
        if not line.strip():
            continue
        turn += 1
        try:
            message = str(json.loads(line)["message"])
            result = await Runner.run(agent, [*history, {"role": "user", "content": message}])
        except Exception as e:  # a turn's failure is reported and the loop waits for the next
            say({"turn": turn, "error": f"{type(e).__name__}: {e}"})
            continue
        history = result.to_input_list()
        say({"turn": turn, "reply": str(result.final_output), "items": len(history)})


if __name__ == "__main__":
    asyncio.run(main())
