"""Two API replicas on one PostgreSQL under an open-loop create load, with one replica killed (-9)
half-way (docs/fleet.md).

Each cycle creates a sandbox through a replica (alternating), runs `true` in it through the *other*
replica, and kills it; cycles start at a fixed rate whether earlier ones finished or not. At half
time replica A gets SIGKILL: from then on cycles go to B alone. Printed: cycles, errors (before and
after the kill, by code), create and cross-replica exec latency, and what was left afterwards
(sandboxes neither killed nor lost, which would be leaks).

    .venv/bin/python bench/fleet.py --rate 10 --seconds 30
    .venv/bin/python bench/fleet.py --spread 60    # two replicas + a node-only third: placement and
                                                   # exec/files/PTY through the other replica for each
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import pg
from cove.devserver import Server
from loadgen import Client, HTTPError

KEY = "cove_bench_fleet_" + "cd" * 8


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else (values or [0.0])[0]


async def run(rate: float, seconds: float, kill: bool, exec_: bool = True) -> None:
    postgres = pg.Postgres()
    postgres.start()
    url = postgres.create_database()
    env = {"COVE_DATABASE_URL": url, "COVE_API_KEY": KEY, "COVE_KERNEL": "0", "COVE_POOLS": "base=4:32"}
    a = Server("bfleet-a", {**env, "COVE_NODE_ID": "bench-a"})
    b = Server("bfleet-b", {**env, "COVE_NODE_ID": "bench-b"})
    for s in (a, b):
        s.api_key = KEY
        s.start()
    await asyncio.sleep(3)  # both nodes see each other (heartbeat 1 s) and fill their pools
    clients = {"a": Client(a.url, KEY), "b": Client(b.url, KEY)}
    dead: set[str] = set()
    creates: list[float] = []
    execs: list[float] = []
    errors: dict[str, Counter[str]] = {"before": Counter(), "after": Counter()}
    examples: dict[str, str] = {}  # one message of each kind of error
    ends: list[float] = []  # when each cycle finished (the rate actually sustained)
    made: list[str] = []
    killed_at: float | None = None

    async def cycle(i: int) -> None:
        phase = "after" if killed_at is not None else "before"
        first, second = ("a", "b") if i % 2 else ("b", "a")
        first, second = (first if first not in dead else "b"), (second if second not in dead else "b")
        try:
            t0 = time.perf_counter()
            sb = await clients[first].request("POST", "/v1/sandboxes", {"timeout": 300})
            creates.append(time.perf_counter() - t0)
            made.append(sb["id"])
            if exec_:
                t0 = time.perf_counter()
                await clients[second].request("POST", f"/v1/sandboxes/{sb['id']}/exec", {"cmd": "true"})
                execs.append(time.perf_counter() - t0)
            await clients[second].request("DELETE", f"/v1/sandboxes/{sb['id']}")
            ends.append(time.monotonic())
        except HTTPError as e:
            errors[phase][f"{e.status} {e.code}"] += 1
            examples.setdefault(f"{e.status} {e.code}", str(e))
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as e:
            # A request in flight on the replica that was killed: expected once, only "before".
            errors[phase][type(e).__name__] += 1

    tasks = []
    start = time.monotonic()
    n = int(rate * seconds)
    for i in range(n):
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        if kill and killed_at is None and i >= n // 2:
            assert a.proc is not None
            a.proc.kill()
            dead.add("a")
            killed_at = time.monotonic()
        tasks.append(asyncio.create_task(cycle(i)))
    await asyncio.gather(*tasks)
    await asyncio.sleep(12)  # the dead node is noticed: its sandboxes are marked lost
    with psycopg.connect(url, autocommit=True) as conn:
        states = Counter(
            state for (state,) in conn.execute("SELECT state FROM sandboxes WHERE id = ANY(%s)", (made,))
        )
    print(f"\n{n} cycles at {rate}/s for {seconds:.0f} s through two replicas (kill -9 of A: {kill})\n")
    print("| phase | errors |")
    print("|---|---|")
    for phase, c in errors.items():
        print(f"| {phase} the kill | {sum(c.values())} {dict(c) or ''} |")
    for kind, message in examples.items():
        print(f"  {kind}: {message}")
    print("\n| measure | p50 ms | p99 ms |")
    print("|---|---|---|")
    print(f"| create (pool or cold) | {pct(creates, 50) * 1000:.1f} | {pct(creates, 99) * 1000:.1f} |")
    if execs:
        print(
            f"| exec through the other replica | {pct(execs, 50) * 1000:.1f} | {pct(execs, 99) * 1000:.1f} |"
        )
    finished = max(ends) - start if ends else 0.0
    print(
        f"\ncycles finished within {finished:.1f} s of the first start ({len(ends) / max(finished, 1e-9):.1f}/s)"
    )
    print(f"\nsandbox states afterwards: {dict(states)} (anything but killed/lost would be a leak)")
    b.close()
    if kill:
        a.proc = None
        a.start()  # it adopts (and sweeps) what it held
    a.close()
    postgres.stop()


async def spread(count: int) -> None:
    """`count` sandboxes through two replicas and a node-only third: where they land, and exec,
    a file round trip and a PTY for each one through the replica that did not create it."""
    postgres = pg.Postgres()
    postgres.start()
    url = postgres.create_database()
    env = {"COVE_DATABASE_URL": url, "COVE_API_KEY": KEY, "COVE_KERNEL": "0", "COVE_POOLS": ""}
    servers = [
        Server("bspread-a", {**env, "COVE_NODE_ID": "spread-a"}),
        Server("bspread-b", {**env, "COVE_NODE_ID": "spread-b"}),
        Server("bspread-c", {**env, "COVE_NODE_ID": "spread-c"}, node_only=True),
    ]
    for s in servers:
        s.api_key = KEY
        s.start()
    await asyncio.sleep(3)
    a, b = Client(servers[0].url, KEY), Client(servers[1].url, KEY)
    failures: Counter[str] = Counter()
    ids: list[str] = []
    t0 = time.perf_counter()
    for i in range(count):
        ids.append((await (a if i % 2 else b).request("POST", "/v1/sandboxes", {"timeout": 600}))["id"])
    created = time.perf_counter() - t0

    async def check(i: int, sid: str) -> None:
        other = b if i % 2 else a
        try:
            out = await other.request("POST", f"/v1/sandboxes/{sid}/exec", {"cmd": f"echo {sid}"})
            if out["stdout"] != f"{sid}\n":
                failures["exec output"] += 1
            await other.request("POST", f"/v1/sandboxes/{sid}/exec", {"cmd": f"echo {i} > /tmp/n"})
            got = await other.request("POST", f"/v1/sandboxes/{sid}/exec", {"cmd": "cat /tmp/n"})
            if got["stdout"] != f"{i}\n":
                failures["file"] += 1
            proc = await other.request(
                "POST",
                f"/v1/sandboxes/{sid}/processes",
                {"cmd": "stty size", "pty": {"rows": 33, "cols": 77}},
            )
            done = await other.request(
                "POST", f"/v1/sandboxes/{sid}/processes/{proc['id']}/wait", {"timeout": 20}
            )
            if done.get("exit_code") != 0:
                failures["pty"] += 1
        except HTTPError as e:
            failures[f"{e.status} {e.code}"] += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(check(i, sid) for i, sid in enumerate(ids)))
    checked = time.perf_counter() - t0
    with psycopg.connect(url, autocommit=True) as conn:
        placed = Counter(
            n for (n,) in conn.execute("SELECT node_id FROM sandboxes WHERE id = ANY(%s)", (ids,))
        )
    print(f"\n{count} sandboxes through two replicas, three nodes\n")
    print("| node | sandboxes |\n|---|---|")
    for node, n in sorted(placed.items()):
        print(f"| {node} | {n} |")
    print(
        f"\ncreated in {created:.1f} s; exec + file + PTY through the other replica for each in {checked:.1f} s"
    )
    print(f"failures: {sum(failures.values())} {dict(failures) or ''}")
    for sid in ids:
        await a.request("DELETE", f"/v1/sandboxes/{sid}")
    for s in servers:
        s.close()
    postgres.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=10, help="cycles started per second")
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--no-kill", action="store_true", help="do not kill replica A half-way")
    p.add_argument("--no-exec", action="store_true", help="cycles are create and kill only (creates/s)")
    p.add_argument(
        "--spread", type=int, metavar="N", help="instead: N sandboxes over three nodes, checked each"
    )
    args = p.parse_args()
    if args.spread:
        asyncio.run(spread(args.spread))
    else:
        asyncio.run(run(args.rate, args.seconds, not args.no_kill, not args.no_exec))


if __name__ == "__main__":
    main()
