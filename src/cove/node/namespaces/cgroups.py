"""Per-sandbox cgroups on cgroup v1, v2 or the hybrid layout.

Limits (memory, cpu, pids) and freezing go to whichever hierarchy has the controller: on a hybrid
host that is v1, while the core v2 files (`cgroup.kill`, `cgroup.freeze`, `cgroup.events`) work on
the controller-less unified mount and are preferred where present, because they act on the whole
tree atomically. Standard library only (the launcher imports it).
"""

from __future__ import annotations

import _signal
import errno
import os
import time

CONTROLLERS = ("memory", "pids", "cpu", "freezer")
NORMAL_WEIGHT = 100  # cgroup2's default cpu.weight
BACKGROUND_WEIGHT = 1  # a pool member until it is claimed


class Layout:
    """Where each controller lives (a plain class: dataclasses would import inspect and re into the
    launcher, and so into every sandbox's pid 1)."""

    __slots__ = ("v1", "v2", "v2_controllers")

    def __init__(
        self,
        v1: dict[str, str] | None = None,
        v2: str | None = None,
        v2_controllers: frozenset[str] = frozenset(),
    ) -> None:
        self.v1 = v1 or {}  # controller -> mount point
        self.v2 = v2  # cgroup2 mount point
        self.v2_controllers = v2_controllers

    @property
    def kind(self) -> str:
        if self.v1 and self.v2:
            return "hybrid"
        return "v1" if self.v1 else "v2"


def detect_layout(mountinfo: str = "/proc/self/mountinfo") -> Layout:
    v1: dict[str, str] = {}
    v2: str | None = None
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _source, superopts = right.split()[:3]
            mountpoint = left.split()[4]
            if fstype == "cgroup2" and (v2 is None or mountpoint == "/sys/fs/cgroup"):
                v2 = mountpoint
            elif fstype == "cgroup":
                for opt in superopts.split(","):
                    if opt in CONTROLLERS and opt not in v1:
                        v1[opt] = mountpoint
    controllers: frozenset[str] = frozenset()
    if v2:
        try:
            with open(os.path.join(v2, "cgroup.controllers")) as f:
                controllers = frozenset(f.read().split())
        except OSError:
            pass
    return Layout(v1=v1, v2=v2, v2_controllers=controllers)


_LAYOUT: Layout | None = None


def layout() -> Layout:
    global _LAYOUT
    if _LAYOUT is None:
        _LAYOUT = detect_layout()
    return _LAYOUT


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


