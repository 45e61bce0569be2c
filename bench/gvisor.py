"""The gvisor runtime beside the namespaces runtime and raw `runsc run`, interleaved in one run.

- create → first output: `POST /v1/sandboxes` + `POST …/exec` of `echo hi` (then the sandbox is killed);
- exec round trip: `POST …/exec` of `true` on a running sandbox;
- syscall-heavy: a Python loop of 200,000 `os.getppid()` + 20,000 `os.stat()` calls, timed inside;
- floor: `runsc run` of `/bin/true` from an OCI bundle over a bind-mounted /usr (no cove at all),
  and the same loop on the host.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from core import Row
from cove.config import Settings
from cove.devserver import Server
from cove.node.gvisor.runtime import detect

LOOP = (
    "import os, time\n"
    "t = time.perf_counter()\n"
    "for _ in range(200000): os.getppid()\n"
    "for _ in range(20000): os.stat('/usr')\n"
    "print((time.perf_counter() - t) * 1000)\n"
)


def _bundle(root: Path) -> None:
    rootfs = root / "rootfs"
    for d in ("usr", "proc", "dev", "tmp"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "lib", "lib64", "sbin"):
        (rootfs / link).symlink_to(f"usr/{link}")
    spec = {
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": ["/bin/true"],
            "cwd": "/",
            "env": ["PATH=/usr/bin"],
        },
        "root": {"path": str(rootfs)},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]},
        ],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")]},
    }
    (root / "config.json").write_text(json.dumps(spec))


def _raw_runsc(runsc: str, platform: str, root: Path, n: int) -> None:
    subprocess.run(
        [runsc, "--root", str(root / "state"), f"--platform={platform}", "--network=none", "run",
         "--bundle", str(root), f"bench{n}"],
        check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def run(runs: int = 10) -> dict:
    settings = Settings()
    ok, why = detect(settings)
    if not ok:
        return {"skipped": why}
    rows = {
        k: Row(name)
        for k, name in (
            ("raw", "raw `runsc run` of /bin/true"),
            ("create_gvisor", "gvisor: create → first output"),
            ("create_ns", "namespaces: create → first output"),
            ("exec_gvisor", "gvisor: exec round trip (`true`)"),
            ("exec_ns", "namespaces: exec round trip (`true`)"),
            ("loop_host", "syscall loop on the host"),
            ("loop_gvisor", "gvisor: syscall loop"),
            ("loop_ns", "namespaces: syscall loop"),
        )
    }
    tmp = Path(tempfile.mkdtemp(prefix="cove-bench-runsc-"))
    srv = Server("bench-gvisor")
    srv.start()
    try:
        _bundle(tmp)
        runsc = shutil.which(settings.runsc) or settings.runsc
        with srv.client() as api:

            def create(rt: str) -> float:
                t = time.perf_counter()
                sb = api.post("/v1/sandboxes", json={"runtime": rt}).json()
                out = api.post(f"/v1/sandboxes/{sb['id']}/exec", json={"cmd": "echo hi"}).json()
                took = (time.perf_counter() - t) * 1000
                assert out["stdout"] == "hi\n", out
                api.delete(f"/v1/sandboxes/{sb['id']}")
                return took

            for i in range(runs):
                t = time.perf_counter()
                _raw_runsc(runsc, settings.runsc_platform, tmp, i)
                rows["raw"].samples_ms.append((time.perf_counter() - t) * 1000)
                subprocess.run([runsc, "--root", str(tmp / "state"), "delete", "--force", f"bench{i}"],
                               capture_output=True)  # fmt: skip
                rows["create_gvisor"].samples_ms.append(create("gvisor"))
                rows["create_ns"].samples_ms.append(create("namespaces"))
            boxes = {
                rt: api.post("/v1/sandboxes", json={"runtime": rt}).json()["id"]
                for rt in ("gvisor", "namespaces")
            }
            try:
                for _ in range(runs * 3):
                    for rt, sid in boxes.items():
                        t = time.perf_counter()
                        api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "true"})
                        rows["exec_gvisor" if rt == "gvisor" else "exec_ns"].samples_ms.append(
                            (time.perf_counter() - t) * 1000
                        )
                for _ in range(max(3, runs // 3)):
                    host = subprocess.run(["/usr/bin/python3", "-c", LOOP], capture_output=True, text=True)
                    rows["loop_host"].samples_ms.append(float(host.stdout))
                    for rt, sid in boxes.items():
                        out = api.post(
                            f"/v1/sandboxes/{sid}/exec", json={"argv": ["python3", "-c", LOOP]}
                        ).json()
                        rows["loop_gvisor" if rt == "gvisor" else "loop_ns"].samples_ms.append(
                            float(out["stdout"])
                        )
            finally:
                for sid in boxes.values():
                    api.delete(f"/v1/sandboxes/{sid}")
    finally:
        srv.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"rows": rows, "platform": settings.runsc_platform}


def render(result: dict) -> list[str]:
    lines = ["## gVisor runtime", ""]
    if "skipped" in result:
        return [*lines, f"Skipped: {result['skipped']}"]
    rows: dict[str, Row] = result["rows"]
    lines += [
        f"runsc platform `{result['platform']}`. Raw `runsc run` starts `/bin/true` from an OCI bundle with no cove",
        "at all (the floor for a gVisor create). The syscall loop is 200,000 `getppid()` + 20,000 `stat()` in",
        "Python, timed inside (interpreter start excluded).",
        "",
        "| measurement | p50 ms | p95 ms | runs | vs. |",
        "|---|---|---|---|---|",
    ]
    ref = {
        "create_gvisor": "raw",
        "exec_gvisor": "exec_ns",
        "loop_gvisor": "loop_host",
        "loop_ns": "loop_host",
    }
    for key, row in rows.items():
        if not row.samples_ms:
            continue
        vs = ""
        if key in ref and rows[ref[key]].samples_ms:
            vs = f"{row.p50 / rows[ref[key]].p50:.2f}× {rows[ref[key]].name}"
        lines.append(f"| {row.name} | {row.p50:.1f} | {row.pct(0.95):.1f} | {len(row.samples_ms)} | {vs} |")
    return lines


if __name__ == "__main__":
    if os.geteuid() != 0:
        raise SystemExit("needs root")
    print("\n".join(render(run(runs=5))))
