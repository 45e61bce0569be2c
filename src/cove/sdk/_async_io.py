"""The async side of what the two SDKs do differently beyond ``await``; :mod:`cove.sdk._sync_io` is the other.

:mod:`cove.sdk.aio` imports this module as ``_io``; :mod:`cove.sdk.sync`, generated from it by
``scripts/gen_sync.py``, imports :mod:`cove.sdk._sync_io` under that name instead. Both modules are
written by hand and have the same names; keep them small.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Generator, Iterable
from types import TracebackType
from typing import Any, Protocol, TypeVar

from cove.errors import InvalidArgument
from cove.sdk import _core


class _Killable(Protocol):
    async def kill(self) -> None: ...


S = TypeVar("S", bound=_Killable)


class Creating(Awaitable[S]):
    """What :meth:`AsyncSandbox.create` returns: await it, or use it directly in ``async with``."""

    def __init__(self, make: Callable[[], Awaitable[S]]) -> None:
        self._make = make
        self._sandbox: S | None = None

    def __await__(self) -> Generator[Any, None, S]:
        return self._make().__await__()

    async def __aenter__(self) -> S:
        self._sandbox = await self._make()
        return self._sandbox

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._sandbox is not None:
            await self._sandbox.kill()


def creating(make: Callable[[], Awaitable[S]]) -> Creating[S]:
    """``create``'s result: the sandbox once awaited (the sync SDK starts it at once)."""
    return Creating(make)


async def call_back(callback: Callable[[Any], Any] | None, data: Any) -> None:
    """Call an output callback; a coroutine function's result is awaited."""
    if callback is not None:
        result = callback(data)
        if inspect.isawaitable(result):
            await result


async def upload_body(data: Any) -> AsyncIterator[bytes]:
    """An upload body from a (sync or async) file-like object or an (async) iterable of chunks."""
    if hasattr(data, "read"):
        while True:
            chunk = data.read(_core.CHUNK_SIZE)
            if inspect.isawaitable(chunk):
                chunk = await chunk
            if not chunk:
                return
            yield _core.chunk_bytes(chunk)
    elif isinstance(data, AsyncIterable):
        async for chunk in data:
            if chunk:
                yield _core.chunk_bytes(chunk)
    elif isinstance(data, Iterable):
        for chunk in _core.iter_upload(data):
            yield chunk
    else:
        raise InvalidArgument(
            f"upload data must be str, bytes, a file-like object or an (async) iterable of bytes, "
            f"not {type(data).__name__}"
        )
