"""The errors an operation reports to the host (docs/guest-protocol.md, "Errors"), and the log of
those it cannot."""

from __future__ import annotations

import errno

_ERRNO_CODES = {
    errno.ENOENT: "not_found",
    errno.EEXIST: "exists",
    errno.EACCES: "permission_denied",
    errno.EPERM: "permission_denied",
    errno.EROFS: "permission_denied",
    errno.ENOTDIR: "not_a_directory",
    errno.EISDIR: "is_a_directory",
    errno.ENOTEMPTY: "not_empty",
    errno.EINVAL: "invalid",
    errno.ENAMETOOLONG: "invalid",
    errno.ELOOP: "invalid",
    errno.EFBIG: "too_large",
    errno.ENOSPC: "too_large",
    errno.EDQUOT: "too_large",
}


class OpError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Disconnected(Exception):
    """The host went away mid-operation: there is nobody to reply to."""


def os_error(exc: OSError) -> OpError:
    code = _ERRNO_CODES.get(exc.errno or 0, "internal")
    text = "read-only file system" if exc.errno == errno.EROFS else (exc.strerror or str(exc))
    if exc.filename is not None:
        text = f"{text}: {exc.filename}"
        if exc.filename2 is not None:
            text = f"{text} -> {exc.filename2}"
    return OpError(code, text)


def log_exception() -> None:
    # Tracebacks go to the agent's stderr (the sandbox log), never into a reply.
    import traceback

    traceback.print_exc()
