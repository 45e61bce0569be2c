"""The network policy of template build sandboxes: the public internet, plus the package registries
this host's own apt, pip and npm use, wherever those resolve (a mirror or a registry proxy may sit on
a private or reserved address, which an `open` sandbox may not reach without an explicit rule).

The registries are read from the host's configuration (apt sources, pip's index, npm's registry),
resolved, and allowed by address on ports 80 and 443; `COVE_BUILD_EGRESS_ALLOW` adds rules.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

from cove.network.egress_policy import Policy

log = logging.getLogger("cove.templates")
_TTL = 300.0
_cache: tuple[float, Policy] | None = None


def registry_hosts() -> set[str]:
    """Host names of the package registries the host's package managers are set up to use."""
    hosts: set[str] = set()
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            text = p.read_text()
        except OSError:
            continue
        for uri in re.findall(r"(?m)^(?:URIs:\s*|deb(?:-src)?\s+(?:\[[^\]]*\]\s+)?)(\S+)", text):
            hosts.add(urlsplit(uri).hostname or "")
    try:  # pip's own default index and file host, and any configured index
        from pip._internal.models.index import PyPI  # type: ignore[import-not-found]

        hosts |= {urlsplit(PyPI.url).hostname or "", PyPI.file_storage_domain}
    except Exception:
        pass
    for argv in (
        ["npm", "config", "get", "registry"],
        ["python3", "-m", "pip", "config", "get", "global.index-url"],
    ):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.startswith("http"):
            hosts.add(urlsplit(out).hostname or "")
    hosts.discard("")
    return hosts


async def build_policy() -> Policy:
    global _cache
    now = time.monotonic()
    if _cache and now - _cache[0] < _TTL:
        return _cache[1]
    hosts = await asyncio.to_thread(registry_hosts)
    rules: list[str] = []
    loop = asyncio.get_running_loop()
    for host in sorted(hosts):
        rules.append(host)
        try:
            infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            continue
        for info in infos:
            ip = str(info[4][0]).split("%")[0]
            for port in (80, 443):
                rules.append(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
    extra = [r.strip() for r in os.environ.get("COVE_BUILD_EGRESS_ALLOW", "").split(",") if r.strip()]
    policy = Policy.parse("open", sorted(set(rules)) + extra)
    _cache = (now, policy)
    log.info("build egress policy", extra={"registries": sorted(hosts)})
    return policy
