"""A sandbox's egress policy: its mode, its rules, and the decision for one outbound connection.

Modes:
- `none`  (default): nothing leaves the sandbox;
- `allow`: only targets matching an `allow` rule, minus those matching a `deny` rule;
- `deny` : every target except those matching a `deny` rule, plus those matching an `allow` rule
  (allow rules are exceptions to the deny list, as e2b's `allowOut` is to its `denyOut`);
- `open` : every target.

A rule is `HOST` or `HOST:PORTS`. HOST is a domain (`pypi.org`), a wildcard (`*.pythonhosted.org`: any
name below it, not the name itself), an IP or CIDR (`10.0.0.0/8`, `[2001:db8::/32]` with a port), or `*`
(any host). PORTS is a port or a range (`443`, `8000-8999`); without it every port matches. Domain rules
match the name the process asked for; IP and CIDR rules match the address the name resolved to.

Whatever the mode, the host's own addresses, loopback, link-local and private ranges are reached only
when an allow rule names them explicitly (an IP or CIDR inside them, or the domain `localhost`), or
the name comes from the operator's host map; cove's own API needs an IP rule with its port.

`inject` (docs/network.md#credentials-headers-the-proxy-adds) names headers the proxy adds to the
plain-HTTP requests a sandbox sends to a host (`HOST`, `HOST:PORT` or `https://HOST[:PORT]`, no
wildcard): a credential the host side holds, which the sandbox can use but never read. The values
are kept out of `as_dict` and everything shown.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

MODES = ("none", "allow", "deny", "open")
MAX_RULES = 1024
MAX_INJECT_HOSTS = 32
MAX_INJECT_HEADERS = 16
MAX_INJECT_VALUE = 8192
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_LABEL = r"(?!-)[a-z0-9_-]{1,63}(?<!-)"
_DOMAIN = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
_PORTS = re.compile(r"^(\d{1,5})(?:-(\d{1,5}))?$")
# Used with fullmatch: `$` would let a trailing newline through.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")  # an RFC 9110 token
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")  # no CR, LF, NUL or other controls: one header line
# Headers that frame the request or talk to the proxy: injecting them would change what is sent.
_NOT_INJECTABLE = frozenset(
    {
        "host", "content-length", "transfer-encoding", "connection", "proxy-connection", "keep-alive",
        "proxy-authorization", "proxy-authenticate", "te", "trailer", "upgrade", "expect",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Rule:
    text: str  # normalised, as stored and shown
    domain: str | None = None  # exact name, or the suffix below which a wildcard matches
    wildcard: bool = False
    network: IPNetwork | None = None
    any_host: bool = False
    ports: tuple[int, int] | None = None  # inclusive range; None: every port

    def matches(self, host: str, ip: IPAddress | None, port: int) -> bool:
        if self.ports is not None and not self.ports[0] <= port <= self.ports[1]:
            return False
        if self.any_host:
            return True
        if self.network is not None:
            return ip is not None and ip.version == self.network.version and ip in self.network
        if self.wildcard:
            return host.endswith("." + str(self.domain))
        return host == self.domain

    def names(self, host: str, ip: IPAddress) -> bool:
        """Does this rule name `ip` explicitly enough to open a protected address?"""
        if self.network is not None:
            single = self.network.num_addresses == 1
            return ip in self.network and (single or not self.network.is_global)
        return self.domain == "localhost" == host and not self.wildcard


def normal_host(host: str) -> str:
    """A host name as rules compare it: lower case, without a trailing dot or IPv6 brackets."""
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def parse_ip(host: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return ip


def _ports(text: str, rule: str) -> tuple[int, int]:
    m = _PORTS.match(text)
    if not m:
        raise ValueError(f"{rule!r}: the port must be a number or a range like 8000-8999")
    lo = int(m.group(1))
    hi = int(m.group(2) or lo)
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"{rule!r}: ports go from 1 to 65535, low to high")
    return lo, hi


def parse_rule(text: Any) -> Rule:
    """One rule; ValueError says what is wrong with it."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r}: a rule is a string")
    raw = text.strip().lower()
    if not raw or len(raw) > 300:
        raise ValueError(f"{text!r}: a rule is 1 to 300 characters")
    host, ports = raw, None
    if raw.startswith("["):  # [IPv6] or [IPv6/len], maybe with :ports
        end = raw.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: unclosed '['")
        host, rest = raw[1:end], raw[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r}: expected ':PORT' after ']'")
            ports = _ports(rest[1:], text)
    elif raw.count(":") == 1:  # host:ports (a bare IPv6 address has several colons)
        host, _, port_text = raw.partition(":")
        ports = _ports(port_text, text)
    port_suffix = "" if ports is None else f":{ports[0]}" + (f"-{ports[1]}" if ports[1] != ports[0] else "")
    if host == "*":
        return Rule(text="*" + port_suffix, any_host=True, ports=ports)
    if "/" in host or parse_ip(host) is not None or ":" in host:
        try:
            net = ipaddress.ip_network(host, strict=False)
        except ValueError:
            raise ValueError(f"{text!r}: not a valid IP address or CIDR") from None
        shown = str(net.network_address) if net.num_addresses == 1 else str(net)
        if net.version == 6 and ports is not None:
            shown = f"[{shown}]"
        return Rule(text=shown + port_suffix, network=net, ports=ports)
    wildcard = host.startswith("*.")
    name = normal_host(host[2:] if wildcard else host)
    if not _DOMAIN.match(name) or len(name) > 253:
        raise ValueError(
            f"{text!r}: not a domain, wildcard (*.example.com), IP or CIDR "
            "(examples: pypi.org, *.pythonhosted.org, 10.0.0.0/8:443, [::1]:8080)"
        )
    shown = ("*." if wildcard else "") + name + port_suffix
    return Rule(text=shown, domain=name, wildcard=wildcard, ports=ports)


