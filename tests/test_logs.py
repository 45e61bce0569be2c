"""Structured logs: records reach stderr from the writer thread, in batches, none lost at stop."""

from __future__ import annotations

import io
import json
import logging
import sys
import time
from collections.abc import Iterator

import pytest

from cove.controlplane import logs


@pytest.fixture
def restore() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for writer in logs._listener:
        writer.stop()
    logs._listener.clear()
    root.handlers[:], root.level = handlers, level


def _setup(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """Logs set up on a stderr of our own (set in the test itself: pytest swaps sys.stderr per phase)."""
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)
    logs.setup("INFO", "json")
    return buf


def _lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


@pytest.mark.usefixtures("restore")
def test_records_are_written_soon_by_the_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = _setup(monkeypatch)
    logging.getLogger("cove.test").info("hello", extra={"sandbox": "sb_1"})
    deadline = time.monotonic() + 5
    while not _lines(stderr) and time.monotonic() < deadline:
        time.sleep(0.01)
    (line,) = _lines(stderr)
    assert line["msg"] == "hello" and line["sandbox"] == "sb_1" and line["logger"] == "cove.test"


@pytest.mark.usefixtures("restore")
def test_stop_writes_every_gathered_record_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = _setup(monkeypatch)
    for i in range(500):
        logging.getLogger("cove.test").info("n", extra={"i": i})
    logs._listener[0].stop()
    assert [line["i"] for line in _lines(stderr)] == list(range(500))
