"""Exceptions raised by the cove SDK and CLI.

Every error the server reports has the shape ``{"error": {"code": ..., "message": ...}}``;
:func:`error_from_response` turns such a response (or a non-JSON one, e.g. from a proxy) into the
matching exception class below. This module uses only the standard library, so importing it is cheap.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

__all__ = [
    "AuthError",
    "CommandTimeout",
    "Conflict",
    "ConnectionFailed",
    "CoveError",
    "FileNotFound",
    "InvalidArgument",
    "InvalidRequest",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "SandboxNotFound",
    "SandboxUnavailable",
    "ServerError",
    "TooLarge",
    "error_from_response",
    "status_for_code",
]


class CoveError(Exception):
    """Base class of every cove error.

    ``status`` is the HTTP status (``None`` for errors that did not come from an HTTP response),
    ``code`` the machine-readable error code (e.g. ``"not_found"``), ``message`` a readable sentence.
    """

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, message={self.message!r})"


class AuthError(CoveError):
    """The API key is missing or wrong (401), or it may not do this (403)."""


class PermissionDenied(AuthError):
    """A file operation was refused by the permissions inside the sandbox (403 ``permission_denied``)."""


class NotFound(CoveError):
    """The thing asked for does not exist (404)."""


class SandboxNotFound(NotFound):
    """No such sandbox (or it belongs to another tenant)."""


class FileNotFound(NotFound):
    """No such file or directory inside the sandbox."""


class InvalidRequest(CoveError):
    """The request was malformed or a value is out of range (400/422)."""


class InvalidArgument(InvalidRequest, ValueError):
    """An argument was rejected by the SDK itself, before any request was made."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=None, code="invalid_argument")


class Conflict(CoveError):
    """The request conflicts with the current state (409), e.g. the sandbox is not running."""


class TooLarge(CoveError):
    """The request or upload is too large (413)."""


class RateLimited(CoveError):
    """Too many requests (429)."""


class ServerError(CoveError):
    """The server failed (5xx)."""


class SandboxUnavailable(ServerError):
    """The sandbox (or the server) cannot serve the request right now (503)."""


class ConnectionFailed(CoveError):
    """The server could not be reached, or the connection broke or timed out."""


class CommandTimeout(CoveError):
    """A command ran past its timeout and was killed; carries the output produced until then."""

    def __init__(
        self,
        message: str,
        *,
        stdout: str = "",
        stderr: str = "",
        exit_code: int | None = None,
        duration_ms: float | None = None,
    ) -> None:
        super().__init__(message, status=None, code="timeout")
        self.stdout = stdout
        self.stderr = stderr
        self.exit_code = exit_code
        self.duration_ms = duration_ms


_BY_STATUS: dict[int, type[CoveError]] = {
    400: InvalidRequest,
    401: AuthError,
    403: AuthError,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
    422: InvalidRequest,
    429: RateLimited,
    503: SandboxUnavailable,
}


#: The HTTP status the server uses for each error code (for errors reported in-band, e.g. mid-stream).
_STATUS_BY_CODE: dict[str, int] = {
    "unauthorized": 401,
    "forbidden": 403,
    "permission_denied": 403,
    "not_found": 404,
    "sandbox_not_found": 404,
    "conflict": 409,
    "not_running": 409,
    "exists": 409,
    "not_empty": 409,
    "validation_error": 422,
    "invalid": 400,
    "not_a_directory": 400,
    "is_a_directory": 400,
    "too_large": 413,
    "rate_limited": 429,
    "unavailable": 503,
    "sandbox_unavailable": 503,
    "guest_unavailable": 503,
    "sandbox_failed": 503,
    "internal": 500,
}


def status_for_code(code: str | None) -> int:
    """The HTTP status that goes with an error code (500 for unknown codes)."""
    return _STATUS_BY_CODE.get(code or "", 500)


def _is_files_path(path: str | None) -> bool:
    return bool(path) and "/files" in (path or "")


def _is_sandbox_path(path: str | None) -> bool:
    return bool(path) and (path or "").startswith("/v1/sandboxes/")


def _pick_class(status: int, code: str | None, path: str | None) -> type[CoveError]:
    if status == 404:
        if code == "sandbox_not_found":
            return SandboxNotFound
        if code in ("file_not_found",) or (_is_files_path(path) and code in (None, "not_found")):
            return FileNotFound
        if _is_sandbox_path(path):
            return SandboxNotFound
        return NotFound
    if status == 403 and code == "permission_denied":
        return PermissionDenied
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    if 500 <= status < 600:
        return ServerError
    return CoveError


def _describe_detail(detail: Any) -> str:
    """FastAPI's own validation format: ``{"detail": [{"loc": [...], "msg": ...}]}`` or a string."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = [str(p) for p in item.get("loc", []) if p not in ("body", "query", "path")]
                msg = str(item.get("msg", "invalid value"))
                parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return json.dumps(detail)


def _parse_body(body: bytes | str | Any) -> tuple[str | None, str | None, str]:
    """Returns ``(code, message, raw_text)`` from an error body of any shape."""
    data: Any = body
    text = ""
    if isinstance(body, bytes):
        text = body.decode("utf-8", "replace")
    elif isinstance(body, str):
        text = body
    if isinstance(body, bytes | str):
        try:
            data = json.loads(text) if text.strip() else None
        except ValueError:
            data = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):
            code = err.get("code")
            message = err.get("message")
            return (str(code) if code else None, str(message) if message else None, text)
        if isinstance(err, str):
            return (None, err, text)
        if "detail" in data:
            return (None, _describe_detail(data["detail"]), text)
    return (None, None, text)


def _default_message(status: int, code: str | None, path: str | None) -> str:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "error"
    where = f" ({path})" if path else ""
    return f"HTTP {status} {phrase}{where}" + (f" [{code}]" if code else "")


def error_from_response(status: int, body: bytes | str | Any = b"", *, path: str | None = None) -> CoveError:
    """Map an HTTP error response to the matching :class:`CoveError` subclass.

    ``body`` is the raw response body (bytes or str) or already-decoded JSON; ``path`` is the request
    path, used to tell a missing sandbox from a missing file when both answer ``not_found``.
    """
    code, message, text = _parse_body(body)
    cls = _pick_class(status, code, path)
    if not message:
        snippet = " ".join(text.split())[:200]
        message = _default_message(status, code, path)
        if snippet:
            message = f"{message}: {snippet}"
    if status == 422 and code is None:
        code = "validation_error"
    return cls(message, status=status, code=code)
