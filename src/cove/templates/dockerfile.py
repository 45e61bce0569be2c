"""A Dockerfile subset, turned into cove build steps.

Supported: FROM (a cove template, `base`, or `debian:<suite>`), RUN, COPY/ADD of local files
(`--chown` only), ENV, WORKDIR, USER, ARG (`${VAR}`, `$VAR`, `${VAR:-default}` are substituted in
FROM, COPY/ADD, ENV, WORKDIR and USER; RUN and CMD are left to the shell, which sees ENV values),
CMD/ENTRYPOINT (together: the template's start command). Every other instruction is refused with
its name and line, rather than silently ignored.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

SUPPORTED = ("FROM", "RUN", "COPY", "ADD", "ENV", "WORKDIR", "USER", "ARG", "CMD", "ENTRYPOINT")
_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


class DockerfileError(ValueError):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"Dockerfile line {line}: {message}")
        self.line = line


@dataclass
class Parsed:
    base: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    start_cmd: str | None = None


def _lines(text: str) -> list[tuple[int, str]]:
    """Logical lines (continuations joined, comments dropped) with their first line number."""
    out: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # comments inside a continued instruction
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        out.append((start, (buf + line).strip()))
        buf = ""
    if buf:
        out.append((start, buf.strip()))
    return out


def _subst(text: str, env: dict[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3)
        value = env.get(name)
        return value if value is not None else (m.group(2) or "")

    return _VAR.sub(one, text)


def _argv_or_shell(rest: str) -> str:
    """Exec form (a JSON array) as one shell-quoted command; shell form as it is."""
    if rest.startswith("["):
        try:
            argv = json.loads(rest)
        except ValueError:
            return rest
        if isinstance(argv, list) and all(isinstance(a, str) for a in argv):
            return shlex.join(argv)
    return rest


def _pairs(rest: str, line: int, what: str) -> dict[str, str]:
    try:
        words = shlex.split(rest)
    except ValueError as e:
        raise DockerfileError(line, f"{what}: {e}") from e
    if words and "=" not in words[0]:  # legacy `ENV NAME value words`
        value = rest.split(None, 1)[1] if len(rest.split(None, 1)) > 1 else ""
        return {words[0]: value}
    out = {}
    for w in words:
        k, sep, v = w.partition("=")
        if not sep or not k:
            raise DockerfileError(line, f"{what}: expected NAME=value, got {w!r}")
        out[k] = v
    return out


def parse(text: str, build_args: dict[str, str] | None = None) -> Parsed:
    build_args = dict(build_args or {})
    args: dict[str, str] = {}  # declared ARGs with their values
    env: dict[str, str] = {}
    base: str | None = None
    steps: list[dict[str, Any]] = []
    entrypoint: str | None = None
    cmd: str | None = None
    workdir = "/"
    for line, inst in _lines(text):
        word, _, rest = inst.partition(" ")
        name = word.upper()
        rest = rest.strip()
        if name not in SUPPORTED:
            raise DockerfileError(
                line, f"{word} is not supported by cove (supported: {', '.join(SUPPORTED)})"
            )
        if name == "ARG":
            k, sep, v = rest.partition("=")
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k.strip()):
                raise DockerfileError(line, f"ARG: bad name {k!r}")
            args[k.strip()] = build_args.get(k.strip(), v if sep else "")
            continue
        if name not in ("RUN", "CMD", "ENTRYPOINT"):  # as Docker: the shell expands those itself
            rest = _subst(rest, {**args, **env})
        if name == "FROM":
            if base is not None:
                raise DockerfileError(line, "a second FROM (multi-stage build) is not supported")
            parts = rest.split()
            if not parts or (len(parts) not in (1, 3)) or (len(parts) == 3 and parts[1].upper() != "AS"):
                raise DockerfileError(line, "FROM needs an image: FROM base | debian:bookworm | TEMPLATE")
            base = parts[0]
            continue
        if base is None:
            raise DockerfileError(line, f"{name} before FROM")
        if name == "RUN":
            if not rest:
                raise DockerfileError(line, "RUN needs a command")
            steps.append({"type": "run", "cmd": _argv_or_shell(rest)})
        elif name in ("COPY", "ADD"):
            steps.extend(_copy(name, rest, line, workdir))
        elif name == "ENV":
            pairs = _pairs(rest, line, "ENV")
            env.update(pairs)
            steps.append({"type": "env", "env": pairs})
        elif name == "WORKDIR":
            if not rest:
                raise DockerfileError(line, "WORKDIR needs a path")
            workdir = posixpath.normpath(posixpath.join(workdir, rest))
            steps.append({"type": "workdir", "path": workdir})
        elif name == "USER":
            if not rest:
                raise DockerfileError(line, "USER needs a user")
            steps.append({"type": "user", "user": rest.split(":", 1)[0]})
        elif name == "CMD":
            cmd = _argv_or_shell(rest)
        elif name == "ENTRYPOINT":
            entrypoint = _argv_or_shell(rest)
    if base is None:
        raise DockerfileError(1, "no FROM")
    start = " ".join(x for x in (entrypoint, cmd) if x) or None
    return Parsed(base=base, steps=steps, start_cmd=start)


def _copy(name: str, rest: str, line: int, workdir: str) -> list[dict[str, Any]]:
    try:
        words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
    except ValueError as e:
        raise DockerfileError(line, f"{name}: {e}") from e
    chown = None
    while words and words[0].startswith("--"):
        flag = words.pop(0)
        if flag.startswith("--chown="):
            chown = flag.split("=", 1)[1]
        else:
            raise DockerfileError(line, f"{name} {flag.split('=')[0]} is not supported (only --chown)")
    if len(words) < 2:
        raise DockerfileError(line, f"{name} needs a source and a destination")
    *srcs, dst = words
    if not dst.startswith("/"):
        dst = posixpath.normpath(posixpath.join(workdir, dst)) + ("/" if dst.endswith(("/", ".")) else "")
    if len(srcs) > 1 and not dst.endswith("/"):
        raise DockerfileError(line, f"{name} with several sources needs a destination ending in /")
    out = []
    for src in srcs:
        if "://" in src:
            raise DockerfileError(line, f"{name} from a URL is not supported: download it in a RUN step")
        norm = posixpath.normpath(src.lstrip("/"))
        if norm.startswith(".."):
            raise DockerfileError(line, f"{name} source {src!r} is outside the build context")
        step: dict[str, Any] = {"type": "copy", "src": norm, "dst": dst}
        if chown:
            step["chown"] = chown
        out.append(step)
    return out


def copy_sources(parsed: Parsed) -> list[str]:
    """Paths (relative to the build context) that the Dockerfile copies."""
    return [s["src"] for s in parsed.steps if s["type"] == "copy"]
