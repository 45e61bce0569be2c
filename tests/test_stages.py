"""cove.stages: the per-stage stamps behind docs/benchmarks.md's exec breakdown."""

from __future__ import annotations

import asyncio

import pytest

from cove import stages


def test_off_by_default_marks_nothing() -> None:
    assert stages.begin() is None or stages.ENABLED
    stages.mark("auth")  # outside a traced request: a no-op, never an error


def test_marks_become_a_server_timing_header(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stages, "ENABLED", True)

    async def request() -> bytes:
        stamps = stages.begin()
        assert stamps is not None
        stages.mark("auth")
        await asyncio.sleep(0)
        stages.mark("guest")
        stages.mark("guest")  # named twice: adds up
        return stages.header(stamps)

    header = asyncio.run(request()).decode()
    names = [part.split(";")[0] for part in header.split(", ")]
    assert names == ["auth", "guest", "total"]
    assert all(float(part.split("dur=")[1]) >= 0 for part in header.split(", "))
