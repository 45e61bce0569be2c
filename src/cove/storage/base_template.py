"""The default template `base`: the host's /usr, read-only, under a small root layer of its own.

The layer holds an allow-listed copy of /etc (never the host's passwd, shadow, keys or machine-id),
a user `user` (uid 1000, home /home/user) and root, mount points, and in /opt/cove/bin what e2b's
base image has and code written for it assumes: `sudo` (no password; through the sandbox's agent,
see cove/guest/sudo.py) and `python` (the host's python3), first on every PATH. Files are owned by the
sandbox's mapped ids (uid 0 inside = `uid_base` outside) so root inside can change its own copy of
them; the layer itself never changes, writes land in each sandbox's upper dir.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

VERSION = 5  # bump when the layer's recipe changes

BIN = "opt/cove/bin"  # on every command's PATH (the guest's BASE_PATH, and login shells: PROFILE)
PROFILE = (
    "# cove: its commands (sudo, python) come first, as in a command's environment\n"
    'case ":$PATH:" in *:/opt/cove/bin:*) ;; *) PATH="/opt/cove/bin:$PATH" ;; esac\n'
    "export PATH\n"
)

# /etc entries copied from the host: what programs need to run; nothing that identifies or unlocks it.
ETC_ALLOWLIST = (
    "alternatives", "bash.bashrc", "ca-certificates.conf", "debian_version", "environment", "gai.conf",
    "host.conf", "inputrc", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "login.defs",
    "magic", "magic.mime", "mime.types", "networks", "nsswitch.conf", "os-release", "profile",
    "profile.d", "protocols", "python3", "python3.11", "services", "shells", "skel", "ssl/certs",
    "ssl/openssl.cnf", "timezone", "terminfo", "locale.alias", "bindresvport.blacklist", "fonts",
    "R",  # R's own settings (Renviron, ldpaths): R contexts
    "java-17-openjdk", "java-21-openjdk",  # the JDK's (java.security): Java contexts
)  # fmt: skip

PASSWD = """root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
user:x:1000:1000:sandbox user:/home/user:/bin/bash
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
"""
GROUP = """root:x:0:
daemon:x:1:
tty:x:5:
users:x:100:user
user:x:1000:
nogroup:x:65534:
"""
SHADOW = "root:*:19000:0:99999:7:::\nuser:*:19000:0:99999:7:::\n"
HOSTS = "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n"

CONFIG = {
    "binds": [{"src": "/usr", "dst": "/usr", "ro": True}],
    "user": "user",
    "workdir": "/home/user",
    "env": {},
}


def fill(root: Path, uid_base: int) -> None:
    """Populate a scratch dir with the base layer."""
    for link, target in (
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ):
        if os.path.lexists(f"/{link}"):
            os.symlink(target, root / link)
    for d in ("usr", "etc", "home", "root", "tmp", "var/tmp", "var/lib", "var/log", "var/cache", "run/cove",
              "proc", "dev", "sys", "mnt", "opt", "srv", "media"):  # fmt: skip
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    os.chmod(root / "var/tmp", 0o1777)
    os.chmod(root / "root", 0o700)

    etc = root / "etc"
    for name in ETC_ALLOWLIST:
        src = Path("/etc") / name
        dst = etc / name
        if not os.path.lexists(src):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, dst, symlinks=True, ignore_dangling_symlinks=True)
        else:
            shutil.copy2(src, dst, follow_symlinks=False)
    for name, text, mode in (
        ("passwd", PASSWD, 0o644),
        ("group", GROUP, 0o644),
        ("shadow", SHADOW, 0o640),
        ("hosts", HOSTS, 0o644),
        ("hostname", "sandbox\n", 0o644),
        ("resolv.conf", "", 0o644),
        ("mtab", None, 0),
    ):
        p = etc / name
        if text is None:
            os.symlink("../proc/self/mounts", p)
            continue
        p.write_text(text)
        os.chmod(p, mode)

    (etc / "profile.d").mkdir(exist_ok=True)
    (etc / "profile.d/cove-path.sh").write_text(PROFILE)
    bin_dir = root / BIN
    bin_dir.mkdir(parents=True)
    shutil.copyfile(Path(__file__).with_name("sudo_command.py"), bin_dir / "sudo")
    os.chmod(bin_dir / "sudo", 0o755)
    shutil.copyfile(Path(__file__).with_name("mcp_gateway_command.py"), bin_dir / "mcp-gateway")  # e2b's mcp=
    os.chmod(bin_dir / "mcp-gateway", 0o755)
    os.symlink("/usr/bin/python3", bin_dir / "python")

    home = root / "home/user"
    shutil.copytree("/etc/skel", home) if os.path.isdir("/etc/skel") else home.mkdir()
    os.chmod(home, 0o750)

    # Shift ownership into the sandbox's id range: host root -> root inside; home -> uid 1000.
    for dirpath, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            p = os.path.join(dirpath, name)
            inside = 1000 if p.startswith(str(home)) else 0
            os.lchown(p, uid_base + inside, uid_base + inside)
    os.chown(root, uid_base, uid_base)
