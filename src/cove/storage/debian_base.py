"""`debian:<suite>`: a real Debian root filesystem built with debootstrap, once per host.

Unlike `base` (the host's /usr bound read-only), this root has its own /usr, so `apt-get install`
works in it. debootstrap takes a minute or two, so its result is cached (`COVE_DEBIAN_CACHE`, default
`$COVE_HOME/debian`) by recipe; a server turns the cached tree into a layer (owned by the sandbox's
mapped ids) the first time a template asks for it. The mirror is the host's own apt source (or
`COVE_DEBIAN_MIRROR`), reached by the server, not from inside a sandbox.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

SUITES = ("bookworm",)  # what cove has tested; others are refused by name
VARIANT = "minbase"
INCLUDE = ("ca-certificates",)
VERSION = 1  # bump when the debootstrap recipe below changes

PASSWD_USER = "user:x:1000:1000:sandbox user:/home/user:/bin/bash\n"
GROUP_USER = "user:x:1000:\n"
SHADOW_USER = "user:*:19000:0:99999:7:::\n"
HOSTS = "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n"
# Where the host's /usr is bound, read-only: cove's guest agent runs with the host's interpreter
# (through the host's loader), so a root of any distribution, with or without Python, can be a sandbox.
HOST_USR = "/.cove/usr"

CONFIG = {
    "binds": [{"src": "/usr", "dst": HOST_USR, "ro": True}],
    "rootfs": "full",  # its own /usr: apt works; the guest agent runs from HOST_USR
    "user": "user",
    "workdir": "/home/user",
    "env": {},
}


class DebianError(Exception):
    """The Debian base could not be built; the message says why."""


def parse_ref(ref: str) -> str | None:
    """`debian:bookworm` -> "bookworm"; None when `ref` is not a Debian reference."""
    if not ref.startswith("debian:"):
        return None
    suite = ref.split(":", 1)[1]
    if suite not in SUITES:
        raise DebianError(
            f"unknown Debian base {ref!r}: cove builds {', '.join('debian:' + s for s in SUITES)}"
        )
    return suite


def host_mirror() -> str:
    """The Debian mirror the host's apt uses (COVE_DEBIAN_MIRROR overrides)."""
    if os.environ.get("COVE_DEBIAN_MIRROR"):
        return os.environ["COVE_DEBIAN_MIRROR"]
    texts = []
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            texts.append(p.read_text())
        except OSError:
            continue
    for text in texts:
        for uri in re.findall(r"(?m)^(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text):
            if uri.rstrip("/").endswith("/debian"):
                return uri
    raise DebianError("no Debian mirror found in the host's apt sources: set COVE_DEBIAN_MIRROR")


def recipe_digest(suite: str) -> str:
    text = f"{VERSION}|{suite}|{VARIANT}|{','.join(INCLUDE)}|{os.uname().machine}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_root(cache: Path, suite: str, log: Callable[[str], None]) -> Path:
    """The debootstrapped tree for `suite` (owned by host root), built once and reused."""
    out = cache / f"{suite}-{recipe_digest(suite)}"
    if (out / "DONE").exists():
        return out / "rootfs"
    if shutil.which("debootstrap") is None:
        raise DebianError("debian bases need debootstrap on the server (apt-get install debootstrap)")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{out.name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "rootfs").mkdir(parents=True)
    argv = [
        "debootstrap", f"--variant={VARIANT}", f"--include={','.join(INCLUDE)}",
        suite, str(tmp / "rootfs"), host_mirror(),
    ]  # fmt: skip
    log(f"building the Debian {suite} base with debootstrap (once per host; a minute or two)")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        tail = [*tail[-30:], line.rstrip()]
        if line.startswith(("I: Retrieving", "I: Validating", "I: Extracting")):
            continue  # one line per package: too chatty for a build log
        log(line.rstrip())
    if proc.wait() != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DebianError("debootstrap failed:\n" + "\n".join(tail))
    # Caches and logs that only grow the layer.
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "var/log"):
        for p in (tmp / "rootfs" / junk).glob("*"):
            if p.is_file():
                p.unlink()
    (tmp / "DONE").write_text("")
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out / "rootfs"


def trust_host_cas(root: Path) -> None:
    """Trust what the host trusts: the CAs it added itself (a company's, a registry proxy's) go into
    the root's /usr/local/share/ca-certificates, where Debian's `update-ca-certificates` (run when
    ca-certificates is upgraded) keeps them, and the host's bundle replaces the root's."""
    local = Path("/usr/local/share/ca-certificates")
    if local.is_dir():
        dst = root / "usr/local/share/ca-certificates"
        dst.mkdir(parents=True, exist_ok=True)
        for crt in local.glob("*.crt"):
            shutil.copy2(crt, dst / crt.name)
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    target = root / "etc/ssl/certs/ca-certificates.crt"
    if bundle.is_file() and target.parent.is_dir():
        target.unlink(missing_ok=True)
        shutil.copy2(bundle, target)


def fill(root: Path, tree: Path, uid_base: int) -> None:
    """Populate a layer with the cached tree, shifted into the sandbox's id range, plus cove's user
    `user` (uid 1000), mount points and a hosts file."""
    subprocess.run(["cp", "-a", "--reflink=auto", f"{tree}/.", str(root)], check=True)
    etc = root / "etc"
    with open(etc / "passwd", "a") as f:
        f.write(PASSWD_USER)
    with open(etc / "group", "a") as f:
        f.write(GROUP_USER)
    with open(etc / "shadow", "a") as f:
        f.write(SHADOW_USER)
    (etc / "hosts").write_text(HOSTS)
    (etc / "hostname").write_text("sandbox\n")
    (etc / "resolv.conf").unlink(missing_ok=True)
    (etc / "resolv.conf").write_text("")  # names are resolved by the egress proxy
    trust_host_cas(root)
    for d in ("run/cove", HOST_USR.lstrip("/"), "home/user"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "home/user", 0o750)
    home = str(root / "home/user")
    for dirpath, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            inside = (1000, 1000) if p.startswith(home) else (st.st_uid, st.st_gid)
            os.lchown(p, uid_base + inside[0], uid_base + inside[1])
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                os.chmod(p, stat.S_IMODE(st.st_mode))  # chown cleared the setuid/setgid bits
    os.lchown(home, uid_base + 1000, uid_base + 1000)
    os.chown(root, uid_base, uid_base)
