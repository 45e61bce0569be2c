"""Structured logs: one JSON object per line on stderr.

Records are formatted and written by a thread of their own: the server logs every request, and
neither the formatting nor a write to a slow stderr (a full pipe) may hold up its event loop.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import sys

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


class _Handoff(logging.handlers.QueueHandler):
    """Hands records to the writer thread as they are: formatting happens there."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


_listener: list[logging.handlers.QueueListener] = []


def setup(level: str = "INFO", fmt: str | None = None, quiet_requests: bool = False) -> None:
    """JSON lines by default; text when stderr is a terminal (or COVE_LOG_FORMAT=text)."""
    fmt = fmt or ("text" if sys.stderr.isatty() else "json")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter() if fmt == "text" else JsonFormatter())
    for old in _listener:
        old.stop()
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener[:] = [logging.handlers.QueueListener(records, handler)]
    _listener[0].start()
    atexit.register(_listener[0].stop)  # writes what is queued before the process exits
    # Fields no formatter here writes, which logging would otherwise gather for every record (the
    # caller's file and line is a stack walk; a request logs at least one record).
    logging._srcfile = None  # documented in logging's source as the switch for the stack walk
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [_Handoff(records)]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # our middleware logs requests
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if quiet_requests:  # the demo's own output should read cleanly
        for name in ("cove.access", "cove.sandboxes", "uvicorn.error"):
            logging.getLogger(name).setLevel(logging.WARNING)
