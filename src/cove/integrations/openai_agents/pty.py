"""The Agents SDK's PTY sessions (``exec_command`` with a terminal, ``write_stdin``) on cove's
background processes: each is a cove process (in a pseudo-terminal when ``tty``) whose output a task
streams into a buffer that the SDK's collector drains."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from agents.sandbox.errors import PtySessionNotFoundError
from agents.sandbox.session.pty_output import collect_pty_output
from agents.sandbox.session.pty_types import (
    PTY_PROCESSES_MAX,
    PTY_PROCESSES_WARNING,
    PtyExecUpdate,
    allocate_pty_process_id,
    clamp_pty_yield_time_ms,
    process_id_to_prune_from_meta,
    resolve_pty_write_yield_time_ms,
)

from cove.errors import CoveError
from cove.sdk.aio import AsyncProcess, AsyncSandbox

logger = logging.getLogger(__name__)
TERMINAL_SIZE = (24, 80)


@dataclass
class _Entry:
    process: AsyncProcess
    tty: bool
    chunks: deque[bytes] = field(default_factory=deque)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    notify: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    last_used: float = field(default_factory=time.monotonic)
    exit_code: int | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class PtyProcesses:
    """The live PTY sessions of one Agents SDK session, by the SDK's numeric ids."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._entries: dict[int, _Entry] = {}

    async def start(
        self,
        sandbox: AsyncSandbox,
        argv: Sequence[str],
        *,
        cwd: str | None,
        env: Mapping[str, str],
        user: str | None,
        tty: bool,
        timeout: float | None,
        yield_time_s: float | None,
        max_output_tokens: int | None,
    ) -> PtyExecUpdate:
        process = await sandbox.processes.start(
            list(argv),
            cwd=cwd,
            env=env,
            user=user,
            stdin=tty,
            pty=TERMINAL_SIZE if tty else None,
            tag="openai-agents-pty",
        )
        entry = _Entry(process=process, tty=tty)
        entry.tasks.append(asyncio.create_task(self._pump(entry)))
        if timeout is not None:
            entry.tasks.append(asyncio.create_task(self._kill_after(entry, timeout)))
        async with self._lock:
            process_id = allocate_pty_process_id(set(self._entries))
            pruned = self._prune()
            self._entries[process_id] = entry
            count = len(self._entries)
        if pruned is not None:
            await _terminate(pruned)
        if count >= PTY_PROCESSES_WARNING:
            logger.warning("%d PTY sessions are open in one sandbox session", count)
        yield_ms = 10_000 if yield_time_s is None else int(yield_time_s * 1000)
        return await self._update(process_id, entry, clamp_pty_yield_time_ms(yield_ms), max_output_tokens)

    async def write(
        self, session_id: int, chars: str, yield_time_s: float | None, max_output_tokens: int | None
    ) -> PtyExecUpdate:
        async with self._lock:
            entry = self._entries.get(session_id)
        if entry is None:
            raise PtySessionNotFoundError(session_id=session_id)
        if chars:
            if not entry.tty:
                raise RuntimeError("stdin is not available for this process (it has no terminal)")
            await entry.process.send_stdin(chars)
        yield_ms = 250 if yield_time_s is None else int(yield_time_s * 1000)
        wait_ms = resolve_pty_write_yield_time_ms(yield_time_ms=yield_ms, input_empty=chars == "")
        entry.last_used = time.monotonic()
        return await self._update(session_id, entry, wait_ms, max_output_tokens)

    async def terminate_all(self) -> None:
        async with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
        for entry in entries:
            await _terminate(entry)

    async def _update(
        self, process_id: int, entry: _Entry, wait_ms: int, max_output_tokens: int | None
    ) -> PtyExecUpdate:
        output, original_tokens, closed = await collect_pty_output(
            output_chunks=entry.chunks,
            output_lock=entry.lock,
            output_notify=entry.notify,
            is_done=entry.closed.is_set,
            yield_time_ms=wait_ms,
            max_output_tokens=max_output_tokens,
        )
        exit_code = entry.exit_code if closed else None
        if exit_code is not None:
            async with self._lock:
                self._entries.pop(process_id, None)
            await _terminate(entry)
        return PtyExecUpdate(
            process_id=None if exit_code is not None else process_id,
            output=output,
            exit_code=exit_code,
            original_token_count=original_tokens,
        )

    def _prune(self) -> _Entry | None:
        if len(self._entries) < PTY_PROCESSES_MAX:
            return None
        meta = [(pid, e.last_used, e.closed.is_set()) for pid, e in self._entries.items()]
        victim = process_id_to_prune_from_meta(meta)
        return None if victim is None else self._entries.pop(victim, None)

    @staticmethod
    async def _pump(entry: _Entry) -> None:
        """Copy the process's output into the entry until it exits (cove sends its exit code last)."""
        try:
            async for event in entry.process.output():
                if event.type in ("stdout", "stderr") and event.data:
                    async with entry.lock:
                        entry.chunks.append(event.data.encode())
                    entry.notify.set()
                elif event.type == "exit":
                    entry.exit_code = -1 if event.exit_code is None else event.exit_code
        except Exception as exc:  # the stream broke: ask for the exit code instead
            logger.debug("PTY output stream of %s ended: %s", entry.process.id, exc)
            with contextlib.suppress(CoveError):
                info = await entry.process.wait(timeout=1)
                if not info.running:
                    entry.exit_code = -1 if info.exit_code is None else info.exit_code
        if entry.exit_code is not None:
            entry.closed.set()
            entry.notify.set()

    @staticmethod
    async def _kill_after(entry: _Entry, timeout: float) -> None:
        await asyncio.sleep(max(timeout, 0))
        with contextlib.suppress(CoveError):
            await entry.process.kill()


async def _terminate(entry: _Entry) -> None:
    if entry.exit_code is None:
        with contextlib.suppress(CoveError):  # Conflict: it exited meanwhile
            await entry.process.kill()
    current = asyncio.current_task()
    tasks = [t for t in entry.tasks if t is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
