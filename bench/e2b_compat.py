"""The e2b SDK against cove, beside cove's own SDK on the same server: what the compatibility layer costs.

Each operation runs interleaved through both clients (sync, one sandbox each), so load on the host
affects both alike.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from core import Row
from cove import Sandbox as CoveSandbox
from cove.devserver import Server


def _ms(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def run(runs: int = 30) -> dict[str, tuple[Row, Row]]:
    from e2b import Sandbox as E2BSandbox  # reads the variables below at each create

    srv = Server("bench-e2b")
    srv.start()
    os.environ.update(E2B_API_URL=srv.url, E2B_SANDBOX_URL=srv.url, E2B_API_KEY=srv.api_key)
    os.environ.pop("E2B_DEBUG", None)

    pairs: dict[str, tuple[Row, Row]] = {
        key: (Row(f"{label} (e2b SDK)"), Row(f"{label} (cove SDK)"))
        for key, label in [
            ("create", "create → kill"),
            ("run", "run `true`"),
            ("run_login", "run `true` (cove: `bash -l -c true`, what e2b runs)"),
            ("write", "write 4 KiB file"),
            ("read", "read 4 KiB file"),
            ("list", "list a directory"),
        ]
    }
    data = b"x" * 4096
    try:
        e2b = E2BSandbox.create(timeout=600)
        cove = CoveSandbox.create(url=srv.url, api_key=srv.api_key, timeout=600)
        for _ in range(runs):
            pairs["create"][0].samples_ms.append(_ms(lambda: E2BSandbox.create(timeout=60).kill()))
            pairs["create"][1].samples_ms.append(
                _ms(lambda: CoveSandbox.create(url=srv.url, api_key=srv.api_key, timeout=60).kill())
            )
            pairs["run"][0].samples_ms.append(_ms(lambda: e2b.commands.run("true")))
            pairs["run"][1].samples_ms.append(_ms(lambda: cove.exec("true")))
            # e2b's commands.run runs `/bin/bash -l -c CMD`: the same command through cove's exec
            pairs["run_login"][0].samples_ms.append(_ms(lambda: e2b.commands.run("true")))
            pairs["run_login"][1].samples_ms.append(_ms(lambda: cove.exec(["/bin/bash", "-l", "-c", "true"])))
            pairs["write"][0].samples_ms.append(_ms(lambda: e2b.files.write("/home/user/f", data)))
            pairs["write"][1].samples_ms.append(_ms(lambda: cove.files.write("/home/user/f", data)))
            pairs["read"][0].samples_ms.append(_ms(lambda: e2b.files.read("/home/user/f", format="bytes")))
            pairs["read"][1].samples_ms.append(_ms(lambda: cove.files.read("/home/user/f", format="bytes")))
            pairs["list"][0].samples_ms.append(_ms(lambda: e2b.files.list("/home/user")))
            pairs["list"][1].samples_ms.append(_ms(lambda: cove.files.list("/home/user")))
        e2b.kill()
        cove.kill()
    finally:
        srv.close()
    return pairs


def render(pairs: dict[str, tuple[Row, Row]]) -> list[str]:
    lines = [
        "## The e2b SDK on cove",
        "The unmodified `e2b` SDK (through `E2B_API_URL`/`E2B_SANDBOX_URL`) beside cove's own SDK, same",
        "server, interleaved. `run true` is `commands.run` (Connect RPC stream) against `exec`; e2b's SDK",
        "runs it as `/bin/bash -l -c true` (a login shell), so the second run row times cove's `exec` of that.",
        "",
        "| operation | e2b SDK p50 ms | cove SDK p50 ms | e2b / cove |",
        "|---|---|---|---|",
    ]
    for e2b, cove in pairs.values():
        label = e2b.name.removesuffix(" (e2b SDK)")
        lines.append(f"| {label} | {e2b.p50:.2f} | {cove.p50:.2f} | {e2b.p50 / cove.p50:.2f}× |")
    return lines


START_STAGES = {
    "e2b lookup": "e2b routing: the sandbox's record, its tokens checked",
    "route": "Connect's envelope and dependencies",
    "store": "the sandbox record (the service's own read)",
    "node": "node and guest client",
    "spawn": "spawn with attach: a handler, the process started, its id back",
    "attach": "the attach's first event (the process is there)",
    "output": "the response's headers",
    "start event": "the start event written",
    "run": "the command run to its end, its output relayed",
}


def start_stages(runs: int = 40) -> dict[str, float]:
    """Medians of the stages of `commands.run("true")`'s Start stream, from the server's access
    log (COVE_TRACE_STAGES=1 logs every stage of a request, those after its headers too)."""
    import json
    import statistics

    from e2b import Sandbox as E2BSandbox

    srv = Server("bench-e2b-stages", extra_env={"COVE_TRACE_STAGES": "1"})
    srv.start()
    os.environ.update(E2B_API_URL=srv.url, E2B_SANDBOX_URL=srv.url, E2B_API_KEY=srv.api_key)
    try:
        e2b = E2BSandbox.create(timeout=600)
        for _ in range(5):
            e2b.commands.run("true")
        time.sleep(0.3)  # the log writer's batch
        mark = srv.log.stat().st_size
        for _ in range(runs):
            e2b.commands.run("true")
        e2b.kill()
        time.sleep(0.3)
        acc: dict[str, list[float]] = {}
        for line in srv.log.read_bytes()[mark:].decode().splitlines():
            rec = json.loads(line)
            if rec.get("path") == "/process.Process/Start" and "stages" in rec:
                for part in rec["stages"].split(", "):
                    name, _, ms = part.partition(";dur=")
                    acc.setdefault(name, []).append(float(ms))
    finally:
        srv.close()
    return {k: statistics.median(v) for k, v in acc.items()}


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--stages"]:
        st = start_stages(int(sys.argv[2]) if len(sys.argv) > 2 else 40)
        print("| Start stage (median) | ms | what |\n|---|---|---|")
        for name, what in START_STAGES.items():
            if name in st:
                print(f"| {name} | {st[name]:.3f} | {what} |")
        print(f"| server total | {st.get('total', 0):.3f} | |")
    else:
        print("\n".join(render(run(int(sys.argv[1]) if len(sys.argv) > 1 else 30))))