def parse_rules(rules: Any, name: str) -> tuple[Rule, ...]:
    """A list of rules, duplicates dropped; ValueError names the list and the rule at fault."""
    if rules is None:
        return ()
    if not isinstance(rules, list | tuple):
        raise ValueError(f"{name}: expected a list of rules")
    if len(rules) > MAX_RULES:
        raise ValueError(f"{name}: at most {MAX_RULES} rules")
    parsed: dict[str, Rule] = {}
    for i, text in enumerate(rules):
        try:
            rule = parse_rule(text)
        except ValueError as e:
            raise ValueError(f"{name}[{i}]: {e}") from None
        parsed.setdefault(rule.text, rule)
    return tuple(parsed.values())


@dataclass(frozen=True, slots=True)
class Injection:
    """Headers the proxy adds to plain-HTTP requests for `host` (on `port`, or any port). With
    `tls` (a key `https://HOST[:PORT]`), requests for `http://HOST/` (port 80) go to HOST:`upstream`
    over TLS, verified against the server's CAs: the sandbox speaks plain HTTP to the proxy only."""

    key: str  # normalised `host`, `host:port` or `https://host[:port]`, as stored and shown
    host: str
    port: int | None
    headers: tuple[tuple[str, str], ...]  # (name as given, value)
    tls: bool = False
    upstream: int | None = None  # with tls: the port connected to (default 443)

    def __repr__(self) -> str:  # never the values, whatever prints a policy
        return f"Injection({self.key!r}, {[name for name, _ in self.headers]!r})"


def parse_injections(inject: Any) -> tuple[Injection, ...]:
    """`{"host[:port]": {"Header-Name": "value"}}` validated; ValueError says which entry is wrong
    (never quoting a value: it is a secret)."""
    if inject is None:
        return ()
    if not isinstance(inject, dict):
        raise ValueError('inject: expected an object {"host[:port]": {"Header-Name": "value"}}')
    if len(inject) > MAX_INJECT_HOSTS:
        raise ValueError(f"inject: at most {MAX_INJECT_HOSTS} hosts")
    out: dict[str, Injection] = {}
    for key, headers in inject.items():
        tls = isinstance(key, str) and key.strip().lower().startswith("https://")
        try:
            rule = parse_rule(key.strip()[len("https://") :] if tls else key)
        except ValueError as e:
            raise ValueError(f"inject[{key!r}]: {e}") from None
        single = rule.network is not None and rule.network.num_addresses == 1
        if rule.any_host or rule.wildcard or not (rule.domain or single):
            raise ValueError(f"inject[{key!r}]: a host is one name or address, optionally with a port")
        if rule.ports is not None and rule.ports[0] != rule.ports[1]:
            raise ValueError(f"inject[{key!r}]: one port, not a range")
        if not isinstance(headers, dict) or not headers:
            raise ValueError(f"inject[{key!r}]: expected a non-empty object of header names to values")
        if len(headers) > MAX_INJECT_HEADERS:
            raise ValueError(f"inject[{key!r}]: at most {MAX_INJECT_HEADERS} headers")
        pairs: list[tuple[str, str]] = []
        for name, value in headers.items():
            if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"inject[{key!r}]: {name!r} is not a valid header name")
            if name.lower() in _NOT_INJECTABLE:
                raise ValueError(f"inject[{key!r}]: {name!r} frames the request and cannot be injected")
            if name.lower() in {n.lower() for n, _ in pairs}:
                raise ValueError(f"inject[{key!r}]: {name!r} is given twice")
            if not isinstance(value, str) or len(value) > MAX_INJECT_VALUE:
                raise ValueError(
                    f"inject[{key!r}][{name!r}]: the value is a string of at most {MAX_INJECT_VALUE} characters"
                )
            if not _HEADER_VALUE.fullmatch(value):
                raise ValueError(
                    f"inject[{key!r}][{name!r}]: the value has a control character (CR, LF, NUL...) "
                    "or non-ASCII text"
                )
            pairs.append((name, value.strip(" \t")))
        host = str(rule.network.network_address) if rule.network is not None else str(rule.domain)
        port = rule.ports[0] if rule.ports else None
        shown = ("https://" if tls else "") + rule.text
        if tls:  # what the sandbox asks for is http://HOST/, on port 80
            upstream, port = port or 443, 80
        if any(i.host == host and i.port == port for i in out.values()):
            raise ValueError(f"inject[{key!r}]: the same host as another entry")
        out[shown] = Injection(
            key=shown, host=host, port=port, headers=tuple(pairs), tls=tls, upstream=upstream if tls else None
        )
    return tuple(out.values())


