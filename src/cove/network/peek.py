"""The name a TCP connection asks for, read from its first bytes: a TLS ClientHello's SNI or an HTTP
request's Host header. Transparent egress (`transparent`) checks it where one address serves many
names (CDNs), before it splices the connection on."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Callable

from cove.network.egress_policy import normal_host

F_SETPIPE_SZ = 1031
HEAD_LIMIT = 16 << 10  # a ClientHello with many extensions, or request headers


def tls_record_length(data: bytes) -> int | None:
    """The length of the first TLS record with its 5-byte header, once the header is in."""
    if len(data) < 5:
        return None
    return 5 + int.from_bytes(data[3:5], "big")


def is_tls(data: bytes) -> bool:
    return len(data) >= 3 and data[0] == 0x16 and data[1] == 0x03


def sni(data: bytes) -> str | None:
    """The server name of a ClientHello (the first TLS record); None where it has none or is cut."""
    try:
        if not is_tls(data) or data[5] != 0x01:  # handshake, client_hello
            return None
        p = 5 + 4 + 2 + 32  # record header, handshake header, version, random
        p += 1 + data[p]  # session id
        p += 2 + int.from_bytes(data[p : p + 2], "big")  # cipher suites
        p += 1 + data[p]  # compression methods
        end = p + 2 + int.from_bytes(data[p : p + 2], "big")
        p += 2
        while p + 4 <= end:
            kind, size = int.from_bytes(data[p : p + 2], "big"), int.from_bytes(data[p + 2 : p + 4], "big")
            p += 4
            if kind == 0:  # server_name: list length, then (type 0, length, name)
                q = p + 2
                if data[q] == 0:
                    n = int.from_bytes(data[q + 1 : q + 3], "big")
                    return normal_host(data[q + 3 : q + 3 + n].decode("ascii"))
                return None
            p += size
    except (IndexError, UnicodeDecodeError):
        return None
    return None


def http_host(data: bytes) -> str | None:
    """The Host header of an HTTP/1.x request head (without its port)."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    for line in head.split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == "host":
            value = value.strip()
            if value.startswith("["):
                return normal_host(value.split("]", 1)[0] + "]")
            return normal_host(value.rsplit(":", 1)[0] if value.count(":") == 1 else value)
    return None


def complete(data: bytes) -> bool:
    """Enough of the first bytes to name the target (or to give up looking)."""
    if len(data) >= HEAD_LIMIT:
        return True
    if is_tls(data):
        length = tls_record_length(data)
        return length is not None and len(data) >= length
    if len(data) >= 3 and data[:1].isalpha():
        return b"\r\n\r\n" in data
    return len(data) > 0  # neither TLS nor HTTP: nothing to read a name from


def name_of(data: bytes) -> str | None:
    return sni(data) if is_tls(data) else http_host(data)


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where a redirected connection was going (SO_ORIGINAL_DST, from conntrack)."""
    raw = sock.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST: a sockaddr_in
    return socket.inet_ntoa(raw[4:8]), int.from_bytes(raw[2:4], "big")


def splice(src: socket.socket, dst: socket.socket, done: Callable[[], None]) -> None:
    """Copy src to dst in the kernel (splice through a pipe) until EOF, then half-close dst. Runs in
    its own thread on blocking sockets: no byte passes through Python."""
    r, w = os.pipe()
    with contextlib.suppress(OSError):  # a 1 MiB pipe (pipe-max-size's default): 16x fewer splices
        fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)
    try:
        while True:
            n = os.splice(src.fileno(), w, 1 << 20)
            if n == 0:
                break
            while n:
                n -= os.splice(r, dst.fileno(), n)
    except OSError:
        pass
    finally:
        os.close(r)
        os.close(w)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        done()
