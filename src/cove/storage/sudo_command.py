#!/usr/bin/python3 -I
"""`sudo` for cove sandboxes: runs a command as root (or `-u USER`) through the sandbox's agent.

Installed as /opt/cove/bin/sudo by the base template (docs/e2b.md). A sandbox runs with
no_new_privs, so no setuid program can raise privileges; this command hands its request and its
stdin, stdout and stderr to the agent (cove/guest/sudo.py), which runs the command on them,
passes on the signals this process receives and answers the exit status. No password is asked,
as for e2b's `user`. Standard library only: it runs on the sandbox's own Python.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import pwd
import signal
import socket
import sys

SOCKET = "/run/cove/sock/sudo.sock"
SECURE_PATH = "/opt/cove/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What a reset environment keeps (as Debian's sudo keeps them).
KEEP = ("TERM", "COLORTERM", "LANG", "LANGUAGE", "DISPLAY", "XAUTHORITY", "TZ", "COLUMNS", "LINES")
FORWARD = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH", "SIGCONT")
USAGE = (
    "usage: sudo [-EHinSs] [-u user] [--preserve-env[=list]] [VAR=value] [--] command [args...]\n"
    "       sudo -i | -s   (a shell)\n"
    "       sudo -v | -k | -K | -V | -h\n"
)
VERSION = "Sudo version 1.9 (cove: through the sandbox's agent, no password)\n"


class Usage(Exception):
    pass


def parse(args: list[str]) -> tuple[dict[str, object], list[str]]:
    opts: dict[str, object] = {"user": "root", "preserve": False, "keep": [], "login": False, "shell": False}
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            i += 1
            break
        if a.startswith("--"):
            name, eq, value = a[2:].partition("=")
            if name == "user":
                if not eq:
                    i += 1
                    if i >= len(args):
                        raise Usage("option '--user' requires an argument")
                    value = args[i]
                opts["user"] = value
            elif name == "preserve-env":
                if eq:
                    opts["keep"] = [*opts["keep"], *value.split(",")]  # type: ignore[misc]
                else:
                    opts["preserve"] = True
            elif name == "login":
                opts["login"] = True
            elif name == "shell":
                opts["shell"] = True
            elif name in ("non-interactive", "stdin", "set-home", "reset-timestamp"):
                pass
            elif name == "version":
                opts["version"] = True
            elif name == "help":
                opts["help"] = True
            else:
                raise Usage(f"unrecognized option '--{name}'")
            i += 1
            continue
        if not a.startswith("-") or a == "-":
            break
        j = 1
        while j < len(a):
            c = a[j]
            if c == "u":
                value = a[j + 1 :]
                if not value:
                    i += 1
                    if i >= len(args):
                        raise Usage("option requires an argument -- 'u'")
                    value = args[i]
                opts["user"] = value
                break
            if c == "E":
                opts["preserve"] = True
            elif c == "i":
                opts["login"] = True
            elif c == "s":
                opts["shell"] = True
            elif c in "nSHkKvbP":
                opts[{"k": "reset", "K": "reset", "v": "validate"}.get(c, "_")] = True
            elif c == "V":
                opts["version"] = True
            elif c == "h":
                opts["help"] = True
            else:
                raise Usage(f"invalid option -- '{c}'")
            j += 1
        i += 1
    return opts, args[i:]


def target(spec: str) -> pwd.struct_passwd:
    try:
        if spec.startswith("#") and spec[1:].isdigit():
            return pwd.getpwuid(int(spec[1:]))
        return pwd.getpwnam(spec)
    except KeyError:
        raise Usage(f"unknown user {spec}") from None


def environment(opts: dict[str, object], to: pwd.struct_passwd, assigned: dict[str, str]) -> dict[str, str]:
    try:
        me = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # an unnamed uid
        me = str(os.getuid())
    if opts["preserve"]:
        env = dict(os.environ)
    else:
        env = {k: v for k, v in os.environ.items() if k in KEEP or k.startswith("LC_")}
        env.update(
            PATH=SECURE_PATH,
            HOME=to.pw_dir,
            USER=to.pw_name,
            LOGNAME=to.pw_name,
            SHELL=to.pw_shell or "/bin/sh",
            MAIL=f"/var/mail/{to.pw_name}",
        )
        for name in opts["keep"]:  # type: ignore[attr-defined]
            if name in os.environ:
                env[name] = os.environ[name]
    env.update(
        SUDO_USER=me,
        SUDO_UID=str(os.getuid()),
        SUDO_GID=str(os.getgid()),
    )
    env.update(assigned)
    return env


def request(opts: dict[str, object], rest: list[str]) -> dict[str, object]:
    assigned: dict[str, str] = {}
    while rest and "=" in rest[0] and not rest[0].startswith("=") and rest[0].split("=")[0].isidentifier():
        name, _, value = rest.pop(0).partition("=")
        assigned[name] = value
    to = target(str(opts["user"]))
    env = environment(opts, to, assigned)
    cwd = os.getcwd() if os.path.isdir(".") else to.pw_dir
    if opts["login"] or opts["shell"]:
        shell = (to.pw_shell if opts["login"] else os.environ.get("SHELL") or to.pw_shell) or "/bin/sh"
        argv = [shell, "-l"] if opts["login"] else [shell]
        if rest:
            argv += ["-c", " ".join(rest)]
        if opts["login"]:
            cwd = to.pw_dir
    elif rest:
        argv = rest
    else:
        raise Usage("a command is required")
    env["SUDO_COMMAND"] = " ".join(argv)[:4096]
    return {"argv": argv, "user": to.pw_uid, "env": env, "cwd": cwd}


def run(req: dict[str, object]) -> int:
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(SOCKET)
    except OSError as exc:
        sys.stderr.write(f"sudo: this sandbox's agent does not serve sudo ({exc.strerror})\n")
        return 1
    sock.sendmsg(
        [json.dumps(req).encode("utf-8", "surrogateescape")],
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())],
    )

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            sock.send(bytes([signum]))

    for name in FORWARD:
        signal.signal(getattr(signal, name), forward)
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    try:
        answer = json.loads(reply.decode("utf-8", "replace"))
    except ValueError:
        sys.stderr.write("sudo: the agent ended the command without an answer\n")
        return 1
    if "error" in answer:
        sys.stderr.write(f"sudo: {answer['error']}\n")
        return 1
    return int(answer.get("exit_code", 1))


def main(args: list[str]) -> int:
    try:
        opts, rest = parse(args)
        if opts.get("help"):
            sys.stdout.write(USAGE)
            return 0
        if opts.get("version"):
            sys.stdout.write(VERSION)
            return 0
        if not rest and not (opts["login"] or opts["shell"]) and (opts.get("reset") or opts.get("validate")):
            return 0  # no password, no timestamp: nothing to validate or forget
        return run(request(opts, rest))
    except Usage as exc:
        sys.stderr.write(f"sudo: {exc}\n{USAGE}")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
