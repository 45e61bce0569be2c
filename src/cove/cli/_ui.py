"""What every ``cove`` command module shares: the consoles, the connection from the root options,
error reporting, and the formatting of times, states and sizes."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NoReturn, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from cove.errors import CoveError
from cove.sdk import Sandbox

P = ParamSpec("P")
R = TypeVar("R")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class Conn:
    """The server and key from the root options (``--url``, ``--api-key`` or their variables)."""

    def __init__(self, url: str | None, api_key: str | None) -> None:
        self.url = url
        self.api_key = api_key

    def auth(self) -> dict[str, str | None]:
        """``url`` and ``api_key`` as keyword arguments of the SDK's calls."""
        return {"url": self.url, "api_key": self.api_key}

    def sandbox(self, sandbox_id: str) -> Sandbox:
        return Sandbox(sandbox_id, url=self.url, api_key=self.api_key)


def connection(ctx: typer.Context) -> Conn:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Conn) else Conn(None, None)


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] [red]{escape(message)}[/]")
    raise typer.Exit(code)


def friendly(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn SDK and OS errors into one red line on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except CoveError as exc:
            fail(exc.message or type(exc).__name__)
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            fail(f"{exc.strerror or exc}{where}")
        except KeyboardInterrupt:
            err.print("[red]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def pairs(values: list[str] | None, what: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{what} must look like KEY=VALUE, got {item!r}")
        result[key] = value
    return result


def when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def ago(value: datetime | None) -> str:
    if value is None:
        return "-"
    seconds = int((datetime.now(UTC) - value).total_seconds())
    future = seconds < 0
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            text = f"{seconds // size}{unit}"
            break
    else:
        text = f"{seconds}s"
    return f"in {text}" if future else f"{text} ago"


_STATE_STYLE = {
    "running": "green",
    "starting": "yellow",
    "paused": "cyan",
    "hibernated": "blue",
    "killed": "dim",
    "error": "red",
}


def styled_state(state: str) -> str:
    return f"[{_STATE_STYLE.get(state, 'white')}]{escape(state)}[/]"


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def exit_status(code: int) -> int:
    """A process's exit code as this CLI's own exit status."""
    if code < 0:  # killed by a signal
        return 128 + min(-code, 127)
    return code if code <= 255 else 255


def progress() -> Progress:
    """A transfer bar on stderr (only on a terminal: piped output stays clean)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )


def spinner(description: str) -> Any:
    return err.status(description) if err.is_terminal else contextlib.nullcontext()