class Cgroup:
    """One sandbox's cgroup, named by a relative path such as `cove/sb123`."""

    def __init__(self, name: str, lay: Layout | None = None) -> None:
        self.name = name.strip("/")
        self.layout = lay or layout()

    # -- where each piece lives -------------------------------------------------
    def _v1_dir(self, controller: str) -> str | None:
        mnt = self.layout.v1.get(controller)
        return os.path.join(mnt, self.name) if mnt else None

    @property
    def v2_dir(self) -> str | None:
        return os.path.join(self.layout.v2, self.name) if self.layout.v2 else None

    @property
    def freezer_dir(self) -> str | None:
        """The cgroup whose freezer `freeze()` uses (what CRIU's --freeze-cgroup must name too)."""
        if self.v2_dir and os.path.exists(os.path.join(self.v2_dir, "cgroup.freeze")):
            return self.v2_dir
        return self._v1_dir("freezer")

    def frozen(self) -> bool:
        if self.v2_dir and os.path.exists(os.path.join(self.v2_dir, "cgroup.events")):
            return "frozen 1" in _read(os.path.join(self.v2_dir, "cgroup.events"))
        d = self._v1_dir("freezer")
        return bool(d) and _read(os.path.join(d, "freezer.state")).strip() == "FROZEN"

    def dirs(self) -> list[str]:
        out = [d for c in CONTROLLERS if (d := self._v1_dir(c))]
        if self.v2_dir:
            out.append(self.v2_dir)
        return sorted(set(out))

    def _controller_file(self, controller: str, v1_file: str, v2_file: str) -> str | None:
        d = self._v1_dir(controller)
        if d:
            return os.path.join(d, v1_file)
        if self.v2_dir and controller in self.layout.v2_controllers:
            return os.path.join(self.v2_dir, v2_file)
        return None

    # -- lifecycle -----------------------------------------------------------------
    def create(self) -> None:
        for d in self.dirs():
            os.makedirs(d, exist_ok=True)
        if self.layout.v2 and self.layout.v2_controllers:
            self._enable_v2_controllers()

    def _enable_v2_controllers(self) -> None:
        # On pure v2 every ancestor must delegate the controllers to its children.
        assert self.layout.v2
        wanted = [
            c
            for c in ("memory", "pids", "cpu")
            if c in self.layout.v2_controllers and c not in self.layout.v1
        ]
        if not wanted:
            return
        parts = self.name.split("/")
        path = self.layout.v2
        for part in parts:
            try:  # noqa: SIM105 (contextlib would be one more import in every sandbox's pid 1)
                _write(os.path.join(path, "cgroup.subtree_control"), " ".join("+" + c for c in wanted))
            except OSError:
                pass
            path = os.path.join(path, part)

    def set_limits(self, memory_bytes: int | None, cpu: float | None, pids: int | None) -> None:
        if memory_bytes is not None:
            f = self._controller_file("memory", "memory.limit_in_bytes", "memory.max")
            if f:
                _write(f, str(memory_bytes))
                swap_v1 = self._controller_file("memory", "memory.memsw.limit_in_bytes", "memory.swap.max")
                if swap_v1 and os.path.exists(swap_v1):
                    _write(swap_v1, str(memory_bytes) if swap_v1.endswith("memsw.limit_in_bytes") else "0")
        if pids is not None:
            f = self._controller_file("pids", "pids.max", "pids.max")
            if f:
                _write(f, str(pids))
        if cpu is not None:
            period = 100_000
            quota = max(1000, int(cpu * period))
            d = self._v1_dir("cpu")
            if d:
                _write(os.path.join(d, "cpu.cfs_period_us"), str(period))
                _write(os.path.join(d, "cpu.cfs_quota_us"), str(quota))
            elif self.v2_dir and "cpu" in self.layout.v2_controllers:
                _write(os.path.join(self.v2_dir, "cpu.max"), f"{quota} {period}")

    def set_weight(self, weight: int) -> None:
        """CPU weight against sibling sandboxes, in cgroup2 units (1–10000, normal 100); v1 shares
        scale it to 1024 for normal. Without a cpu controller it is a no-op."""
        f = self._controller_file("cpu", "cpu.shares", "cpu.weight")
        if f:
            is_v1 = f.endswith("cpu.shares")
            _write(f, str(max(2, weight * 1024 // NORMAL_WEIGHT) if is_v1 else weight))

    def add(self, pid: int) -> None:
        for d in self.dirs():
            _write(os.path.join(d, "cgroup.procs"), str(pid))

    def pids(self) -> list[int]:
        d = self.v2_dir or next(iter(self.dirs()), None)
        if not d:
            return []
        try:
            return [int(p) for p in _read(os.path.join(d, "cgroup.procs")).split()]
        except OSError:
            return []

    def memory_usage(self) -> int | None:
        f = self._controller_file("memory", "memory.usage_in_bytes", "memory.current")
        try:
            return int(_read(f)) if f else None
        except OSError:
            return None

    def cpu_usage_usec(self) -> int | None:
        """CPU time used by the whole tree: cgroup2's core `cpu.stat` exists with or without the cpu
        controller (so on hybrid hosts too); on pure v1 cove has no cpuacct group: unknown."""
        if not self.v2_dir:
            return None
        try:
            for line in _read(os.path.join(self.v2_dir, "cpu.stat")).splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value)
        except (OSError, ValueError):
            return None
        return None

    def memory_cache(self) -> int | None:
        """Page cache charged to the sandbox (`file` on v2, `cache` on v1)."""
        f = self._controller_file("memory", "memory.stat", "memory.stat")
        if not f:
            return None
        want = "cache" if self._v1_dir("memory") else "file"
        try:
            for line in _read(f).splitlines():
                key, _, value = line.partition(" ")
                if key == want:
                    return int(value)
        except (OSError, ValueError):
            return None
        return None

    def read(self, controller: str, v1_file: str, v2_file: str) -> str | None:
        f = self._controller_file(controller, v1_file, v2_file)
        try:
            return _read(f).strip() if f else None
        except OSError:
            return None

    # -- freeze / kill -------------------------------------------------------------
    def freeze(self, frozen: bool = True, timeout: float = 30.0) -> None:
        """Freeze (or thaw) every process; returns once the kernel reports the new state."""
        if self.v2_dir and os.path.exists(os.path.join(self.v2_dir, "cgroup.freeze")):
            _write(os.path.join(self.v2_dir, "cgroup.freeze"), "1" if frozen else "0")
            want = f"frozen {1 if frozen else 0}"
            deadline = time.monotonic() + timeout
            while want not in _read(os.path.join(self.v2_dir, "cgroup.events")):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cgroup {self.name} did not {'freeze' if frozen else 'thaw'}")
                time.sleep(0.0005)
            return
        d = self._v1_dir("freezer")
        if not d:
            raise OSError(errno.ENOTSUP, "no freezer available on this host")
        state = "FROZEN" if frozen else "THAWED"
        _write(os.path.join(d, "freezer.state"), state)
        deadline = time.monotonic() + timeout
        while _read(os.path.join(d, "freezer.state")).strip() != state:
            if time.monotonic() > deadline:
                raise TimeoutError(f"cgroup {self.name} did not reach {state}")
            time.sleep(0.0005)

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL every process in the tree and wait until it is empty.

        A pid-namespace init ignores SIGTERM, so signals to the leader are not enough.
        """
        v2kill = os.path.join(self.v2_dir, "cgroup.kill") if self.v2_dir else None
        deadline = time.monotonic() + timeout
        if v2kill and os.path.exists(v2kill):
            _write(v2kill, "1")
        else:
            try:
                self.freeze(True, timeout=2)
                frozen = True
            except (OSError, TimeoutError):
                frozen = False
            _kill_all(self.pids())
            if frozen:
                self.freeze(False, timeout=2)
        while self.pids():
            if time.monotonic() > deadline:
                raise TimeoutError(f"processes of cgroup {self.name} survived SIGKILL")
            _kill_all(self.pids())
            time.sleep(0.002)

    def remove(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        for d in self.dirs():
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    # EBUSY while the last exiting task is still being torn down.
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                    time.sleep(0.005)

    def exists(self) -> bool:
        return any(os.path.isdir(d) for d in self.dirs())


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:  # noqa: SIM105
            os.kill(pid, _signal.SIGKILL)
        except ProcessLookupError:
            pass


def remove_parent_if_empty(parent: str, lay: Layout | None = None) -> None:
    """Remove the shared parent cgroup (e.g. `cove`) when no sandbox is left under it."""
    lay = lay or layout()
    mounts = list(lay.v1.values()) + ([lay.v2] if lay.v2 else [])
    for mnt in set(mounts):
        d = os.path.join(mnt, parent.strip("/"))
        try:  # noqa: SIM105
            os.rmdir(d)
        except OSError:
            pass


def favor_dynmods(lay: Layout | None = None) -> bool:
    """Make moving a task into a cgroup cheap (≈0.4 ms instead of ≈15 ms here).

    Every migration takes the kernel's global threadgroup rwsem for writing, which waits an RCU grace
    period unless the hierarchy is mounted with `favordynmods`; that option makes forks and exits a
    little more expensive instead. The flag is global, so setting it on the cgroup2 mount is enough.
    Returns whether it is in effect. Opt out with COVE_CGROUP_FAVORDYNMODS=0.
    """
    lay = lay or layout()
    if not lay.v2 or os.environ.get("COVE_CGROUP_FAVORDYNMODS", "1") == "0":
        return False
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[4] == lay.v2 and right.split()[0] == "cgroup2":
                opts = [o for o in right.split()[2].split(",") if o not in ("rw", "ro")]
                break
        else:
            return False
    if "favordynmods" in opts:
        return True
    from cove import syscalls

    try:
        syscalls.mount(None, lay.v2, None, syscalls.MS_REMOUNT, ",".join([*opts, "favordynmods"]))
    except OSError:
        return False
    return True
