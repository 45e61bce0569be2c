"""Process checkpoint/restore with CRIU (≥ 4.1: Debian bookworm's 3.17 fails on current kernels)."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess

CRIU = os.environ.get("COVE_CRIU") or (
    "/usr/local/sbin/criu" if os.path.exists("/usr/local/sbin/criu") else (shutil.which("criu") or "criu")
)


@functools.cache
def criu_version() -> tuple[int, ...] | None:
    try:
        out = subprocess.run([CRIU, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(x) for x in m.groups() if x is not None) if m else None


def available() -> bool:
    v = criu_version()
    return v is not None and v >= (4, 1)
