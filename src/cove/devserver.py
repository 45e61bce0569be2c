"""A throwaway cove server in a subprocess, with its own data dir and cgroup parent.

Used by the tests, the benchmarks and anyone who wants a scratch server from Python:
sandboxes survive `restart()`, as they do in production; `close()` kills them and checks that
nothing (mounts, cgroups) was left behind.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

UPLOAD_LIMIT = 32 * 1024 * 1024  # small enough for a test to exceed it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `cove serve` subprocess. Sandboxes survive `restart()`, as they do in production."""

    def __init__(self, tag: str, extra_env: dict[str, str] | None = None) -> None:
        self.extra_env = extra_env or {}
        self.home = Path(tempfile.mkdtemp(prefix=f"cove-test-{tag}-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = "cove_test_" + secrets.token_hex(12)
        self.cgroup_parent = f"cove-test-{tag}-{os.getpid()}"
        self.log = self.home.parent / f"{self.home.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "COVE_HOME": str(self.home),
            "COVE_API_KEY": self.api_key,
            "COVE_CGROUP_PARENT": self.cgroup_parent,
            "COVE_URL": self.url,
            "COVE_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
            # One kernel environment for every scratch server (built once, on first use).
            "COVE_KERNEL_CACHE": os.environ.get("COVE_KERNEL_CACHE", "/var/cache/cove-test-kernel"),
            # Likewise one debootstrapped Debian base for every test run (docs/templates.md).
            "COVE_DEBIAN_CACHE": os.environ.get("COVE_DEBIAN_CACHE", "/var/cache/cove-test-debian"),
            **self.extra_env,
        }

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cove", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"cove serve exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"cove serve did not become ready:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self, api_key: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {api_key or self.api_key}"}, timeout=60
        )

    def kill_all(self) -> None:
        with self.client() as c:
            for state in ("running", "starting", "paused", "hibernated"):  # every state holding resources
                for sb in (
                    c.get("/v1/sandboxes", params={"state": state, "limit": 1000}).json().get("items", [])
                ):
                    c.delete(f"/v1/sandboxes/{sb['id']}")

    def close(self) -> None:
        try:
            if self.proc and self.proc.poll() is None:
                self.kill_all()
        finally:
            self.stop()
            # The server keeps its storage image mounted (sandboxes outlive it); a scratch one goes.
            storage = self.home / "storage"
            if os.path.ismount(storage):
                subprocess.run(["umount", str(storage)], check=False)
            leftovers = leaks(self)
            shutil.rmtree(self.home, ignore_errors=True)
            if leftovers:
                raise AssertionError(f"sandbox resources leaked: {leftovers}")
            self.log.unlink(missing_ok=True)


def leaks(server: Server) -> list[str]:
    """Mounts under the server's home and cgroups under its parent that are still there."""
    found = []
    with open("/proc/self/mountinfo") as f:
        found += [line.split()[4] for line in f if str(server.home) in line]
    for root, dirs, _ in os.walk("/sys/fs/cgroup"):
        if server.cgroup_parent in dirs:
            found.append(os.path.join(root, server.cgroup_parent))
        if root.count("/") > 4:
            dirs[:] = []
    return found
