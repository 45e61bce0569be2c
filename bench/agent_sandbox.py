"""agent-sandbox's API on cove (docs/agent-sandbox.md): claim -> Ready through the unmodified
k8s-agent-sandbox client, side by side with the paths under it, on one cluster: the tests' Kubernetes
v1.20.2 control plane (tests/kube.py), a `cove serve` that is its node (cove.kube.kubelet), the controller
and the router as processes.

    .venv/bin/python bench/agent_sandbox.py [--runs 30]   # as root; needs scripts/kube/build.sh's binaries

Rows, interleaved round by round (so a noisy machine moves every row alike):
- warm claim: `SandboxClient.create_sandbox(warmpool=...)`, the claim's create to its Ready as the client
  waits for it (one watch on the claim); the pool is refilled, out of the clock, before each;
- warm claim + first command: the same, then `commands.run("true")` through the router;
- cold claim: the same with `env`, which makes a new Sandbox from the template: its Pod, scheduled by
  kube-scheduler and started by cove's kubelet;
- Sandbox create -> Ready: a Sandbox object made directly (controller -> Pod -> kubelet -> status);
- Pod create -> Running: a plain Pod with runtimeClassName cove-namespaces, no controller (kube-scheduler,
  then the kubelet), timed with a watch as the others are.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the control plane the tests run (tests/kube.py)

import kube
from cove.devserver import Server, free_port
from cove.kube.agent_sandbox import crds

NS = "default"
SB = f"/apis/{crds.AGENTS}/v1beta1/namespaces/{NS}/sandboxes"
EXT = f"/apis/{crds.EXTENSIONS}/v1beta1/namespaces/{NS}"
CONTAINER = {"name": "main", "image": "cove/base"}


def until(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.01)
    return value


def watch_until(
    k8s: httpx.Client, url: str, name: str, done: Callable[[dict[str, Any]], bool], start: Callable[[], None]
) -> float:
    """ms from `start()` (a create) to the first watch event of `name` for which `done` holds."""
    rv = k8s.get(url, params={"limit": 1}).json()["metadata"]["resourceVersion"]
    params = {
        "watch": "1",
        "resourceVersion": rv,
        "fieldSelector": f"metadata.name={name}",
        "timeoutSeconds": "60",
    }
    with k8s.stream("GET", url, params=params, timeout=70) as r:
        t0 = time.perf_counter()
        start()
        for line in r.iter_lines():
            event = json.loads(line)
            if event["type"] in ("ADDED", "MODIFIED") and done(event["object"]):
                return (time.perf_counter() - t0) * 1000
    raise TimeoutError(name)


def ready(obj: dict[str, Any]) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True" for c in obj.get("status", {}).get("conditions", [])
    )


def pool_full(k8s: httpx.Client, n: int) -> bool:
    status = k8s.get(f"{EXT}/sandboxwarmpools/pool").json().get("status", {})
    return status.get("readyReplicas") == n and status.get("replicas") == n


def gone(k8s: httpx.Client, url: str) -> bool:
    return k8s.get(url).status_code == 404


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--pool", type=int, default=2, help="warm pool replicas")
    args = ap.parse_args()
    why = kube.missing()
    if why:
        sys.exit(why)
    from k8s_agent_sandbox import SandboxClient
    from k8s_agent_sandbox.models import SandboxDirectConnectionConfig
    from kubernetes import config as kconfig

    cp = kube.KubeControlPlane()
    cp.start()
    procs: list[subprocess.Popen[bytes]] = []
    server = Server("bench-asb", extra_env={"COVE_KUBECONFIG": str(cp.kubeconfig), "COVE_POOLS": ""})
    try:
        server.start()
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT / "src"),
            "COVE_API_KEY": server.api_key,
            "COVE_LOG_LEVEL": "WARNING",
        }
        common = ["--kubeconfig", str(cp.kubeconfig), "--cove-url", server.url]
        run = [sys.executable, "-m", "cove.kube.agent_sandbox"]
        subprocess.run([*run, "install-crds", *common], env=env, check=True, capture_output=True)
        port = free_port()
        procs.append(subprocess.Popen([*run, "controller", *common, "--identity", "bench"], env=env))
        procs.append(
            subprocess.Popen([*run, "router", *common, "--host", "127.0.0.1", "--port", str(port)], env=env)
        )
        router_url = f"http://127.0.0.1:{port}"
        with cp.client() as k8s:
            until("the node is Ready", lambda: any(
                ready(n) for n in k8s.get("/api/v1/nodes").json().get("items", [])))  # fmt: skip
            until("the router", lambda: _up(router_url))
            k8s.post(f"{EXT}/sandboxtemplates", json={
                "apiVersion": "extensions.agents.x-k8s.io/v1beta1", "kind": "SandboxTemplate", "metadata": {"name": "tpl"},
                "spec": {"podTemplate": {"spec": {"containers": [CONTAINER]}}, "envVarsInjectionPolicy": "Allowed"}})  # fmt: skip
            k8s.post(f"{EXT}/sandboxwarmpools", json={
                "apiVersion": "extensions.agents.x-k8s.io/v1beta1", "kind": "SandboxWarmPool", "metadata": {"name": "pool"},
                "spec": {"replicas": args.pool, "sandboxTemplateRef": {"name": "tpl"}}})  # fmt: skip
            until("the warm pool", lambda: pool_full(k8s, args.pool))
            client = SandboxClient(
                connection_config=SandboxDirectConnectionConfig(api_url=router_url),
                api_client=kconfig.new_client_from_config(config_file=str(cp.kubeconfig)),
            )

            def claim(first_command: bool = False, cold: bool = False) -> float:
                until("the warm pool", lambda: pool_full(k8s, args.pool))
                t0 = time.perf_counter()
                sb = client.create_sandbox(warmpool="pool", namespace=NS, env={"X": "1"} if cold else None)
                if first_command:
                    assert sb.commands.run("true").exit_code == 0
                ms = (time.perf_counter() - t0) * 1000
                sb.terminate()
                return ms

            def sandbox() -> float:
                name = f"direct-{secrets.token_hex(3)}"
                body = {"apiVersion": "agents.x-k8s.io/v1beta1", "kind": "Sandbox", "metadata": {"name": name},
                        "spec": {"podTemplate": {"spec": {"containers": [CONTAINER]}}}}  # fmt: skip
                ms = watch_until(k8s, SB, name, ready, lambda: k8s.post(SB, json=body).raise_for_status())
                k8s.delete(f"{SB}/{name}")
                until("deleted", lambda: gone(k8s, f"{SB}/{name}"))
                return ms

            def pod() -> float:
                name = f"plain-{secrets.token_hex(3)}"
                url = f"/api/v1/namespaces/{NS}/pods"
                body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                        "spec": {"runtimeClassName": "cove-namespaces", "containers": [CONTAINER]}}  # fmt: skip
                ms = watch_until(k8s, url, name, lambda p: p.get("status", {}).get("phase") == "Running",
                                 lambda: k8s.post(url, json=body).raise_for_status())  # fmt: skip
                k8s.delete(f"{url}/{name}")
                until("deleted", lambda: gone(k8s, f"{url}/{name}"))
                return ms

            cases: dict[str, Callable[[], float]] = {
                "warm claim -> Ready (k8s-agent-sandbox create_sandbox)": claim,
                "warm claim -> Ready + first commands.run": lambda: claim(first_command=True),
                "cold claim (env) -> Ready": lambda: claim(cold=True),
                "Sandbox create -> Ready (controller + kubelet)": sandbox,
                "Pod create -> Running (kube-scheduler + kubelet, no controller)": pod,
            }
            samples: dict[str, list[float]] = {name: [] for name in cases}
            for i in range(args.runs + 3):  # 3 warm-up rounds
                for name, case in cases.items():
                    ms = case()
                    if i >= 3:
                        samples[name].append(ms)
    finally:
        for p in procs:
            p.terminate()
            p.wait(15)
        server.close()
        cp.stop()
    print(f"| measurement ({args.runs} runs, warm pool of {args.pool}) | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|")
    for name, times in samples.items():
        s = sorted(times)
        p99 = s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]
        print(f"| {name} | {statistics.median(s):.0f} | {p99:.0f} | {s[-1]:.0f} |")


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
