"""Interactive work: time to first output of a background process, PTY throughput; beside local floors."""

from __future__ import annotations

import json
import os
import pty
import statistics
import subprocess
import time
from pathlib import Path

from websockets.sync.client import connect

from cove.devserver import Server
from cove.storage import kernel_layer

# The floor for run_code: jupyter_client talking to a local ipykernel from the same environment.
LOCAL_KERNEL = r"""
import statistics, time
from jupyter_client.manager import start_new_kernel
km, kc = start_new_kernel(kernel_name="python3")
try:
    times = []
    for _ in range(RUNS):
        t = time.perf_counter()
        kc.execute_interactive("1+1", output_hook=lambda msg: None, timeout=30)
        times.append((time.perf_counter() - t) * 1000)
    print(statistics.median(times))
finally:
    kc.stop_channels()
    km.shutdown_kernel(now=True)
"""

PTY_BYTES = 20_000_000


def _local_first_output() -> float:
    t = time.perf_counter()
    with subprocess.Popen(["/bin/sh", "-c", "echo ready; sleep 5"], stdout=subprocess.PIPE) as p:
        assert p.stdout is not None
        p.stdout.readline()
        took = (time.perf_counter() - t) * 1000
        p.kill()
    return took


def _local_pty_mbps() -> float:
    pid, fd = pty.fork()
    if pid == 0:
        os.execv("/bin/sh", ["/bin/sh", "-c", f"head -c {PTY_BYTES} /dev/zero | tr '\\0' x"])
    got, t = 0, time.perf_counter()
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except OSError:
            break
        if not chunk:
            break
        got += len(chunk)
    took = time.perf_counter() - t
    os.waitpid(pid, 0)
    os.close(fd)
    return got / took / 1e6


def _local_kernel(srv: Server, runs: int) -> float | None:
    cache = srv.env["COVE_KERNEL_CACHE"]
    root = os.path.join(cache, kernel_layer.recipe_digest())
    python = f"{kernel_layer.MOUNT_PATH}/bin/python"
    argv = kernel_layer.mapped_argv(Path(root), [python, "-c", LOCAL_KERNEL.replace("RUNS", str(runs))])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    return float(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None


def run(runs: int = 20) -> dict:
    srv = Server("bench-interactive")
    srv.start()
    out: dict = {
        "first": [],
        "first_floor": [],
        "pty": None,
        "pty_floor": None,
        "code": [],
        "code_floor": None,
    }
    try:
        with srv.client() as c:
            sid = c.post("/v1/sandboxes", json={"timeout": 0}).json()["id"]
            base = f"/v1/sandboxes/{sid}/processes"
            for _ in range(runs):
                t = time.perf_counter()
                pid = c.post(base, json={"cmd": "echo ready; sleep 5"}).json()["id"]
                with c.stream("GET", f"{base}/{pid}/output", params={"offset": 0}) as r:
                    for line in r.iter_lines():
                        if line and json.loads(line)["type"] == "stdout":
                            break
                out["first"].append((time.perf_counter() - t) * 1000)
                c.delete(f"{base}/{pid}")
                out["first_floor"].append(_local_first_output())
            cmd = f"sleep 0.3; head -c {PTY_BYTES} /dev/zero | tr '\\0' x"
            pid = c.post(base, json={"cmd": cmd, "pty": {"rows": 24, "cols": 80}}).json()["id"]
            url = srv.url.replace("http://", "ws://") + f"{base}/{pid}/ws?offset=0"
            got, t = 0, time.perf_counter()
            with connect(
                url, additional_headers={"Authorization": f"Bearer {srv.api_key}"}, max_size=None
            ) as ws:
                for message in ws:
                    if isinstance(message, bytes):
                        got += len(message)
                    else:
                        break
            out["pty"] = got / (time.perf_counter() - t - 0.3) / 1e6
            out["pty_floor"] = _local_pty_mbps()
            if c.post(f"/v1/sandboxes/{sid}/contexts", json={}, timeout=180).status_code == 201:
                for i in range(runs + 3):
                    t = time.perf_counter()
                    with c.stream("POST", f"/v1/sandboxes/{sid}/code", json={"code": "1+1"}) as r:
                        for _ in r.iter_lines():
                            pass
                    if i >= 3:  # the first calls warm the kernel
                        out["code"].append((time.perf_counter() - t) * 1000)
                out["code_floor"] = _local_kernel(srv, runs)
            c.delete(f"/v1/sandboxes/{sid}")
    finally:
        srv.close()
    return out


def render(res: dict) -> list[str]:
    f, ff = res["first"], res["first_floor"]
    return [
        "## Background processes and terminals",
        "Time to first output: `POST …/processes` of `echo ready; sleep 5`, then its output stream until",
        "the first line; the floor is `subprocess.Popen` of the same command on the host, reading the first",
        f"line. PTY throughput: {PTY_BYTES / 1e6:.0f} MB written to a terminal in the sandbox and read over the",
        "WebSocket, beside the same through a local `pty.fork` on the host.",
        "",
        "| measurement | cove | local floor |",
        "|---|---|---|",
        f"| first output of a background process, p50 | {statistics.median(f):.1f} ms | {statistics.median(ff):.1f} ms |",
        f"| PTY throughput | {res['pty']:.0f} MB/s | {res['pty_floor']:.0f} MB/s |",
    ] + (
        [
            f'| `run_code("1+1")` round trip, p50 | {statistics.median(res["code"]):.1f} ms | '
            f"{res['code_floor']:.1f} ms (local jupyter_client + ipykernel) |"
        ]
        if res["code"] and res["code_floor"]
        else ["| `run_code` | not measured: no kernel environment | |"]
    )
