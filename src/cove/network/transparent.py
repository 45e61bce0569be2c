"""Transparent egress (COVE_EGRESS=transparent): every packet of a sandbox passes host-side nftables.

Each sandbox with a network mode other than `none` gets a veth pair: `eth0` inside (10.200.X.2/30,
default route via .1, IPv6 off) and `cv<node><id>` on the host (10.200.X.1/30). The host forwards and
masquerades what the sandbox's chains accept; there is no proxy and no proxy variable, so any program
(Node's fetch, a Go binary, git over ssh, UDP) works as it would on a host.

The nftables table `inet cove_<node>` (one per node data dir) holds base chains that dispatch by
interface name through verdict maps to per-sandbox chains, sets and counters, all replaced in one
atomic libnftables batch per change:
- `<s>_out` (forward, from the sandbox): spoofed sources, IPv6 and what is always blocked (other
  sandboxes, loopback, link-local and metadata, multicast, DNS to any resolver but cove's) are
  refused first; then the policy: IP/CIDR rules, the addresses its allowed names resolved to (set
  `<s>_pin`, ip . ports with timeouts), the addresses of denied names (`<s>_deny`);
- `<s>_in` (forward and output, to the sandbox): replies only, and the byte counter `<s>_rx`;
- `<s>_host` (input): only cove's resolver and SNI/Host peeker are reachable on the host itself;
- `<s>_nat` (prerouting): DNS to the resolver address goes to cove's DNS server, TCP 80/443 to
  addresses admitted by name goes to the peeker, which checks the TLS SNI or HTTP Host and splices.
An accepted flow carries the policy generation in its conntrack mark; a policy change bumps the
generation, so the next packet of every open flow is judged again by the new rules.

cove's DNS server (one per node, asyncio + dnspython) is every sandbox's resolver: a name the policy
does not allow is NXDOMAIN, an allowed name's answer is pinned into the sandbox's set before it goes
out, a denied name's addresses (also resolved in the background when the policy is set) are blocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import itertools
import json
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from cove.network import peek
from cove.network.egress_policy import IPAddress, Policy, Rule, normal_host, parse_ip
from cove.network.nft import Nft, NftError
from cove.network.nft import shared as shared_nft
from cove.network.sandbox_socket import home_netns
from cove.syscalls import CLONE_NEWNET, process_start_time, setns

log = logging.getLogger("cove.egress")

IP = "/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else "ip"
PREFIX = "cv"  # every cove node's sandbox interfaces: cv<node tag, 3><sandbox hash, 9>
PIN_MIN, PIN_MAX, TTL_DEFAULT = 30, 3600, 60  # seconds an answer's addresses stay pinned
ALWAYS_BLOCKED = ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/3")
# Not global (Python's ipaddress, RFC 6890): reached only through an explicit IP/CIDR rule or the
# operator's host map, as in proxy mode.
PROTECTED = (
    "10.0.0.0/8", "100.64.0.0/10", "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24",
    "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
)  # fmt: skip
PEEK_PORTS = (80, 443)
PEEK_TIMEOUT = 10.0
MAX_PEEKED = 256  # spliced connections open at once per sandbox (two threads each)
ANY = (1, 65535)


class TransparentError(RuntimeError):
    """The host cannot give sandboxes transparent egress (no nftables, not root…)."""


def problem() -> str | None:
    """Why this host cannot give transparent egress (None: it can)."""
    if os.geteuid() != 0:
        return "it needs root (veths, nftables, forwarding)"
    if not Path("/proc/sys/net/ipv4/ip_forward").exists():
        return "this kernel has no IPv4 forwarding"
    try:
        shared_nft().run_text("list tables")
    except NftError as e:
        return str(e)
    return None


def node_tag(home: Path | str) -> str:
    """Three hex digits naming this node's table and interfaces (several nodes may share a host)."""
    return hashlib.sha256(str(home).encode()).hexdigest()[:3]


def table_name(home: Path | str) -> str:
    return f"cove_{node_tag(home)}"


def interface(tag: str, sandbox_id: str) -> str:
    return PREFIX + tag + hashlib.sha256(sandbox_id.encode()).hexdigest()[:9]


def _run(argv: list[str], stdin: str | None = None) -> str:
    p = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise TransparentError(f"{' '.join(argv[:4])}: {p.stderr.strip() or p.returncode}")
    return p.stdout


