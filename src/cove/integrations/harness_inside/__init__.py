"""The harness inside the sandbox: an agent's own loop as a long-lived process in a cove sandbox
(docs/harness-inside.md).

- :func:`template` builds a template with the agent script (``agent.py`` here, at
  :data:`AGENT_PATH`) and the Python packages it needs, copied from the *host's* installed
  distributions (no package index needed: it works offline, and the versions are the host's).
  The base template's Python is the host's ``/usr/bin/python3``, so compiled wheels match.
- :class:`InsideAgent` starts the loop in a sandbox and drives it turn by turn over the process's
  stdin and stdout (cove's process API), so a driver needs no port into the sandbox. It keeps only
  the process id and the output offset: reconnect after a restart with :meth:`InsideAgent.attach`.

The model API key is never given to the sandbox: create it with
``network={"mode": "allow", "allow": [MODEL_HOST], "inject": {MODEL_HOST: {"Authorization": "Bearer ..."}}}``
and the egress proxy adds the header host-side (docs/network.md#credentials-headers-the-proxy-adds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

from cove.sdk import _processes
from cove.sdk.sync import Sandbox
from cove.sdk.templates import Template, TemplateInfo

AGENT = Path(__file__).with_name("agent.py")
ROOT = "/opt/harness"  # in the template: the agent and its packages
AGENT_PATH = f"{ROOT}/agent.py"
SITE = f"{ROOT}/site-packages"
PACKAGES = ("openai-agents",)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(requirements: Iterable[str]) -> list[metadata.Distribution]:
    """The installed distributions `requirements` name and everything they depend on (their
    unconditional requirements and those whose markers hold here; extras are not followed)."""
    from packaging.requirements import Requirement  # pip's and the venv's; only needed here

    found: dict[str, metadata.Distribution] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        key = _canonical(req.name)
        if key in found:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise LookupError(f"{req.name} is not installed on this host (pip install it first)") from None
        found[key] = dist
        for text in dist.requires or []:
            dep = Requirement(text)
            if dep.marker is None or dep.marker.evaluate({"extra": ""}):
                todo.append(dep)
    return sorted(found.values(), key=lambda d: _canonical(d.metadata["Name"]))


def stage(requirements: Iterable[str], into: Path) -> Path:
    """Copy the files of `requirements`' closure as installed (site-packages-relative, with their
    ``.dist-info``, without bytecode caches) into `into`; returns it."""
    into.mkdir(parents=True, exist_ok=True)
    for dist in closure(requirements):
        base = Path(str(dist.locate_file("")))
        for entry in dist.files or []:
            rel = Path(str(entry))
            if rel.is_absolute() or ".." in rel.parts or "__pycache__" in rel.parts:
                continue  # scripts outside site-packages; caches are rebuilt from the sources
            src = base / rel
            if src.is_file():
                dst = into / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
    return into


def template(
    name: str = "harness-openai-agents",
    packages: Iterable[str] = PACKAGES,
    *,
    url: str | None = None,
    api_key: str | None = None,
    on_log: Callable[[str], None] | None = None,
) -> TemplateInfo:
    """Build (or find cached: the server skips steps whose layers exist) a template from ``base``
    with the agent at :data:`AGENT_PATH` and `packages` from this host at :data:`SITE`, importable by
    the sandbox's ``python3`` (``PYTHONPATH``); the bytecode is compiled at build time."""
    with tempfile.TemporaryDirectory(prefix="cove-harness-") as tmp:
        site = stage(packages, Path(tmp) / "site-packages")
        tpl = (
            Template(name, url=url, api_key=api_key)
            .from_base("base")
            .copy(site, f"{SITE}/")
            .copy(AGENT, f"{ROOT}/")
            # Compiled here, once: the sandbox's user cannot write caches into the template's files.
            .run(f"python3 -m compileall -q -j 0 {SITE} {AGENT_PATH} >/dev/null")
            .env({"PYTHONPATH": SITE})
        )
        return tpl.build(on_log=on_log)


