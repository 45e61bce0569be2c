"""Fault injection for the fault tests (docs/faults.md): off unless `COVE_FAULT` is set.

`COVE_FAULT=hibernate.dumped` makes the server SIGKILL itself when it reaches that point, so a test
can crash it at an exact step of an operation and check what a restart makes of it. Several points:
comma-separated. Unset (always, in production), `point()` is one set lookup.
"""

from __future__ import annotations

import logging
import os
import signal

POINTS = frozenset(p.strip() for p in os.environ.get("COVE_FAULT", "").split(",") if p.strip())


def point(name: str) -> None:
    """Die here, at once and without cleanup, if `COVE_FAULT` names this point."""
    if name in POINTS:
        logging.getLogger("cove.faults").warning("fault injected: SIGKILL", extra={"point": name})
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