@dataclass(frozen=True, slots=True)
class Policy:
    mode: str = "none"
    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = ()
    inject: tuple[Injection, ...] = ()

    @classmethod
    def parse(cls, mode: Any = "none", allow: Any = (), deny: Any = (), inject: Any = None) -> Policy:
        """A validated policy; ValueError names the field and the rule at fault."""
        if mode not in MODES:
            raise ValueError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
        return cls(
            mode=mode,
            allow=parse_rules(allow, "allow"),
            deny=parse_rules(deny, "deny"),
            inject=parse_injections(inject),
        )

    @classmethod
    def of_record(cls, network: dict[str, Any], strict: bool = False) -> Policy:
        """The policy stored in a sandbox record's `network` (validated when it was stored);
        `strict`: a bad one raises ValueError instead of being read as mode none."""
        try:
            return cls.parse(
                network.get("mode", "none"), network.get("allow"), network.get("deny"), network.get("inject")
            )
        except ValueError:
            if strict:
                raise
            return cls()  # never widen access because of a bad record

    def injection(self, host: str, port: int) -> Injection | None:
        """The entry for a plain-HTTP request for `host` (as the sandbox named it) on `port`: one
        with that port wins over one for any port."""
        found = [i for i in self.inject if i.host == host and i.port in (port, None)]
        found.sort(key=lambda i: i.port is None)
        return found[0] if found else None

    def injected(self, host: str, port: int) -> tuple[tuple[str, str], ...]:
        """The headers to add to a plain-HTTP request for `host` on `port`."""
        entry = self.injection(host, port)
        return entry.headers if entry is not None else ()

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "allow": [r.text for r in self.allow], "deny": [r.text for r in self.deny]}

    def decide(
        self,
        host: str,
        ip: IPAddress,
        port: int,
        *,
        protected: bool = False,
        trusted_name: bool = False,
        cove_api: bool = False,
    ) -> str | None:
        """None when a connection to `host` (resolved to `ip`) on `port` may go; else the reason.

        `protected`: `ip` is the host's own, loopback, link-local or private; `trusted_name`: the
        name came from the operator's host map; `cove_api`: `ip:port` is cove's own API."""
        if self.mode == "none":
            return "the sandbox's network mode is none"
        allowed_by = next((r for r in self.allow if r.matches(host, ip, port)), None)
        denied_by = next((r for r in self.deny if r.matches(host, ip, port)), None)
        if self.mode == "allow":
            if allowed_by is None:
                return "it is not in the allow list"
            if denied_by is not None:
                return f"it matches deny rule {denied_by.text!r}"
        elif self.mode == "deny" and denied_by is not None and allowed_by is None:
            return f"it matches deny rule {denied_by.text!r}"
        if cove_api:
            named = [r for r in self.allow if r.network is not None and r.ports and r.matches(host, ip, port)]
            if not any(r.names(host, ip) for r in named):
                return f"{ip}:{port} is cove's own API (allow it only by IP with this port)"
        elif (
            protected
            and not trusted_name
            and not any(r.matches(host, ip, port) and r.names(host, ip) for r in self.allow)
        ):
            return f"{ip} is a loopback, private or host address (allow it by IP or CIDR)"
        return None


def from_e2b(allow_out: list[str] | None, deny_out: list[str] | None) -> dict[str, Any]:
    """e2b's `allowOut`/`denyOut` as a cove policy. In e2b, allowed entries win over denied ones and
    `0.0.0.0/0` in `denyOut` (also what `allow_internet_access=False` means) blocks everything else."""
    allow = list(allow_out or [])
    deny = [d for d in deny_out or [] if d.strip() not in ("0.0.0.0/0", "::/0")]
    if len(deny) != len(deny_out or []):
        return {"mode": "allow" if allow else "none", "allow": allow, "deny": []}
    if deny:
        return {"mode": "deny", "allow": allow, "deny": deny}
    return {"mode": "open", "allow": allow, "deny": []}
