"""Run every benchmark, print the tables, and write docs/benchmarks.md.

    .venv/bin/python bench/run.py [--runs 50]   # as root

Absolute times on a shared 2-core VM are noisy; read each figure against the floor measured in the
same run (the ratio column), and the CPU time beside the wall time.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import core
import e2b_compat
import egress
import egress_transparent
import gvisor
import interactive
import ports
import scale
import stateful
import templates
import volumes

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal")) / 2**20
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} × {model}, {mem:.0f} GiB, Linux {platform.release()}, load average {load}"


def render(result: dict, args: argparse.Namespace, extra: list[str]) -> str:
    rows: dict[str, core.Row] = result["rows"]
    bw = rows.get("bwrap_py")
    lines = [
        "| measurement | p50 ms | p95 ms | CPU ms | runs | vs. floor |",
        "|---|---|---|---|---|---|",
    ]
    for key, row in rows.items():
        ratio = ""
        if key == "create" and bw:
            ratio = f"{row.p50 / bw.p50:.2f}× bubblewrap+python (target ≤ 2.5×)"
        if key == "exec":
            ratio = "target p50 ≤ 3 ms"
        cpu = f"{row.cpu_ms:.1f}" if row.cpu_ms is not None else ""
        lines.append(
            f"| {row.name} | {row.p50:.2f} | {row.pct(0.95):.2f} | {cpu} | {len(row.samples_ms)} | {ratio} |"
        )
    m = result["memory"]
    mem = [
        "| idle sandboxes | RSS per sandbox | PSS per sandbox | cgroup memory per sandbox | target |",
        "|---|---|---|---|---|",
        f"| {m['sandboxes']} | {m['rss_mib']:.1f} MiB | {m['pss_mib']:.1f} MiB | {m['cgroup_mib']:.1f} MiB | ≤ 15 MB (cgroup memory) |",
    ]
    return "\n".join(
        [
            "# Benchmarks",
            "",
            f"Command: `.venv/bin/python bench/run.py --runs {args.runs}{' --quick' if args.quick else ''}`  ",
            f"Machine: {machine()}  ",
            f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "",
            "## Sandbox start and exec",
            "Create → first output is the client-side time of `POST /v1/sandboxes` plus `POST …/exec` of",
            "`echo hi` on one keep-alive connection. The floors run interleaved with cove's runs. CPU ms is the",
            "server's CPU time and its launcher's per create (kill included).",
            "",
            *lines,
            "",
            "## Idle memory",
            "Processes of idle sandboxes (the guest agent as pid 1 and its one pre-forked handler): summed",
            "resident set (which counts every shared page in full: the two share theirs with each other and",
            "with the launcher they were forked from), proportional set (shared pages split among their",
            "users) and the sandbox cgroup's own accounting, which is what a sandbox really costs.",
            "",
            *mem,
            "",
            *extra,
            "",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--exec-runs", type=int, default=200)
    ap.add_argument(
        "--quick", action="store_true", help="smaller sizes (snapshots up to 100 MB, forks up to 3)"
    )
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    for name, what in (
        ("creates", "creates from the warm pool"),
        ("concurrent", "concurrent creates"),
        ("rate", "creates per second, sustained"),
        ("safe_rate", "creates per second of a second sustained run (0: none)"),
        ("duration", "seconds of the sustained rate"),
        ("idle", "idle running sandboxes"),
        ("hibernated", "hibernated sandboxes, each resumed"),
    ):
        ap.add_argument(
            f"--{name.replace('_', '-')}",
            type=float if name == "duration" else int,
            help=f"{what} (bench/scale.py)",
        )
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/run.py needs root (it starts a cove server)")
    print(f"Machine: {machine()}", flush=True)
    result = core.run(runs=args.runs, exec_runs=args.exec_runs)
    st = stateful.run(pause_runs=20, sizes_mb=(10, 100), forks=(1, 3)) if args.quick else stateful.run()
    mem = stateful.run_memory(sizes_mb=(10, 100), forks=(1, 3)) if args.quick else stateful.run_memory()
    inter = interactive.run(runs=10 if args.quick else 30)
    compat = e2b_compat.run(runs=10 if args.quick else 30)
    exposed = ports.run(runs=50 if args.quick else 200)
    out = egress.run(runs=50 if args.quick else 200)
    transparent = egress_transparent.run(runs=50 if args.quick else 200)
    tpl = templates.run(runs=10 if args.quick else 30)
    vols = volumes.run(runs=3 if args.quick else 5)
    gv = gvisor.run(runs=5 if args.quick else 15)
    big = scale.run(scale.sizes_from(args))
    extra = [
        *scale.render(big, scale.plots(big)),
        "",
        *stateful.render(st),
        "",
        *stateful.render_memory(mem),
        "",
        *interactive.render(inter),
        "",
        *e2b_compat.render(compat),
        "",
        *ports.render(exposed),
        "",
        *egress.render(out),
        "",
        *egress_transparent.render(transparent),
        "",
        *templates.render(tpl),
        "",
        *volumes.render(vols),
        "",
        *gvisor.render(gv),
    ]
    text = render(result, args, extra)
    print(text)
    if not args.no_write:
        (ROOT / "docs" / "benchmarks.md").write_text(text)


if __name__ == "__main__":
    main()
