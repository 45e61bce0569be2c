"""Framing for the guest protocol (see docs/guest-protocol.md).

A frame is 1 byte kind, 4 bytes big-endian payload length, payload. This module is shared by the
guest agent, which runs as ``python3 -I -S`` inside every sandbox, and the host client. It uses only
C-level standard modules (``_struct``, ``_json``) because importing ``json``/``struct``/``socket``
pulls in ``re`` and ``enum`` and roughly doubles the agent's start-up time.
"""

from __future__ import annotations

from _struct import Struct

TYPE_CHECKING = False
if TYPE_CHECKING:  # only for annotations; never imported at run time
    import socket

VERSION = 1

KIND_JSON = b"J"
KIND_STDIN = b"0"  # stdin / upload bytes; an empty payload means end of input
KIND_STDOUT = b"1"
KIND_STDERR = b"2"
KIND_DATA = b"D"  # file bytes of a download

HEADER = Struct(">cI")
HEADER_SIZE = HEADER.size
CHUNK_SIZE = 64 * 1024  # largest D frame the agent sends, and its read size for pipes
MAX_PAYLOAD = 32 * 1024 * 1024  # sanity bound: a larger length means a corrupt or foreign stream

ERROR_CODES = (
    "not_found",
    "exists",
    "permission_denied",
    "not_a_directory",
    "is_a_directory",
    "not_empty",
    "invalid",
    "too_large",
    "conflict",
    "internal",
)


class ProtocolError(ValueError):
    """The byte stream does not follow the framing (bad length, truncated frame, bad JSON)."""


# --- JSON -------------------------------------------------------------------------------------
# A minimal codec over the C accelerator of the json package; falls back to ``json`` if the
# interpreter lacks it. Replies only contain dict/list/str/int/float/bool/None.

try:
    from _json import encode_basestring as _quote
    from _json import make_scanner as _make_scanner
except ImportError:  # pragma: no cover - every CPython has _json
    import json as _json_mod

    def dumps(obj: object) -> str:
        return _json_mod.dumps(obj, ensure_ascii=False, separators=(",", ":"))

    def loads(text: str) -> object:
        return _json_mod.loads(text)

else:

    class _ScanContext:
        # The attributes the C scanner reads from its context (same as json.JSONDecoder).
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int

        @staticmethod
        def parse_constant(name: str) -> object:
            raise ValueError(f"invalid JSON constant {name}")

    _scan = _make_scanner(_ScanContext())
    _WS = " \t\n\r"

    def loads(text: str) -> object:
        start = len(text) - len(text.lstrip(_WS))
        try:
            obj, end = _scan(text, start)
            if not text[end:].strip(_WS):
                return obj
        except Exception:  # the C scanner may even raise SystemError on bad input
            pass
        # Bad input only: let the json package produce its precise error (it imports re, but
        # only on this path).
        import json

        return json.loads(text)

    def _encode(obj: object, out: list[str]) -> None:
        if isinstance(obj, str):
            out.append(_quote(obj))
        elif obj is None:
            out.append("null")
        elif obj is True:
            out.append("true")
        elif obj is False:
            out.append("false")
        elif isinstance(obj, int):
            out.append(int.__repr__(obj))
        elif isinstance(obj, float):
            if obj != obj or obj in (float("inf"), float("-inf")):
                raise ValueError("NaN and infinity are not JSON")
            out.append(float.__repr__(obj))
        elif isinstance(obj, dict):
            out.append("{")
            first = True
            for key, value in obj.items():
                if not isinstance(key, str):
                    raise TypeError(f"JSON keys must be str, not {type(key).__name__}")
                if not first:
                    out.append(",")
                first = False
                out.append(_quote(key))
                out.append(":")
                _encode(value, out)
            out.append("}")
        elif isinstance(obj, (list, tuple)):
            out.append("[")
            for i, value in enumerate(obj):
                if i:
                    out.append(",")
                _encode(value, out)
            out.append("]")
        else:
            raise TypeError(f"{type(obj).__name__} is not JSON serialisable")

    def dumps(obj: object) -> str:
        out: list[str] = []
        _encode(obj, out)
        return "".join(out)


def decode_json(payload: bytes) -> dict:
    """Decode a ``J`` payload; it must be one JSON object."""
    try:
        obj = loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # nesting beyond the stack: bad too
        raise ProtocolError(f"bad JSON frame: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("JSON frame is not an object")
    return obj


# --- frames -----------------------------------------------------------------------------------


def encode_frame(kind: bytes, payload: bytes) -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def encode_json(obj: object) -> bytes:
    """A complete ``J`` frame for ``obj``."""
    # "replace" keeps the frame valid UTF-8 even for undecodable file names (lone surrogates).
    return encode_frame(KIND_JSON, dumps(obj).encode("utf-8", "replace"))


def send_frame(sock: socket.socket, kind: bytes, payload: bytes) -> None:
    if len(payload) > 256 * 1024:
        # Avoid copying a big payload just to prepend five bytes.
        sock.sendall(HEADER.pack(kind, len(payload)))
        sock.sendall(payload)
    else:
        sock.sendall(HEADER.pack(kind, len(payload)) + payload)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes; ``ProtocolError`` if the peer closes first (or returns b"" for n == 0)."""
    if n == 0:
        return b""
    first = sock.recv(n)
    if len(first) == n:
        return first
    if not first:
        raise ProtocolError("connection closed inside a frame")
    buf = bytearray(n)
    view = memoryview(buf)
    got = len(first)
    view[:got] = first
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise ProtocolError("connection closed inside a frame")
        got += k
    return bytes(buf)


def recv_frame(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """The next frame as ``(kind, payload)``, or None if the peer closed cleanly between frames."""
    header = sock.recv(HEADER_SIZE)
    if not header:
        return None
    if len(header) < HEADER_SIZE:
        header += recv_exact(sock, HEADER_SIZE - len(header))
    kind, length = HEADER.unpack(header)
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"frame of {length} bytes exceeds the limit of {MAX_PAYLOAD}")
    return kind, recv_exact(sock, length)


def parse_frames(buf: bytearray) -> list[tuple[bytes, bytes]]:
    """Remove and return the complete frames at the start of ``buf`` (for non-blocking readers)."""
    frames: list[tuple[bytes, bytes]] = []
    pos = 0
    while len(buf) - pos >= HEADER_SIZE:
        kind, length = HEADER.unpack_from(buf, pos)
        if length > MAX_PAYLOAD:
            raise ProtocolError(f"frame of {length} bytes exceeds the limit of {MAX_PAYLOAD}")
        end = pos + HEADER_SIZE + length
        if end > len(buf):
            break
        frames.append((kind, bytes(buf[pos + HEADER_SIZE : end])))
        pos = end
    if pos:
        del buf[:pos]
    return frames
