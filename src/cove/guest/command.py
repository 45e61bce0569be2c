"""What `exec` and `spawn` share: a request's argv, user, working directory and environment, and how
a command's end is reported."""

from __future__ import annotations

import os

from .config import CONFIG
from .errors import OpError
from .users import User, norm_path, resolve_user

# /opt/cove/bin: what cove's templates add (the base template's sudo and python).
BASE_PATH = "/opt/cove/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STDIN_HIGH_WATER = 4 * 1024 * 1024  # stop reading the host while this much stdin is unread
EXIT_IDLE = 0.1  # after the command exits: stop once its pipes are quiet this long...
EXIT_GRACE = 1.0  # ...or after this long, if a background process keeps them open


def build_env(user: User, extra: object) -> dict[str, str]:
    env = {
        "PATH": BASE_PATH,
        "HOME": user.home,
        "USER": user.name,
        "LOGNAME": user.name,
        "SHELL": "/bin/bash",
        "LANG": "C.UTF-8",
    }
    env.update(CONFIG["env"])
    if extra is None:
        return env
    if not isinstance(extra, dict):
        raise OpError("invalid", "env must be an object of strings")
    for key, value in extra.items():
        if not key or "=" in key or "\0" in key:
            raise OpError("invalid", f"invalid environment variable name {key!r}")
        if value is None:  # null unsets a variable from the defaults
            env.pop(key, None)
        elif isinstance(value, str) and "\0" not in value:
            env[key] = value
        else:
            raise OpError("invalid", f"env value for {key} must be a string")
    return env


def exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)  # like a shell reports it
    return os.WEXITSTATUS(status)


def command_argv(req: dict) -> tuple[list[str], bool]:
    """The argv of an exec/spawn request (``cmd`` runs through bash) and whether it is a shell string."""
    argv = req.get("argv")
    cmd = req.get("cmd")
    if (argv is None) == (cmd is None):
        raise OpError("invalid", "exactly one of cmd and argv is required")
    shell = cmd is not None
    if shell:
        if not isinstance(cmd, str):
            raise OpError("invalid", "cmd must be a string")
        argv = ["/bin/bash", "-c", cmd]
    elif not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise OpError("invalid", "argv must be a non-empty list of strings")
    if any("\0" in a for a in argv):
        raise OpError("invalid", "argv contains a NUL byte")
    return argv, shell


def command_context(req: dict) -> tuple[User, str, dict[str, str]]:
    """The user, working directory and environment of an exec/spawn request."""
    user = resolve_user(req.get("user"))
    cwd = req.get("cwd")
    if cwd is None or cwd == "":
        default = CONFIG["workdir"]
        cwd = default if default and user.uid == resolve_user(None).uid else user.home
    cwd = norm_path(cwd, user.home)
    env = build_env(user, req.get("env"))
    return user, cwd, env
