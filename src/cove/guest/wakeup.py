"""The SIGCHLD wakeup pipe: a loop that waits in poll() for pipes and sockets also wakes when a child
exits, however quiet the rest stays."""

from __future__ import annotations

import _signal
import os


def _noop_handler(signum: int, frame: object) -> None:
    pass  # the C-level handler already wrote to the wakeup fd; that is all we need


def sigchld_pipe() -> tuple[int, int]:
    """A non-blocking pipe that SIGCHLD writes to from now on; poll its read end."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    _signal.signal(_signal.SIGCHLD, _noop_handler)
    _signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    return wake_r, wake_w


def drain(wake_r: int) -> None:
    try:
        while os.read(wake_r, 512):
            pass
    except BlockingIOError:
        pass
