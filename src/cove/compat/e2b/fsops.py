"""What envd's /files and `filesystem.Filesystem` share: the sandbox's guest, the acting user, paths,
file metadata and errors in both of envd's shapes (an HTTP status for /files, a Connect code for RPC).

Every path is resolved by cove's guest agent inside the sandbox, so `..`, absolute paths and symlinks
only ever reach the sandbox's own files. As envd does, file operations act with the sandbox root's
permissions and give what they create to the acting user (`owner`): that is how the SDK's clients
create a workspace such as `/workspace` that the sandbox user then owns.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cove.controlplane.errors import ApiError
from cove.node.guest_client import GuestClient, GuestError, GuestUnavailable
from cove.store.base import SandboxRecord

from .routing import Target

if TYPE_CHECKING:
    from cove.controlplane.app import Cove

# envd keeps user metadata as `user.e2b.<key>` extended attributes; the SDK sees `<key>`.
METADATA_XATTR = "user.e2b."
METADATA_HEADER = "x-metadata-"
# Keys travel as header names (RFC 7230 tokens), values as printable ASCII, as the SDK checks.
_METADATA_KEY = re.compile(r"\A[A-Za-z0-9!#$%&'*+\-.^_`|~]+\Z")
_METADATA_VALUE = re.compile(r"\A[\x20-\x7e]*\Z")

# guest agent error code -> (HTTP status for /files, Connect code for RPC)
_CODES: dict[str, tuple[int, str]] = {
    "not_found": (404, "not_found"),
    "exists": (409, "already_exists"),
    "permission_denied": (403, "permission_denied"),
    "not_a_directory": (400, "invalid_argument"),
    "is_a_directory": (400, "invalid_argument"),
    "not_empty": (409, "failed_precondition"),
    "invalid": (400, "invalid_argument"),
    "too_large": (507, "failed_precondition"),  # RESOURCE_EXHAUSTED would read as a rate limit
    "conflict": (409, "failed_precondition"),
    "busy": (503, "failed_precondition"),
}


class EnvdError(Exception):
    """An error as envd reports it: `status` on plain HTTP, `code` over Connect."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def not_found_message(sandbox_id: str) -> str:
    return f"The sandbox {sandbox_id} was not found"  # the SDK matches "was not found"


def from_guest(err: GuestError) -> EnvdError:
    return _envd(err.code, err.message)


def _envd(code: str, message: str) -> EnvdError:
    """A guest error code (see `SandboxService.guest_failure`) as envd words it."""
    if code == "invalid" and message.startswith("unknown user"):
        # envd answers an unknown user as "invalid user" (401 / unauthenticated).
        return EnvdError(401, "unauthenticated", message)
    status, envd_code = _CODES.get(code, (500, "internal"))
    return EnvdError(status, envd_code, message)


@dataclass
class Session:
    """One request's sandbox (resumed if it was paused) and its guest."""

    cove: Cove
    rec: SandboxRecord
    guest: GuestClient

    async def failed(self, exc: BaseException) -> EnvdError:
        """What a guest failure means to the caller (marks a sandbox that died as such)."""
        if not isinstance(exc, GuestError | GuestUnavailable):
            raise exc
        err = await self.cove.service.guest_failure(self.rec, exc)
        if err.code == "not_running":  # it died: the SDK tells that from its "was not found"
            return EnvdError(502, "unavailable", not_found_message(self.rec.id))
        if err.code == "guest_unavailable":
            return EnvdError(502, "unavailable", err.message)
        return _envd(err.code, err.message)

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        try:
            return await self.guest.call(op, **fields)
        except (GuestError, GuestUnavailable) as exc:
            raise await self.failed(exc) from exc


async def session(cove: Cove, tgt: Target) -> Session:
    try:
        rec = await cove.service.running(tgt.caller, tgt.sandbox.id)
    except ApiError as exc:
        if exc.status == 404:
            raise EnvdError(502, "unavailable", not_found_message(tgt.sandbox.id)) from exc
        raise EnvdError(exc.status, "failed_precondition", exc.message) from exc
    return Session(cove, rec, cove.service.guest(rec))


def basic_user(headers: Mapping[str, str]) -> str | None:
    """The user named by `Authorization: Basic base64("user:")`, as the SDK sends it."""
    value = headers.get("authorization", "")
    scheme, _, encoded = value.partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise EnvdError(401, "unauthenticated", "malformed Basic authorization header") from None
    return decoded.partition(":")[0] or None


def guest_path(path: str) -> str:
    """A path as the guest takes it: `~` and `~/...` mean the user's home (relative paths start there)."""
    if path == "~":
        return "."
    if path.startswith("~/"):
        return path[2:] or "."
    return path


def metadata_xattrs(metadata: Mapping[str, str]) -> dict[str, str]:
    """Upload metadata (keys lowercased, as envd does) as the xattrs that hold it; 400 if invalid."""
    xattrs = {}
    for key, value in metadata.items():
        key = key.lower()
        if not _METADATA_KEY.match(key) or len((METADATA_XATTR + key).encode()) > 255:
            raise EnvdError(400, "invalid_argument", f"invalid metadata key {key!r}")
        if not _METADATA_VALUE.match(value):
            raise EnvdError(400, "invalid_argument", f"invalid metadata value for key {key!r}")
        xattrs[METADATA_XATTR + key] = value
    return xattrs


def metadata_of(entry: Mapping[str, Any]) -> dict[str, str]:
    """An entry's e2b metadata: its `user.e2b.*` xattrs with the prefix stripped."""
    xattrs = entry.get("xattrs") or {}
    return {k[len(METADATA_XATTR) :]: v for k, v in xattrs.items() if k.startswith(METADATA_XATTR)}
