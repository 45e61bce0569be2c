"""Templates: create → first HTTP answer from a warm template (start command sealed running, restored
with CRIU) against a cold one with the same start command (started and waited for at each create),
and a plain create of `base` with nothing to start as the floor. Measured interleaved in one run."""

from __future__ import annotations

import time

import httpx

from core import Row
from cove import Sandbox, Template
from cove.devserver import Server

PORT = 8000
# The service: Python's HTTP server, and the same after a second of "boot" (imports, caches, models).
SERVICES = {
    "http.server": f"exec python3 -m http.server {PORT} --bind 127.0.0.1",
    "http.server after 1 s of boot": f"sleep 1; exec python3 -m http.server {PORT} --bind 127.0.0.1",
}


def _first_answer(srv: Server, client: httpx.Client, template: str, serve: bool) -> float:
    t = time.perf_counter()
    sb = Sandbox.create(template=template, url=srv.url, api_key=srv.api_key, timeout=120)
    try:
        if serve:
            while client.get(f"/v1/sandboxes/{sb.id}/ports/{PORT}/").status_code != 200:
                time.sleep(0.005)
        ms = (time.perf_counter() - t) * 1000
    finally:
        sb.kill()
    return ms


def run(runs: int = 20) -> dict:
    srv = Server("bench-templates", extra_env={"COVE_POOLS": ""})  # the floor: a real cold create
    srv.start()
    rows: dict[str, tuple[Row, Row]] = {}
    try:
        conn = {"url": srv.url, "api_key": srv.api_key}
        floor = Row("create of base, nothing to start")
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {srv.api_key}"}) as client:
            for n, (label, cmd) in enumerate(SERVICES.items()):
                ready = Template.wait_for_port(PORT)
                Template(f"warm{n}", **conn).start_cmd(cmd, ready=ready, warm=True).build()
                Template(f"cold{n}", **conn).start_cmd(cmd, ready=ready, warm=False).build()
                warm, cold = Row(f"warm: {label}"), Row(f"cold: {label}")
                for _ in range(runs):
                    warm.samples_ms.append(_first_answer(srv, client, f"warm{n}", True))
                    cold.samples_ms.append(_first_answer(srv, client, f"cold{n}", True))
                    if n == 0:
                        floor.samples_ms.append(_first_answer(srv, client, "base", False))
                rows[label] = (warm, cold)
                Template.delete(f"warm{n}", **conn)
                Template.delete(f"cold{n}", **conn)
        return {"rows": rows, "floor": floor}
    finally:
        srv.close()


def render(res: dict) -> list[str]:
    floor: Row = res["floor"]
    lines = [
        "## Templates: warm versus cold start",
        "Client-side time from `Sandbox.create(template=…)` to the first 200 from the template's HTTP",
        "server through cove's port proxy. Warm: the start command ran when the template was built and",
        "was sealed with its memory, so a create restores it already serving (CRIU). Cold: the same start",
        "command is started at create, which returns once its ready check (the port listens) passes.",
        f"Floor: a create of `base` with nothing to start, p50 {floor.p50:.1f} ms.",
        "",
        "| service | warm p50 ms | warm p95 ms | cold p50 ms | cold p95 ms | cold / warm |",
        "|---|---|---|---|---|---|",
    ]
    for label, (warm, cold) in res["rows"].items():
        lines.append(
            f"| {label} | {warm.p50:.1f} | {warm.pct(0.95):.1f} | {cold.p50:.1f} | {cold.pct(0.95):.1f} "
            f"| {cold.p50 / warm.p50:.1f}× |"
        )
    return lines


if __name__ == "__main__":
    print("\n".join(render(run(runs=10))))
