"""cove: self-hosted sandboxes for AI agents."""

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
from cove.sdk import AsyncSandbox, Sandbox

__all__ = [
    "AsyncSandbox",
    "AuthError",
    "CommandTimeout",
    "Conflict",
    "CoveError",
    "FileNotFound",
    "InvalidRequest",
    "NotFound",
    "Sandbox",
    "SandboxNotFound",
]
__version__ = "0.1.0"
