"""`cove shell` / `cove exec -it`: this terminal, connected to a PTY in a sandbox over a WebSocket."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import termios
import threading
import tty
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect


def terminal_size() -> tuple[int, int]:
    """(rows, cols) of this terminal: asked of the terminal itself, as $COLUMNS/$LINES can be stale."""
    for fd in (sys.stdout.fileno(), sys.stdin.fileno()):
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(fd)
            return size.lines, size.columns
    size = shutil.get_terminal_size((80, 24))
    return size.lines, size.columns


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """Raw mode while connected (keys go to the sandbox as typed), restored whatever happens."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def attach(url: str, api_key: str | None, sandbox_id: str, process_id: str) -> int:
    """Relay this terminal to the process until it exits; returns its exit code."""
    ws_url = url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
    ws_url += f"/v1/sandboxes/{quote(sandbox_id, safe='')}/processes/{quote(process_id, safe='')}/ws"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    exit_code = 0
    with connect(ws_url, additional_headers=headers, max_size=None) as ws:

        def send_size() -> None:
            with contextlib.suppress(Exception):
                ws.send(json.dumps({"resize": list(terminal_size())}))

        def on_resize(*_: Any) -> None:
            # Not from the handler itself: it interrupts the main thread inside ws.recv, whose lock
            # ws.send would then wait for forever.
            threading.Thread(target=send_size, daemon=True).start()

        def pump_stdin() -> None:
            fd = sys.stdin.fileno()
            try:
                while True:
                    data = os.read(fd, 65536)
                    if not data:
                        ws.send(json.dumps({"close_stdin": True}))
                        return
                    ws.send(data)
            except (OSError, ConnectionClosed):
                return

        previous = signal.signal(signal.SIGWINCH, on_resize) if os.isatty(sys.stdout.fileno()) else None
        with raw_mode(sys.stdin.fileno()):
            threading.Thread(target=pump_stdin, daemon=True).start()
            out = sys.stdout.buffer
            try:
                for message in ws:
                    if isinstance(message, bytes):
                        out.write(message)
                        out.flush()
                    else:
                        event = json.loads(message)
                        if "exit_code" in event:
                            exit_code = int(event["exit_code"] or 0)
                            break
            except ConnectionClosed:
                pass
        if previous is not None:
            signal.signal(signal.SIGWINCH, previous)
    return exit_code
