"""Where one request's time goes: perf_counter stamps at the stages of the exec path, reported in a
`Server-Timing` response header (docs/benchmarks.md's per-stage breakdown, bench/core.py --stages).

Off unless the server starts with COVE_TRACE_STAGES=1: then `mark` is one global test and a return,
so the stamps cost nothing in production. Stamps are cumulative: each stage is the time since the
one before it (the first since the request reached cove's ASGI app, after uvicorn parsed it).
"""

from __future__ import annotations

import itertools
import os
import time
from contextvars import ContextVar

ENABLED = os.environ.get("COVE_TRACE_STAGES") == "1"
HEADER = b"server-timing"

_stamps: ContextVar[list[tuple[str, float]] | None] = ContextVar("cove_stages", default=None)


def begin() -> list[tuple[str, float]] | None:
    """Start a request's stamps (None when tracing is off)."""
    if not ENABLED:
        return None
    stamps = [("start", time.perf_counter())]
    _stamps.set(stamps)
    return stamps


def mark(name: str) -> None:
    """The stage `name` ends now (no-op unless tracing and inside a traced request)."""
    if ENABLED:
        stamps = _stamps.get()
        if stamps is not None:
            stamps.append((name, time.perf_counter()))


def header(stamps: list[tuple[str, float]]) -> bytes:
    """`name;dur=ms` per stage (a stage named twice adds up), then `total`."""
    durations: dict[str, float] = {}
    for (_, before), (name, at) in itertools.pairwise(stamps):
        durations[name] = durations.get(name, 0.0) + (at - before) * 1000
    total = (time.perf_counter() - stamps[0][1]) * 1000
    parts = [f"{name};dur={ms:.3f}" for name, ms in durations.items()]
    parts.append(f"total;dur={total:.3f}")
    return ", ".join(parts).encode()
