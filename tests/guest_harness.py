"""The guest agent in test mode on the host (no sandbox), shared by the guest agent's tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from cove.node.guest_client import GuestClient

AGENT = Path(__file__).resolve().parent.parent / "src" / "cove" / "guest" / "agent.py"
PYTHON = "/usr/bin/python3"
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def children_of(ppid: int) -> list[tuple[int, str, str]]:
    """(pid, comm, state) of the processes whose parent is ppid."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            data = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        comm = data[data.index("(") + 1 : data.rindex(")")]
        state, parent = data[data.rindex(")") + 2 :].split()[:2]
        if int(parent) == ppid:
            out.append((int(name), comm, state))
    return out


def descendants_of(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = [p for p, _, _ in children_of(todo.pop())]
        found += kids
        todo += kids
    return found


def wait_gone(pid: int, timeout: float = 6.0) -> bool:
    """True once pid has exited and been reaped (a zombie still counts as there)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc_stat(pid) is None:
            return True
        time.sleep(0.02)
    return False


class Agent:
    """The agent in test mode. With `run_as`, it runs from a copy of its modules placed side by side
    (as in /run/cove) under that uid, which must be able to reach `root`."""

    def __init__(self, root: Path, run_as: int | None = None, default_user: str = "root") -> None:
        self.root = root
        self.work = root / "work"
        self.work.mkdir()
        self.socket = str(root / "agent.sock")
        script = AGENT
        if run_as is not None:
            for module in AGENT.parent.glob("*.py"):
                if module.name not in ("__init__.py", "kernel_bridge.py"):
                    shutil.copy(module, root / module.name)
            script = root / "agent.py"
        config = root / "config.json"
        config.write_text(
            '{"env": {"FROM_CONFIG": "config", "SHADOWED": "config"}, '
            f'"user": "{default_user}", "workdir": "{self.work}"}}'
        )
        ready_r, ready_w = os.pipe()
        # COVE_SECRET and HOST_ONLY must not reach commands.
        env = {"COVE_READY_FD": str(ready_w), "COVE_SECRET": "hidden", "HOST_ONLY": "hidden"}
        self.proc = subprocess.Popen(
            [PYTHON, "-I", "-S", str(script), "--socket", self.socket, "--config", str(config)],
            env=env,
            pass_fds=(ready_w,),
            user=run_as,
            group=run_as,
            extra_groups=[] if run_as is not None else None,
        )
        os.close(ready_w)
        try:
            ready, _, _ = select.select([ready_r], [], [], 10)
            assert ready and os.read(ready_r, 2) == b"ok", "agent did not signal ready"
        finally:
            os.close(ready_r)
        self.client = GuestClient(self.socket)

    def stop(self) -> None:
        # Our commands' leftovers are the agent's descendants (it is their subreaper). Stop the agent
        # first: it would replace a killed spare handler with a new one we do not know of.
        self.proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while (proc_stat(self.proc.pid) or ("T", 0))[0] not in (
            "T",
            "t",
            "Z",
        ) and time.monotonic() < deadline:
            time.sleep(0.005)  # stopped for real: no fork can be under way any more
        for _ in range(50):  # until no descendant is left (a fork in flight shows up late)
            kids = [p for p in descendants_of(self.proc.pid) if (proc_stat(p) or ("Z", 0))[0] != "Z"]
            if not kids:
                break
            for pid in kids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
        self.proc.kill()
        self.proc.wait(5)
