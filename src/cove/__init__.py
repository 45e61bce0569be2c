"""cove: self-hosted sandboxes for AI agents.

The SDK is imported lazily so that the server-side modules (the sandbox launcher in particular,
which runs on every create) do not pay for httpx and pydantic at start.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not `typing`: the launcher imports this package, and typing costs ~3 ms

__version__ = "0.1.0"

_ERRORS = {
    "AuthError",
    "CommandTimeout",
    "Conflict",
    "CoveError",
    "FileNotFound",
    "InvalidRequest",
    "NotFound",
    "SandboxNotFound",
}
_SDK = {
    "Sandbox",
    "AsyncSandbox",
    "Volume",
    "AsyncVolume",
    "VolumeMount",
    "BucketMount",
    "Template",
    "BuildError",
}
__all__ = [
    "AsyncSandbox",
    "AsyncVolume",
    "AuthError",
    "BucketMount",
    "BuildError",
    "CommandTimeout",
    "Conflict",
    "CoveError",
    "FileNotFound",
    "InvalidRequest",
    "NotFound",
    "Sandbox",
    "SandboxNotFound",
    "Template",
    "Volume",
    "VolumeMount",
]

if TYPE_CHECKING:
    from typing import Any

    from cove.errors import (
        AuthError,
        CommandTimeout,
        Conflict,
        CoveError,
        FileNotFound,
        InvalidRequest,
        NotFound,
        SandboxNotFound,
    )
    from cove.sdk import (
        AsyncSandbox,
        AsyncVolume,
        BucketMount,
        BuildError,
        Sandbox,
        Template,
        Volume,
        VolumeMount,
    )


def __getattr__(name: str) -> Any:
    if name in _ERRORS:
        from cove import errors

        return getattr(errors, name)
    if name in _SDK:
        from cove import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'cove' has no attribute {name!r}")