def _inside(
    pid: int, start_time: int, argv: list[str], stdin: str | None = None, no_ipv6: bool = False
) -> str:
    """Run `argv` in the network namespace of sandbox init `pid`: a thread of its own enters it
    through a pidfd (a recycled pid cannot redirect it), turns IPv6 off there if asked (sysctls are
    the namespace's of the thread that opens them), and forks the command, which inherits it."""
    result: list[str | BaseException] = []

    def run() -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as e:
            result.append(TransparentError(f"process {pid} has ended: {e}"))
            return
        try:
            if process_start_time(pid) != start_time:
                raise TransparentError(f"process {pid} is not the sandbox's init any more")
            setns(pidfd, CLONE_NEWNET)
            try:
                if no_ipv6:
                    for conf in ("all", "default"):
                        Path(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6").write_text("1")
                result.append(_run(argv, stdin))
            finally:
                setns(home_netns(), CLONE_NEWNET)  # the thread ends anyway; its fd table is shared
        except BaseException as e:
            result.append(e)
        finally:
            os.close(pidfd)

    thread = threading.Thread(target=run, name="cove-netns", daemon=True)
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


@dataclass
class _Pin:
    ports: tuple[int, int]
    expires: float
    deny: bool = False


@dataclass(eq=False)
class _Peeked:
    name: str | None
    ip: str
    port: int
    socks: tuple[socket.socket, socket.socket]

    def close(self) -> None:
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


@dataclass
class _Box:
    sid: str
    policy: Policy
    ifname: str
    handle: dict[str, Any] | None = None
    index: int | None = None  # which /30 of the pool
    gen: int = 0
    pins: dict[tuple[str, str], dict[tuple[int, int, bool], _Pin]] = field(default_factory=dict)  # (name, ip)
    peeked: set[_Peeked] = field(default_factory=set)
    allowed: int = 0
    denied: int = 0
    last_denied: dict[str, Any] | None = None
    error: str | None = None
    carried: tuple[int, int] = (0, 0)  # bytes (out, in) of links this sandbox had before its current one
    chains: bool = False
    changed: bool = False  # its policy was set since this server wired it
    wired: bool = False  # this server has written its chains at least once


class Transparent:
    """The transparent egress of every sandbox of this node: links, nftables, DNS and the peeker."""

    def __init__(
        self,
        home: Path,
        hosts: dict[str, list[IPAddress]],
        rootfs: Callable[[str], Path],
        subnet: str = "10.200.0.0/16",
        upstream: str = "",
        rate: int = 0,
        connections: int = 512,
        on_result: Callable[[str], None] | None = None,
    ) -> None:
        self.home = Path(home)
        self.tag = node_tag(home)
        self.table = table_name(home)
        self.hosts = hosts
        self.rootfs = rootfs
        self.pool = ipaddress.IPv4Network(subnet)
        if self.pool.prefixlen > 28:
            raise TransparentError(f"COVE_EGRESS_SUBNET: {subnet} is too small (at most /28)")
        self.resolver = str(self.pool.network_address + 1)  # the first /30 is the resolver's, no sandbox's
        self.upstream = _host_port(upstream, 53) if upstream else None
        if why := problem():
            raise TransparentError(f"COVE_EGRESS=transparent: {why}")
        self.rate = rate
        self.connections = connections
        self.on_result = on_result or (lambda result: None)
        self._boxes: dict[str, _Box] = {}
        self._by_ip: dict[str, _Box] = {}
        self._nft: Nft | None = None
        self._started = False
        self._start_lock = asyncio.Lock()
        self._servers: list[Any] = []
        self._dns_port = 0
        self._peek_port = 0
        self._local: dict[str, tuple[bool, float]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in the background, held until it ends (the loop keeps only weak references)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- node-wide setup -----------------------------------------------------------------------------
    async def _start(self) -> None:
        async with self._start_lock:
            if self._started:
                return
            self._nft = await asyncio.to_thread(shared_nft)
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _DnsUdp(self), local_addr=("0.0.0.0", 0), family=socket.AF_INET
            )
            self._dns_port = transport.get_extra_info("sockname")[1]
            tcp = await asyncio.start_server(self._dns_tcp, "0.0.0.0", self._dns_port, family=socket.AF_INET)
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("0.0.0.0", 0))
            listener.listen(512)
            self._peek_port = listener.getsockname()[1]
            peeker = await asyncio.start_server(self._peek, sock=listener)
            self._servers = [transport, tcp, peeker]
            await asyncio.to_thread(self._base_table)
            self._started = True

    def _base_table(self) -> None:
        """The node's table and base chains (sandbox chains and map entries are kept: a restarted
        server adopts them)."""
        forwarding = Path("/proc/sys/net/ipv4/ip_forward")
        marker = self.home / "network-forwarding-was-off"
        if forwarding.read_text().strip() != "1":
            marker.write_text("cove turned IPv4 forwarding on; it forwards only sandboxes' traffic\n")
            forwarding.write_text("1")
        t = f"inet {self.table}"
        blocked = ", ".join([str(self.pool), *ALWAYS_BLOCKED])
        guard = (
            f'add rule {t} forward iifname != "{PREFIX}*" oifname != "{PREFIX}*" drop'
            if marker.exists()
            else ""
        )
        ours = f"{PREFIX}{self.tag}*"
        ports = f"{{ {self._dns_port}, {self._peek_port} }}"
        cmds = f"""
add table {t}
add set {t} blocked {{ type ipv4_addr; flags interval; }}
add set {t} protected {{ type ipv4_addr; flags interval; }}
flush set {t} blocked
flush set {t} protected
add element {t} blocked {{ {blocked} }}
add element {t} protected {{ {", ".join(PROTECTED)} }}
add map {t} out {{ type ifname : verdict; }}
add map {t} back {{ type ifname : verdict; }}
add map {t} host {{ type ifname : verdict; }}
add map {t} nat {{ type ifname : verdict; }}
add chain {t} forward {{ type filter hook forward priority filter - 5; policy accept; }}
add chain {t} input {{ type filter hook input priority filter - 5; policy accept; }}
add chain {t} output {{ type filter hook output priority filter - 5; policy accept; }}
add chain {t} prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}
add chain {t} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}
flush chain {t} forward
flush chain {t} input
flush chain {t} output
flush chain {t} prerouting
flush chain {t} postrouting
add rule {t} forward iifname vmap @out
add rule {t} forward oifname vmap @back
add rule {t} forward iifname "{ours}" drop
add rule {t} forward oifname "{ours}" drop
{guard}
add rule {t} input iifname vmap @host
add rule {t} input iifname "{ours}" drop
add rule {t} input meta l4proto {{ tcp, udp }} th dport {ports} drop
add rule {t} output oifname vmap @back
add rule {t} prerouting iifname vmap @nat
add rule {t} postrouting ip saddr {self.pool} oifname != "{PREFIX}*" masquerade
"""
        self._apply(cmds)

    def _apply(self, cmds: str) -> None:
        assert self._nft is not None
        self._nft.run_text("\n".join(line for line in cmds.splitlines() if line.strip()))

    # -- addresses -------------------------------------------------------------------------------------
    def _addresses(self, index: int) -> tuple[str, str]:
        base = self.pool.network_address + 4 * index
        return str(base + 1), str(base + 2)

    def _used(self, mine: _Box) -> set[int]:
        """The /30s taken on this host (by any node: all their host ends are in this namespace),
        read from the kernel's local routes (a file, not an exec)."""
        used = {b.index for b in self._boxes.values() if b.index is not None and b is not mine}
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
        for prev, line in itertools.pairwise(lines):
            if line.strip() == "/32 host LOCAL" and "|--" in prev:
                addr = ipaddress.IPv4Address(prev.split("|--")[1].strip())
                if addr in self.pool:
                    used.add((int(addr) - int(self.pool.network_address)) // 4)
        return used

    def _allocate(self, box: _Box, prefer: int | None) -> int:
        used = self._used(box) | {0}
        if prefer is not None and prefer not in used:
            return prefer
        for i in range(1, self.pool.num_addresses // 4):
            if i not in used:
                return i
        raise TransparentError(f"no free address in COVE_EGRESS_SUBNET {self.pool}")

    def _index_of(self, link: dict[str, Any] | None) -> int | None:
        for a in (link or {}).get("addr_info", []):
            if a.get("family") == "inet" and ipaddress.IPv4Address(a["local"]) in self.pool:
                return (int(ipaddress.IPv4Address(a["local"])) - int(self.pool.network_address)) // 4
        return None

    # -- links ---------------------------------------------------------------------------------------
    def _link(self, box: _Box) -> None:
        """Give the sandbox its veth (or adopt the one it has: a server restart). A fresh sandbox
        costs two execs of `ip`: the pair, then (in its namespace) its address and route."""
        assert box.handle is not None
        pid, start = int(box.handle["pid"]), int(box.handle["start_time"])
        mine = Path(f"/sys/class/net/{box.ifname}").exists()
        have = None
        if mine:  # a restarted server, or a pair left half-made: look at both ends
            host = json.loads(_run([IP, "-j", "-4", "addr", "show", "dev", box.ifname]) or "[]")
            links = json.loads(_inside(pid, start, [IP, "-j", "addr", "show"]) or "[]")
            have = self._index_of(next((li for li in links if li.get("ifname") == "eth0"), None))
            if have is not None and host and have == self._index_of(host[0]):
                box.index = have  # the same pair, still wired: adopt it
                self._by_ip[self._addresses(have)[1]] = box
                if not box.wired:  # a previous server's: its pins and what it counted
                    self._adopt_pins(box)
                    self._carry(box)
                return
        index = self._allocate(box, have if have is not None else box.index)
        gw, addr = self._addresses(index)
        if process_start_time(pid) != start:
            raise TransparentError(f"process {pid} is not the sandbox's init any more")
        pair = (
            f"link add {box.ifname} type veth peer name eth0 netns {pid}\n"
            f"addr add {gw}/30 dev {box.ifname}\nlink set {box.ifname} up\n"
        )
        try:
            if mine:
                raise TransparentError("replace it")
            _run([IP, "-batch", "-"], pair)
        except TransparentError:
            # Whatever holds the names (an old pair, links a restored namespace came with) goes.
            links = json.loads(_inside(pid, start, [IP, "-j", "link", "show"]) or "[]")
            batch = [f"link del {li['ifname']}" for li in links if li.get("ifname") not in ("lo", None)]
            if batch:
                _inside(pid, start, [IP, "-force", "-batch", "-"], "\n".join(batch) + "\n")
            with contextlib.suppress(TransparentError):
                _run([IP, "link", "del", box.ifname])
            _run([IP, "-batch", "-"], pair)
        with contextlib.suppress(OSError):
            Path(f"/proc/sys/net/ipv6/conf/{box.ifname}/disable_ipv6").write_text("1")
        config = f"addr add {addr}/30 dev eth0\nlink set eth0 up\nroute add default via {gw}\n"
        _inside(pid, start, [IP, "-batch", "-"], config, no_ipv6=True)
        box.index = index
        self._by_ip[addr] = box
        self._write_resolv(box.sid)

    def _adopt_pins(self, box: _Box) -> None:
        """The pins a previous server made (its answers are still in the sandbox's caches and open
        connections), kept until they expire; their names are not known, so no policy drops them."""
        assert self._nft is not None
        now = time.monotonic()
        for deny in (False, True):
            name = f"list set inet {self.table} {box.ifname}_{'deny' if deny else 'pin'}"
            try:
                objs = self._nft.run_text(name)["nftables"]
            except (NftError, KeyError):
                continue
            for obj in objs:
                for el in obj.get("set", {}).get("elem", []):
                    try:
                        ip, ports = el["elem"]["val"]["concat"]
                        lo, hi = ports["range"] if isinstance(ports, dict) else (ports, ports)
                        expires = now + float(el["elem"].get("expires", 0))
                    except (KeyError, TypeError, ValueError):
                        continue
                    entry = box.pins.setdefault(("", str(ip)), {})
                    entry[(int(lo), int(hi), deny)] = _Pin((int(lo), int(hi)), expires, deny)

    def _write_resolv(self, sandbox_id: str) -> None:
        """Point the sandbox's /etc/resolv.conf at cove's resolver, never following a link the
        sandbox may have put there."""
        root = self.rootfs(sandbox_id)
        try:
            fd = os.open(root / "etc", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as e:
            log.warning("cannot write resolv.conf", extra={"sandbox": sandbox_id, "error": str(e)})
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink("resolv.conf", dir_fd=fd)
            out = os.open(
                "resolv.conf", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=fd
            )
            with os.fdopen(out, "w") as f:
                f.write(
                    f"# cove's resolver: names follow the sandbox's egress policy\nnameserver {self.resolver}\n"
                )
        except OSError as e:
            log.warning("cannot write resolv.conf", extra={"sandbox": sandbox_id, "error": str(e)})
        finally:
            os.close(fd)

    def _unlink(self, box: _Box) -> None:
        """Remove the sandbox's host state: its interface (the pair goes with it) and nft objects."""
        if box.index is not None:
            self._by_ip.pop(self._addresses(box.index)[1], None)
        with contextlib.suppress(TransparentError):
            _run([IP, "link", "del", box.ifname])
        self._drop_chains(box.ifname)
        box.chains = False

    def _drop_chains(self, ifname: str) -> None:
        t, s = f"inet {self.table}", ifname
        with contextlib.suppress(NftError):
            existing = self._nft_names()
            cmds = [f'delete element {t} {m} {{ "{s}" }}' for m in ("out", "back", "host", "nat")
                    if (m, s) in existing["elements"]]  # fmt: skip
            cmds += [f"flush chain {t} {c}" for c in existing["chains"] if c.startswith(s + "_")]
            cmds += [f"delete chain {t} {c}" for c in existing["chains"] if c.startswith(s + "_")]
            cmds += [f"delete set {t} {c}" for c in existing["sets"] if c.startswith(s + "_")]
            cmds += [f"delete counter {t} {c}" for c in existing["counters"] if c.startswith(s + "_")]
            if cmds:
                self._apply("\n".join(cmds))

    def _nft_names(self) -> dict[str, Any]:
        assert self._nft is not None
        out: dict[str, Any] = {"chains": [], "sets": [], "counters": [], "elements": set()}
        for obj in self._nft.run_text(f"list table inet {self.table}").get("nftables", []):
            for kind, key in (("chain", "chains"), ("set", "sets"), ("counter", "counters")):
                if kind in obj:
                    out[key].append(obj[kind]["name"])
            if "map" in obj:
                for el in obj["map"].get("elem", []):
                    out["elements"].add((obj["map"]["name"], el[0]))
        return out

    def sweep(self, keep: set[str]) -> list[str]:
        """Host state of this node's sandboxes that are not in `keep` (left by a crash): removed."""
        try:
            self._nft = self._nft or shared_nft()
        except NftError:
            return []
        keep_names = {interface(self.tag, sid) for sid in keep}
        stray = set()
        with contextlib.suppress(NftError):
            stray |= {c.split("_")[0] for c in self._nft_names()["chains"] if c.startswith(PREFIX)}
        for link in json.loads(_run([IP, "-j", "link", "show"]) or "[]"):
            name = str(link.get("ifname", ""))
            if name.startswith(PREFIX + self.tag):
                stray.add(name)
        stray -= keep_names
        for name in stray:
            with contextlib.suppress(TransparentError):
                _run([IP, "link", "del", name])
            self._drop_chains(name)
        return sorted(stray)

    # -- rules -----------------------------------------------------------------------------------------
    def _rules(self, box: _Box) -> str:
        """The batch that (re)writes the sandbox's chains, sets and map entries for its policy."""
        assert box.index is not None
        t, s, p = f"inet {self.table}", box.ifname, box.policy
        gw, addr = self._addresses(box.index)
        # Each server starts from the clock: a restarted one never reuses its predecessor's marks.
        box.gen = (box.gen or int(time.time())) % 0xFFFF + 1
        mark = (int(hashlib.sha256(s.encode()).hexdigest()[:4], 16) << 16) | (box.gen & 0xFFFF)
        ok = f"goto {s}_ok"
        reject = "reject with icmpx type admin-prohibited"
        lines = [
            *(f"add chain {t} {s}_{c}" for c in ("out", "in", "host", "nat", "ok")),
            f"add set {t} {s}_pin {{ type ipv4_addr . inet_service; flags interval, timeout; }}",
            f"add set {t} {s}_deny {{ type ipv4_addr . inet_service; flags interval, timeout; }}",
            *(f"flush chain {t} {s}_{c}" for c in ("out", "in", "host", "nat", "ok")),
            # Counters start again from zero (what they held is in `carried`): add, delete, add.
            *(f"{op} counter {t} {s}_{c}" for c in ("tx", "rx") for op in ("add", "delete", "add")),
            f"flush set {t} {s}_pin",
            f"flush set {t} {s}_deny",
        ]
        out = [f'counter name "{s}_tx"', f"ip saddr != {addr} drop", f"meta nfproto ipv6 {reject}"]
        if self.rate:
            out.append(
                f"limit rate over {self.rate} bytes/second burst {max(self.rate // 10, 65536)} bytes drop"
            )
        out += [
            f"ct state established,related ct mark {mark} accept",
            f"ip daddr @blocked {reject}",
            f"meta l4proto != {{ tcp, udp }} {reject}",
            f"th dport {{ 53, 853 }} {reject}",  # DNS goes to cove's resolver only
            f"ct state new ct count over {self.connections} {reject}",
        ]
        cidr_allow = [r for r in p.allow if r.network is not None and r.network.version == 4]
        cidr_deny = [r for r in p.deny if r.network is not None and r.network.version == 4]
        named = [r for r in cidr_allow if _names_protected(r)]
        if p.mode == "allow":
            out += [f"{_match(r)} {reject}" for r in cidr_deny]
            out += [f"ip daddr . th dport @{s}_deny {reject}", f"ip daddr . th dport @{s}_pin {ok}"]
            out += [f"{_match(r)} {ok}" for r in named]
            out.append(f"ip daddr @protected {reject}")
            out += [f"{_match(r)} {ok}" for r in cidr_allow if r not in named]
            out += [f"{_ports(r)} {ok}" for r in p.allow if r.any_host]
        elif p.mode in ("deny", "open"):
            out.append(f"ip daddr . th dport @{s}_pin {ok}")
            out += [f"{_match(r)} {ok}" for r in named]
            if p.mode == "deny":
                out += [f"{_match(r)} {ok}" for r in cidr_allow if r not in named]
                out += [f"{_match(r)} {reject}" for r in cidr_deny]
                out += [f"{_ports(r)} {reject}" for r in p.deny if r.any_host]
                out.append(f"ip daddr . th dport @{s}_deny {reject}")
            out += [f"ip daddr @protected {reject}", ok]
        out.append(reject)
        lines += [f"add rule {t} {s}_out {r}" for r in out]
        lines += [f"add rule {t} {s}_ok ct mark set {mark} accept"]
        back = [f'counter name "{s}_rx"']
        if self.rate:
            back.append(
                f"limit rate over {self.rate} bytes/second burst {max(self.rate // 10, 65536)} bytes drop"
            )
        back += ["ct state established,related accept", "drop"]
        lines += [f"add rule {t} {s}_in {r}" for r in back]
        host = [
            f'counter name "{s}_tx"',
            f"ip saddr != {addr} drop",
            f"ip daddr {gw} meta l4proto {{ tcp, udp }} th dport {self._dns_port} ct status dnat accept",
            f"ip daddr {gw} tcp dport {self._peek_port} ct status dnat accept",
            "ct state established,related accept",
            reject,
        ]
        lines += [f"add rule {t} {s}_host {r}" for r in host]
        nat = [
            f"ip daddr {self.resolver} meta l4proto {{ tcp, udp }} th dport 53 redirect to :{self._dns_port}"
        ]
        peek_ports = "{ " + ", ".join(map(str, PEEK_PORTS)) + " }"
        if p.mode == "allow" and any(r.domain or r.any_host for r in p.allow):
            nat.append(f"ip daddr . tcp dport @{s}_pin tcp dport {peek_ports} redirect to :{self._peek_port}")
        elif p.mode == "deny" and any(r.domain for r in p.deny):
            nat.append(f"ip daddr != @blocked tcp dport {peek_ports} redirect to :{self._peek_port}")
        lines += [f"add rule {t} {s}_nat {r}" for r in nat]
        now = time.monotonic()
        pins: dict[tuple[str, int, int, bool], float] = {}
        for (name, ip), entries in list(box.pins.items()):
            for key, pin in list(entries.items()):
                if pin.expires <= now or not self._still(box, name, ip, pin):
                    del entries[key]
                    continue
                k = (ip, pin.ports[0], pin.ports[1], pin.deny)
                pins[k] = max(pins.get(k, 0.0), pin.expires)
            if not entries:
                del box.pins[(name, ip)]
        for (ip, lo, hi, deny), expires in pins.items():
            ports = str(lo) if lo == hi else f"{lo}-{hi}"
            left = max(1, int(expires - now))
            lines.append(
                f"add element {t} {s}_{'deny' if deny else 'pin'} {{ {ip} . {ports} timeout {left}s }}"
            )
        for m, c in (("out", "out"), ("back", "in"), ("host", "host"), ("nat", "nat")):
            lines.append(f'add element {t} {m} {{ "{s}" : jump {s}_{c} }}')
        return "\n".join(lines)

    def _still(self, box: _Box, name: str, ip: str, pin: _Pin) -> bool:
        """Does a pin made under an older policy hold under the current one?"""
        if not name:
            return not box.changed  # adopted after a restart: kept until a policy change
        fresh = self._pins_for(box.policy, name, parse_ip(ip), name in self.hosts)  # type: ignore[arg-type]
        return (pin.ports, pin.deny) in fresh

    def _carry(self, box: _Box) -> None:
        """Move what the counters hold into `carried` (before they are written again)."""
        out, inn = self._counters(box)
        box.carried = (box.carried[0] + out, box.carried[1] + inn)

    def _counters(self, box: _Box) -> tuple[int, int]:
        """Bytes (out, in) its counters hold (since its chains were last written)."""
        if self._nft is None:
            return 0, 0
        values = {}
        for name in ("tx", "rx"):
            try:
                objs = self._nft.run_text(f"list counter inet {self.table} {box.ifname}_{name}")["nftables"]
                values[name] = next(o["counter"]["bytes"] for o in objs if "counter" in o)
            except (NftError, KeyError, StopIteration):
                values[name] = 0
        return values["tx"], values["rx"]

    # -- the node's Network calls ----------------------------------------------------------------------
    async def attach(self, sandbox_id: str, handle: dict[str, Any], policy: Policy) -> None:
        """Wire the sandbox started with `handle` (mode none: later, when a policy lets it out)."""
        try:
            await self._start()
        except (NftError, OSError) as e:  # the sandbox runs without a way out; status says why
            self._boxes.setdefault(
                sandbox_id, _Box(sandbox_id, policy, interface(self.tag, sandbox_id))
            ).error = f"transparent egress is unavailable on this node: {e}"
            return
        box = self._boxes.get(sandbox_id)
        if box is None:
            box = self._boxes[sandbox_id] = _Box(sandbox_id, policy, interface(self.tag, sandbox_id))
        box.policy, box.handle, box.error = policy, dict(handle), None
        await self._wire(box)

    async def _wire(self, box: _Box) -> None:
        if box.policy.mode == "none" and not box.chains:
            return  # an empty namespace is free; a link costs ~13-18 ms
        try:
            if not box.chains or box.index is None:
                await asyncio.to_thread(self._link, box)
            else:
                self._carry(box)
            await asyncio.to_thread(self._apply, self._rules(box))
            box.chains = box.wired = True
        except (TransparentError, NftError, OSError, KeyError, ValueError) as e:
            box.error = f"transparent egress is unavailable for this sandbox: {e}"
            log.warning("transparent egress unavailable", extra={"sandbox": box.sid, "error": str(e)})
            return
        if box.policy.mode == "deny":
            self._spawn(self._pin_denied(box))

    async def detach(self, sandbox_id: str, forget: bool = False) -> None:
        """Close spliced connections; `forget` (the sandbox ends): remove its host state too.
        Otherwise (a hibernation, a commit) the counts are kept and the next attach wires the
        sandbox again; the link itself goes before a dump (`unplug`)."""
        box = self._boxes.get(sandbox_id)
        if box is None:
            if forget:  # one this server never wired (hibernated before a restart): its chains may remain
                with contextlib.suppress(NftError, TransparentError):
                    self._nft = self._nft or shared_nft()
                    await asyncio.to_thread(
                        self._unlink, _Box(sandbox_id, Policy(), interface(self.tag, sandbox_id))
                    )
            return
        for conn in list(box.peeked):
            conn.close()
        if forget:
            self._boxes.pop(sandbox_id, None)
            if self._nft is not None:
                await asyncio.to_thread(self._unlink, box)
        elif box.chains:
            await asyncio.to_thread(self._carry, box)
            box.chains = False  # its namespace goes with its processes; attach wires the new one

    async def unplug(self, sandbox_id: str) -> bool:
        """Remove the sandbox's veth (CRIU cannot restore one, see LocalCheckpoints) and keep
        everything else: its address, chains and counts. Whether it had one."""
        box = self._boxes.get(sandbox_id)
        # A hibernation detaches first (chains already off), so the link itself is what counts.
        if box is None or not Path(f"/sys/class/net/{box.ifname}").exists():
            return False
        for conn in list(box.peeked):
            conn.close()
        if box.chains:
            await asyncio.to_thread(self._carry, box)
        with contextlib.suppress(TransparentError):
            await asyncio.to_thread(_run, [IP, "link", "del", box.ifname])
        box.chains = False
        return True

    async def replug(self, sandbox_id: str) -> None:
        """A new veth for a sandbox that kept running (after a memory snapshot), same address."""
        box = self._boxes.get(sandbox_id)
        if box is not None and box.handle is not None:
            await self._wire(box)

    async def set_policy(self, sandbox_id: str, policy: Policy) -> None:
        """New connections follow `policy` at once; open ones at their next packet."""
        box = self._boxes.get(sandbox_id)
        if box is None:
            return
        box.policy, box.changed = policy, True
        if box.handle is not None:
            await self._wire(box)
        for conn in list(box.peeked):
            if self._peek_refusal(box, conn.name, conn.ip, conn.port):
                conn.close()

    def status(self, sandbox_id: str) -> dict[str, Any]:
        box = self._boxes.get(sandbox_id)
        if box is None:
            return {
                "proxy": None,
                "allowed": 0,
                "denied": 0,
                "last_denied": None,
                "bytes_out": 0,
                "bytes_in": 0,
            }
        out, inn = self._counters(box) if box.chains else (0, 0)
        address = self._addresses(box.index)[1] if box.index is not None and box.chains else None
        return {
            "proxy": None,
            "transparent": {"address": address, "interface": box.ifname if address else None,
                            "resolver": self.resolver if address else None},
            "error": box.error,
            "allowed": box.allowed,
            "denied": box.denied,
            "last_denied": box.last_denied,
            "bytes_out": box.carried[0] + out,
            "bytes_in": box.carried[1] + inn,
        }  # fmt: skip

    async def close(self) -> None:
        """Stop the DNS server and the peeker; links and rules stay (sandboxes keep running, a
        restarted server adopts them)."""
        for box in self._boxes.values():
            for conn in list(box.peeked):
                conn.close()
        for server in self._servers:
            server.close()
        self._servers = []
        self._started = False

    # -- policy over names -----------------------------------------------------------------------------
    def _pins_for(
        self, policy: Policy, name: str, ip: IPAddress, trusted: bool
    ) -> set[tuple[tuple[int, int], bool]]:
        """The (ports, deny) pins an answer `name -> ip` makes under `policy`."""
        out: set[tuple[tuple[int, int], bool]] = set()
        if policy.mode == "none" or ip.version != 4 or self._blocked(ip):
            return out
        protected = self._protected(ip)

        def allowed_ports(rules: tuple[Rule, ...]) -> list[tuple[int, int]]:
            ports = []
            for r in rules:
                if (r.domain is not None or r.any_host) and r.matches(name, ip, (r.ports or ANY)[0]):
                    lo = (r.ports or ANY)[0]
                    if policy.decide(name, ip, lo, protected=protected, trusted_name=trusted) is None:
                        ports.append(r.ports or ANY)
            return ports

        denied = [
            r.ports or ANY
            for r in policy.deny
            if r.domain is not None and r.matches(name, ip, (r.ports or ANY)[0])
        ]
        if policy.mode == "allow":
            out |= {(pr, False) for pr in allowed_ports(policy.allow)}
            out |= {(pr, True) for pr in denied}
        else:
            exceptions = allowed_ports(policy.allow)
            out |= {(pr, False) for pr in exceptions}
            if not exceptions:
                out |= {(pr, True) for pr in denied}
            if (
                trusted
                and not denied
                and policy.decide(name, ip, 1, protected=protected, trusted_name=True) is None
            ):
                out.add((ANY, False))  # the operator's names may reach private addresses
        return out

    def _name_refusal(self, policy: Policy, name: str) -> str | None:
        """Why a name gets NXDOMAIN (None: it is looked up)."""
        if policy.mode == "none":
            return "the sandbox's network mode is none"
        by_name = [r for r in policy.allow if r.domain is not None or r.any_host]
        allow = any(r.matches(name, None, (r.ports or ANY)[0]) for r in by_name)
        deny_all = next((r for r in policy.deny if r.domain is not None and r.ports is None
                         and r.matches(name, None, 1)), None)  # fmt: skip
        if policy.mode == "allow":
            if not allow and not any(r.network is not None and r.network.version == 4 for r in policy.allow):
                return "it is not in the allow list"
            if deny_all is not None:
                return f"it matches deny rule {deny_all.text!r}"
        elif policy.mode == "deny" and deny_all is not None and not allow:
            return f"it matches deny rule {deny_all.text!r}"
        return None

    def _blocked(self, ip: IPAddress) -> bool:
        """Never reachable from a sandbox: loopback, link-local, multicast, sandboxes, the host."""
        if ip.version != 4:
            return True
        if ip in self.pool or any(ip in ipaddress.IPv4Network(n) for n in ALWAYS_BLOCKED):
            return True
        key = str(ip)
        cached = self._local.get(key)
        now = time.monotonic()
        if cached is None or now - cached[1] > 60:
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.bind((key, 0))  # only an address of this host binds
                local = True
            except OSError:
                local = False
            cached = self._local[key] = (local, now)
        return cached[0]

    def _protected(self, ip: IPAddress) -> bool:
        return any(ip in ipaddress.IPv4Network(n) for n in PROTECTED)

    # -- DNS -------------------------------------------------------------------------------------------
    async def answer(self, data: bytes, source: str) -> bytes | None:
        """cove's answer to a sandbox's query (None: not a query worth answering)."""
        try:
            query = dns.message.from_wire(data)
        except (dns.exception.DNSException, ValueError):
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        box = self._by_ip.get(source)
        if box is None or not query.question:
            response.set_rcode(dns.rcode.REFUSED)
            return response.to_wire()
        question = query.question[0]
        name = normal_host(question.name.to_text())
        why = self._name_refusal(box.policy, name)
        if why is not None:
            self._deny(box, f"{name} (DNS)", why)
            response.set_rcode(dns.rcode.NXDOMAIN)
            if box.policy.mode == "deny":
                self._spawn(self._pin_name(box, name))
            return response.to_wire()
        if question.rdtype != dns.rdatatype.A:
            if question.rdtype == dns.rdatatype.AAAA or self.upstream is None or name in self.hosts:
                return response.to_wire()  # no IPv6 inside; nothing else to say
            forwarded = await self._upstream(query)  # MX, TXT, SRV…: no addresses to pin
            return forwarded.to_wire() if forwarded is not None else _servfail(response)
        try:
            ips, ttl = await self._resolve(name)
        except LookupError:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response.to_wire()
        except (OSError, dns.exception.DNSException):
            return _servfail(response)
        answered, ttl = self._pin(box, name, ips, ttl)
        if answered:
            rr = dns.rrset.from_text(question.name, ttl, "IN", "A", *answered)
            response.answer.append(rr)
            box.allowed += 1
            self.on_result("allowed")
        elif ips:
            self._deny(box, f"{name} (DNS)", "none of its addresses may be reached")
        return response.to_wire()

    def _pin(self, box: _Box, name: str, ips: list[IPAddress], ttl: int) -> tuple[list[str], int]:
        """Pin the answer's addresses into the sandbox's sets (before the answer goes out); returns
        those the sandbox is told and the TTL to tell (never beyond the pins' lifetime)."""
        now = time.monotonic()
        left = float(keep := max(PIN_MIN, min(ttl, PIN_MAX)) + 5)
        trusted = name in self.hosts
        answered, elements = [], []
        for ip in ips:
            pins = self._pins_for(box.policy, name, ip, trusted)
            allowed = any(not deny for _, deny in pins)
            by_cidr = box.policy.mode == "allow" and not self._blocked(ip) and any(
                box.policy.decide(name, ip, (r.ports or ANY)[0], protected=self._protected(ip), trusted_name=trusted) is None
                for r in box.policy.allow if r.network is not None
            )  # fmt: skip
            if box.policy.mode in ("deny", "open") and not self._blocked(ip):
                allowed = allowed or (not any(deny for _, deny in pins) and not self._protected(ip))
            if allowed or by_cidr:
                answered.append(str(ip))
            for ports, deny in pins:
                entry = box.pins.setdefault((name, str(ip)), {})
                old = entry.get((ports[0], ports[1], deny))
                if old is not None and old.expires > now + keep / 2:
                    if not deny:  # pinned a moment ago: answer within what is left of it
                        left = min(left, old.expires - now)
                    continue
                entry[(ports[0], ports[1], deny)] = _Pin(ports, now + keep, deny)
                p = str(ports[0]) if ports[0] == ports[1] else f"{ports[0]}-{ports[1]}"
                elements.append((f"{box.ifname}_{'deny' if deny else 'pin'}", f"{ip} . {p}"))
        if elements and box.chains:
            t = f"inet {self.table}"
            # add, delete, add: an element that exists gets the new timeout (add alone keeps the old).
            cmds = []
            for s, e in elements:
                cmds += [
                    f"add element {t} {s} {{ {e} timeout {keep}s }}",
                    f"delete element {t} {s} {{ {e} }}",
                ]
                cmds.append(f"add element {t} {s} {{ {e} timeout {keep}s }}")
            try:
                self._apply("\n".join(cmds))
            except NftError as e:
                log.warning("pinning failed", extra={"sandbox": box.sid, "error": str(e)})
                return [], 0
        return answered, max(1, int(left) - 5)

    async def _pin_name(self, box: _Box, name: str) -> None:
        """Resolve a denied name host-side, so its addresses are blocked too."""
        with contextlib.suppress(LookupError, OSError, dns.exception.DNSException):
            ips, ttl = await self._resolve(name)
            self._pin(box, name, ips, ttl)  # deny pins only: nothing is answered

    async def _pin_denied(self, box: _Box) -> None:
        for rule in box.policy.deny:
            if rule.domain is not None and not rule.wildcard:
                await self._pin_name(box, rule.domain)

    async def _resolve(self, name: str) -> tuple[list[IPAddress], int]:
        """A name's IPv4 addresses and TTL: the operator's host map, the upstream, or the host's resolver."""
        if name in self.hosts:
            return [ip for ip in self.hosts[name] if ip.version == 4], TTL_DEFAULT
        if self.upstream is not None:
            reply = await self._upstream(dns.message.make_query(name, "A"))
            if reply is None:
                raise OSError(f"the upstream resolver {self.upstream[0]} did not answer")
            if reply.rcode() == dns.rcode.NXDOMAIN:
                raise LookupError(name)
            ips: list[IPAddress] = []
            ttl = PIN_MAX
            for rrset in reply.answer:
                if rrset.rdtype == dns.rdatatype.A:
                    ttl = min(ttl, rrset.ttl)
                    ips += [ipaddress.IPv4Address(r.address) for r in rrset]
            return ips, ttl if ips else TTL_DEFAULT
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(name, None, family=socket.AF_INET)
        except socket.gaierror as e:
            if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
                raise LookupError(name) from None
            raise OSError(str(e)) from None
        out: list[IPAddress] = []
        for info in infos:
            ip = ipaddress.IPv4Address(info[4][0])
            if ip not in out:
                out.append(ip)
        return out, TTL_DEFAULT

    async def _upstream(self, query: dns.message.Message) -> dns.message.Message | None:
        assert self.upstream is not None
        try:
            return await dns.asyncquery.udp(query, self.upstream[0], port=self.upstream[1], timeout=3)
        except (dns.exception.DNSException, OSError):
            return None

    async def _dns_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = writer.get_extra_info("peername")[0]
        try:
            while True:
                size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 10), "big")
                reply = await self.answer(await reader.readexactly(size), source)
                if reply is None:
                    break
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def _deny(self, box: _Box, target: str, reason: str) -> None:
        box.denied += 1
        box.last_denied = {"target": target, "reason": reason, "at": time.time()}
        self.on_result("denied")
        log.info("egress denied", extra={"sandbox": box.sid, "target": target, "reason": reason,
                                         "mode": box.policy.mode})  # fmt: skip

    # -- the SNI/Host peeker ---------------------------------------------------------------------------
    def _peek_refusal(self, box: _Box, name: str | None, ip: str, port: int) -> str | None:
        addr = ipaddress.IPv4Address(ip)
        policy = box.policy
        if self._blocked(addr):
            return f"{ip} is always blocked"
        pins = box.pins
        if name is None:  # no SNI or Host: by address, as the kernel would
            denied = any(k[2] and k[0] <= port <= k[1] for (n, i), e in pins.items() if i == ip for k in e)
            allowed = any(
                not k[2] and k[0] <= port <= k[1] for (n, i), e in pins.items() if i == ip for k in e
            )
            if denied and not allowed:
                return f"{ip} is an address of a denied name"
            if policy.mode == "allow" and not allowed:
                return f"{ip} was not resolved from an allowed name"
            return None
        refusal = self._name_refusal(policy, name)
        if refusal:
            return refusal
        trusted = name in self.hosts
        why = policy.decide(name, addr, port, protected=self._protected(addr), trusted_name=trusted)
        if why is not None and not any(not d for (lo, hi), d in self._pins_for(policy, name, addr, trusted)
                                       if lo <= port <= hi):  # fmt: skip
            return why
        return None

    async def _peek(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock: socket.socket = writer.get_extra_info("socket")
        source = writer.get_extra_info("peername")[0]
        box = self._by_ip.get(source)
        try:
            ip, port = peek.original_destination(sock)  # type: ignore[arg-type]
        except OSError:
            writer.close()
            return
        if box is None or len(box.peeked) >= MAX_PEEKED:
            writer.close()
            return
        data = b""
        try:
            async with asyncio.timeout(PEEK_TIMEOUT):
                while not peek.complete(data):
                    chunk = await reader.read(peek.HEAD_LIMIT)
                    if not chunk:
                        break
                    data += chunk
        except TimeoutError:
            pass
        name = peek.name_of(data)
        if name is not None and parse_ip(name) is not None:
            name = None  # an address as the name: judged by the address
        why = self._peek_refusal(box, name, ip, port)
        if why is not None:
            self._deny(box, f"{name or ip}:{port}", why)
            if data and not peek.is_tls(data):
                body = f"cove egress policy: {name or ip}:{port} is not allowed: {why}\n".encode()
                writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nX-Cove-Egress: denied\r\n"
                             b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
            writer.close()
            return
        loop = asyncio.get_running_loop()
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.setblocking(False)
        try:
            async with asyncio.timeout(PEEK_TIMEOUT):
                await loop.sock_connect(upstream, (ip, port))
        except (OSError, TimeoutError) as e:
            upstream.close()
            self.on_result("failed")
            log.info(
                "egress connect failed", extra={"sandbox": box.sid, "target": f"{ip}:{port}", "error": str(e)}
            )
            writer.close()
            return
        box.allowed += 1
        self.on_result("allowed")
        # Hand both sockets to two splicing threads (nothing is left in the reader's buffer: the
        # peek read only what it looked at).
        client = sock.dup()
        writer.transport.pause_reading()
        writer.transport.abort()
        buffered = data + bytes(reader._buffer)
        client.setblocking(True)
        upstream.setblocking(True)
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Peeked(name, ip, port, (client, upstream))
        box.peeked.add(conn)
        left = [2]
        lock = threading.Lock()

        def done() -> None:
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            box.peeked.discard(conn)
            client.close()
            upstream.close()

        def start() -> None:
            try:
                upstream.sendall(buffered)
            except OSError:
                conn.close()
            threading.Thread(target=peek.splice, args=(client, upstream, done), daemon=True).start()
            threading.Thread(target=peek.splice, args=(upstream, client, done), daemon=True).start()

        start()


class _DnsUdp(asyncio.DatagramProtocol):
    def __init__(self, owner: Transparent) -> None:
        self.owner = owner
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.owner._spawn(self._reply(data, addr))

    async def _reply(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        reply = await self.owner.answer(data, str(addr[0]))
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


def _servfail(response: dns.message.Message) -> bytes:
    response.set_rcode(dns.rcode.SERVFAIL)
    return response.to_wire()


def _host_port(text: str, default: int) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        host, port = text.strip(), str(default)
    if parse_ip(host) is None or not port.isdigit():
        raise ValueError(f"COVE_EGRESS_DNS: expected ip[:port], got {text!r}")
    return host, int(port)


def _ports(rule: Rule) -> str:
    if rule.ports is None:
        return ""
    lo, hi = rule.ports
    return f"th dport {lo}" if lo == hi else f"th dport {lo}-{hi}"


def _match(rule: Rule) -> str:
    return f"ip daddr {rule.network} {_ports(rule)}".rstrip()


def _names_protected(rule: Rule) -> bool:
    """An IP/CIDR rule that opens protected addresses (as `Rule.names` decides in proxy mode)."""
    assert rule.network is not None
    return rule.network.num_addresses == 1 or not rule.network.is_global
