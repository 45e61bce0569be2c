"""Structured logs: one JSON object per line on stderr.

Records are formatted and written by a thread of their own: the server logs every request, and
neither the formatting nor a write to a slow stderr (a full pipe) may hold up its event loop. The
thread takes what has gathered every FLUSH_S instead of being woken per record: a wake-up per
request cost the event loop about 0.3 ms (a futex wake and a GIL hand-over) on the exec path.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import sys
import threading

FLUSH_S = 0.05  # how long a record may wait to be written

_STD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in record.__dict__.items() if k not in _STD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """For a person at a terminal: time, level, message, then the structured fields as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(
            f"{k}={v}" for k, v in record.__dict__.items() if k not in _STD and k != "color_message"
        )
        line = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname.lower():7} {record.getMessage()}"
        if fields:
            line += f"  {fields}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _Writer:
    """The thread that formats and writes the records gathered in `records`, every FLUSH_S."""

    def __init__(self, handler: logging.Handler) -> None:
        self.handler = handler
        self.records: collections.deque[logging.LogRecord] = collections.deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cove-log-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_S):
            self.drain()
        self.drain()

    def drain(self) -> None:
        while self.records:
            self.handler.handle(self.records.popleft())

    def stop(self) -> None:
        """Write what is gathered, then end the thread."""
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
        self.drain()


class _Handoff(logging.Handler):
    """Hands records to the writer thread as they are (a deque append wakes nobody): formatting
    happens there."""

    def __init__(self, records: collections.deque[logging.LogRecord]) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_listener: list[_Writer] = []


def setup(level: str = "INFO", fmt: str | None = None, quiet_requests: bool = False) -> None:
    """JSON lines by default; text when stderr is a terminal (or COVE_LOG_FORMAT=text)."""
    fmt = fmt or ("text" if sys.stderr.isatty() else "json")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter() if fmt == "text" else JsonFormatter())
    for old in _listener:
        old.stop()
    writer = _Writer(handler)
    _listener[:] = [writer]
    writer.start()
    atexit.register(writer.stop)  # writes what is gathered before the process exits
    # Fields no formatter here writes, which logging would otherwise gather for every record (the
    # caller's file and line is a stack walk; a request logs at least one record).
    logging._srcfile = None  # documented in logging's source as the switch for the stack walk
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [_Handoff(writer.records)]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # our middleware logs requests
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if quiet_requests:  # the demo's own output should read cleanly
        for name in ("cove.access", "cove.sandboxes", "uvicorn.error"):
            logging.getLogger(name).setLevel(logging.WARNING)