class AgentFailed(RuntimeError):
    """The loop exited, or answered a turn with an error."""


class InsideAgent:
    """The agent loop running in `sandbox` as process `process_id`; its replies are read from its
    stdout from `offset` on."""

    def __init__(self, sandbox: Sandbox, process_id: str, offset: int = 0) -> None:
        self.sandbox = sandbox
        self.process_id = process_id
        self.offset = offset
        self._buffer = ""

    @classmethod
    def start(
        cls,
        sandbox: Sandbox,
        *,
        base_url: str,
        env: Mapping[str, str] | None = None,
        cmd: str = f"python3 {AGENT_PATH}",
        timeout: float = 120,
    ) -> InsideAgent:
        """Start the loop with the model at `base_url` (e.g. ``http://model.internal:8000/v1``,
        reached through the proxy) and wait until it is ready. No key is passed: the proxy injects it."""
        full = {"OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "unused", **(env or {})}
        proc = sandbox.processes.start(cmd, env=full, stdin=True, tag="harness")
        agent = cls(sandbox, proc.id)
        agent._read(lambda m: "ready" in m, timeout)
        return agent

    @classmethod
    def attach(cls, sandbox: Sandbox, process_id: str, offset: int) -> InsideAgent:
        """The same loop, from another client (after a restart of the driver or of the server)."""
        return cls(sandbox, process_id, offset)

    def turn(self, message: str, timeout: float = 300) -> dict[str, Any]:
        """Send one user message; the loop's answer (``turn``, ``reply``, ``items``). Resumes a
        paused or hibernated sandbox (any call does)."""
        self.send({"message": message})
        answer = self.read(lambda m: "turn" in m, timeout)
        if "error" in answer:
            raise AgentFailed(f"turn {answer['turn']} failed: {answer['error']}")
        return answer

    def send(self, obj: dict[str, Any]) -> None:
        """One JSON line to the loop's stdin (for a harness with a protocol of its own)."""
        self.sandbox.processes.connect(self.process_id).send_stdin(json.dumps(obj) + "\n")

    def read(self, wanted: Callable[[dict[str, Any]], bool], timeout: float = 300) -> dict[str, Any]:
        """The next JSON line on the loop's stdout that `wanted` accepts."""
        return self._read(wanted, timeout)

    def close(self) -> None:
        """End the loop (its stdin closes, it exits)."""
        with contextlib.suppress(Exception):
            self.sandbox.processes.connect(self.process_id).close_stdin()

    def _read(self, wanted: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        """The next JSON line on stdout that `wanted` accepts, reading on from `offset` (stdout and
        stderr share one byte offset)."""
        call = dataclasses.replace(
            _processes.output_call(self.sandbox.id, self.process_id, self.offset),
            timeout=httpx.Timeout(30, read=timeout),  # a silent agent is an error, not a hang
        )
        stderr = ""
        try:
            with self.sandbox._http.stream(call) as response:
                for raw in response.iter_lines():
                    event = _processes.parse_output(raw)
                    if event is None:
                        continue
                    if event.type == "exit":
                        raise AgentFailed(f"the agent exited ({event.exit_code}): {stderr.strip()[-2000:]}")
                    if event.type not in ("stdout", "stderr") or event.offset is None:
                        continue
                    self.offset = event.offset + len(event.data.encode())
                    if event.type == "stderr":
                        stderr = (stderr + event.data)[-8000:]
                        continue
                    self._buffer += event.data
                    while "\n" in self._buffer:
                        line, self._buffer = self._buffer.split("\n", 1)
                        with contextlib.suppress(ValueError):
                            message = json.loads(line)
                            if isinstance(message, dict) and wanted(message):
                                return message
        except httpx.ReadTimeout:
            raise AgentFailed(
                f"no answer from the agent in {timeout:.0f} s: {stderr.strip()[-2000:]}"
            ) from None
        raise AgentFailed(f"the agent's output ended: {stderr.strip()[-2000:]}")
