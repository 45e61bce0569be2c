"""Build steps: their JSON shape, validation, one-line descriptions and the shell they run.

A step is one of
    {"type": "run", "cmd": "..."}                       a shell command (as the current build user)
    {"type": "apt", "packages": [...]}                  apt-get install (root; needs a root with its own /usr)
    {"type": "pip", "packages": [...]}                  pip install
    {"type": "npm", "packages": [...], "global": bool}  npm install (in the workdir, or -g)
    {"type": "copy", "src": "path in the context", "dst": "/abs", "chown": "user"}
    {"type": "env", "env": {...}} | {"type": "workdir", "path": "/abs"} | {"type": "user", "user": "name"}
env and user change only what later steps and the template's sandboxes get; every other step is
one layer.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

LAYER_STEPS = ("run", "apt", "pip", "npm", "copy", "workdir")
RUNTIME_USER = "@runtime"  # run as the user the template's sandboxes will run as
META_STEPS = ("env", "user")
_PKG = re.compile(r"^[A-Za-z0-9@][A-Za-z0-9@._+:/<>=!~,\[\]*^-]{0,200}$")
_USER = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$|^[0-9]{1,10}$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class StepError(ValueError):
    def __init__(self, index: int, message: str) -> None:
        super().__init__(f"step {index + 1}: {message}")
        self.index = index


def validate(steps: Any) -> list[dict[str, Any]]:
    """The steps in canonical form; StepError names the first bad one."""
    if not isinstance(steps, list):
        raise StepError(0, "steps must be a list")
    out = []
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or not isinstance(step.get("type"), str):
            raise StepError(i, 'each step is an object with a "type"')
        kind = step["type"]
        if kind == "run":
            cmd = step.get("cmd")
            if not isinstance(cmd, str) or not cmd.strip():
                raise StepError(i, "run needs a non-empty cmd")
            out.append({"type": "run", "cmd": cmd})
        elif kind in ("apt", "pip", "npm"):
            pkgs = step.get("packages")
            if not isinstance(pkgs, list) or not pkgs:
                raise StepError(i, f"{kind} needs a non-empty list of packages")
            for p in pkgs:
                if not isinstance(p, str) or not _PKG.match(p):
                    raise StepError(i, f"{kind}: {p!r} is not a package name")
            s: dict[str, Any] = {"type": kind, "packages": list(pkgs)}
            if kind == "npm":
                s["global"] = bool(step.get("global", False))
            out.append(s)
        elif kind == "copy":
            src, dst = step.get("src"), step.get("dst")
            if not isinstance(src, str) or not src or src.startswith("/") or ".." in src.split("/"):
                raise StepError(i, "copy: src must be a relative path inside the build context")
            if not isinstance(dst, str) or not dst.startswith("/"):
                raise StepError(i, "copy: dst must be an absolute path")
            s = {"type": "copy", "src": src, "dst": dst}
            chown = step.get("chown")
            if chown is not None:
                if not isinstance(chown, str) or not all(_USER.match(x) for x in chown.split(":", 1)):
                    raise StepError(i, f"copy: chown {chown!r} is not user[:group]")
                s["chown"] = chown
            out.append(s)
        elif kind == "env":
            env = step.get("env")
            if not isinstance(env, dict) or not all(
                isinstance(k, str) and _ENV.match(k) and isinstance(v, str) for k, v in env.items()
            ):
                raise StepError(i, "env needs an object of NAME: value strings")
            out.append({"type": "env", "env": dict(env)})
        elif kind == "workdir":
            path = step.get("path")
            if not isinstance(path, str) or not path.startswith("/"):
                raise StepError(i, "workdir needs an absolute path")
            out.append({"type": "workdir", "path": path})
        elif kind == "user":
            user = step.get("user")
            if not isinstance(user, str) or not _USER.match(user):
                raise StepError(i, f"user {user!r} is not a user name or uid")
            out.append({"type": "user", "user": user})
        else:
            raise StepError(i, f"unknown step type {kind!r} (run, apt, pip, npm, copy, env, workdir, user)")
    return out


def describe(step: dict[str, Any]) -> str:
    kind = step["type"]
    if kind == "run":
        return "RUN " + step["cmd"]
    if kind in ("apt", "pip", "npm"):
        flag = " -g" if step.get("global") else ""
        return f"{kind.upper()}{flag} " + " ".join(step["packages"])
    if kind == "copy":
        return f"COPY {step['src']} {step['dst']}"
    if kind == "env":
        return "ENV " + " ".join(f"{k}={v}" for k, v in step["env"].items())
    if kind == "workdir":
        return "WORKDIR " + step["path"]
    return "USER " + step["user"]


APT = (
    "set -e; export DEBIAN_FRONTEND=noninteractive; apt-get update -q; "
    "apt-get install -y -q --no-install-recommends {pkgs}; apt-get clean; rm -rf /var/lib/apt/lists/*"
)


def command(step: dict[str, Any], full_root: bool) -> tuple[str, str | None]:
    """The shell command a layer step runs and the user it runs as (None: the current build user;
    RUNTIME_USER: the template's own user)."""
    kind = step["type"]
    pkgs = " ".join(shlex.quote(p) for p in step.get("packages", ()))
    if kind == "run":
        return step["cmd"], None
    if kind == "apt":
        return APT.format(pkgs=pkgs), "root"
    if kind == "pip":
        if full_root:  # its own Python: install pip with apt where it is missing
            ensure = APT.format(pkgs="python3-pip").replace("set -e; ", "")
            return (
                f"set -e; python3 -m pip --version >/dev/null 2>&1 || ({ensure}); "
                f"python3 -m pip install --no-cache-dir --break-system-packages --root-user-action=ignore {pkgs}",
                "root",
            )
        # The host's read-only /usr: into the build user's site-packages (~/.local), which its
        # python3 finds by itself.
        return f"python3 -m pip install --no-cache-dir --user --break-system-packages {pkgs}", RUNTIME_USER
    if kind == "npm":
        if step.get("global"):
            return f"npm install -g --no-fund --no-audit {pkgs}", "root"
        return f"npm install --no-fund --no-audit {pkgs}", None
    if kind == "workdir":
        return f"mkdir -p {shlex.quote(step['path'])}", "root"
    raise ValueError(f"{kind} is not run as a command")
