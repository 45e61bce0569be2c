"""The sync side of what the two SDKs do differently beyond ``await``; :mod:`cove.sdk._async_io` is the other.

:mod:`cove.sdk.sync` (generated from :mod:`cove.sdk.aio` by ``scripts/gen_sync.py``) imports this
module as ``_io``, where :mod:`cove.sdk.aio` imports :mod:`cove.sdk._async_io`. Both are written by
hand and have the same names; keep them small.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from cove.sdk import _core

S = TypeVar("S")


def creating(make: Callable[[], S]) -> S:
    """``create``'s result: the sandbox, started now (the async SDK returns an awaitable)."""
    return make()


def call_back(callback: Callable[[Any], Any] | None, data: Any) -> None:
    """Call an output callback (its result is ignored)."""
    if callback is not None:
        callback(data)


def upload_body(data: Any) -> Iterator[bytes]:
    """An upload body from a binary file-like object or an iterable of chunks."""
    return _core.iter_upload(data)
