"""The guest agent's start, as a runtime that runs it as a file does (gVisor, a root with its own /usr):
`python3 -I -S agent.pyc` with its modules' .pyc linked flat beside it, until it writes `ok` on its
ready fd. Beside it, in the same run, the floor: the same interpreter doing nothing (`-c pass`).

    .venv/bin/python bench/guest.py [--runs 100] [--compare OTHER_GUEST_DIR]   # as root

`--compare` times another checkout's `src/cove/guest` in the same run, interleaved (before/after a
change to the agent). The default namespaces runtime pays none of this per sandbox: its fork server
imports the agent once and forks each sandbox's pid 1 from it.
"""

from __future__ import annotations

import argparse
import os
import py_compile
import select
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

GUEST = Path(__file__).resolve().parent.parent / "src" / "cove" / "guest"
PYTHON = "/usr/bin/python3"  # the guest interpreter (COVE_GUEST_PYTHON's default)


def compiled(src: Path) -> Path:
    """The agent's modules as the runtime links them into /run/cove: unchecked-hash .pyc, flat."""
    out = Path(tempfile.mkdtemp(prefix="cove-guest-bench-"))
    for p in src.glob("*.py"):
        if p.stem not in ("__init__", "kernel_bridge"):
            py_compile.compile(
                str(p),
                cfile=str(out / (p.stem + ".pyc")),
                doraise=True,
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            )
    (out / "config.json").write_text('{"env": {}, "user": null, "workdir": null}')
    return out


def start_ms(out: Path) -> float:
    r, w = os.pipe()
    t0 = time.perf_counter()
    argv = [PYTHON, "-I", "-S", str(out / "agent.pyc"), "--socket", str(out / "s.sock")]
    proc = subprocess.Popen(
        [*argv, "--config", str(out / "config.json")],
        env={"COVE_READY_FD": str(w)},
        pass_fds=(w,),
        start_new_session=True,
    )
    os.close(w)
    try:
        select.select([r], [], [], 10)
        if os.read(r, 2) != b"ok":
            raise SystemExit("the agent did not report ready")
        return (time.perf_counter() - t0) * 1000
    finally:
        os.close(r)
        os.killpg(proc.pid, 9)
        proc.wait()
        (out / "s.sock").unlink(missing_ok=True)


def floor_ms() -> float:
    t0 = time.perf_counter()
    subprocess.run([PYTHON, "-I", "-S", "-c", "pass"], check=True)
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--compare", type=Path, help="another guest package directory, timed in the same run")
    args = ap.parse_args()
    dirs = {"cove guest agent: start → ready (this tree)": compiled(GUEST)}
    if args.compare:
        dirs[f"cove guest agent: start → ready ({args.compare})"] = compiled(args.compare)
    samples: dict[str, list[float]] = {"python3 -I -S -c pass (floor)": [], **{k: [] for k in dirs}}
    for _ in range(args.runs):  # interleaved, so a noisy machine moves every row alike
        samples["python3 -I -S -c pass (floor)"].append(floor_ms())
        for name, out in dirs.items():
            samples[name].append(start_ms(out))
    floor = statistics.median(samples["python3 -I -S -c pass (floor)"])
    print("| measurement | p50 ms | p95 ms | modules | vs. floor |")
    print("|---|---|---|---|---|")
    for name, times in samples.items():
        s = sorted(times)
        out = dirs.get(name)
        modules = str(len(list(out.glob("*.pyc")))) if out else ""
        ratio = f"+{statistics.median(s) - floor:.2f} ms" if out else ""
        print(f"| {name} | {statistics.median(s):.2f} | {s[int(0.95 * len(s))]:.2f} | {modules} | {ratio} |")
    for out in dirs.values():
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
