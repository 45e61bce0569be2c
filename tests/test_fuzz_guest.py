"""Property-based tests of what parses untrusted bytes and paths (docs/tenants.md#fuzzing): the guest
protocol's framing and JSON codec (the host decodes what a sandbox's agent sends), the agent's path
normalisation and e2b's `~` paths. Bad input is a ProtocolError / OpError, never anything else.

COVE_FUZZ_EXAMPLES raises the number of examples (default 200 per property: a few seconds)."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import socket
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cove.compat.e2b.fsops import guest_path
from cove.guest import protocol
from cove.guest.errors import OpError
from cove.guest.users import norm_path

EXAMPLES = max(200, int(os.environ.get("COVE_FUZZ_EXAMPLES", "0")))
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

kinds = st.sampled_from([protocol.KIND_JSON, protocol.KIND_STDIN, protocol.KIND_STDOUT, b"x", b"\0"])
frames = st.lists(st.tuples(kinds, st.binary(max_size=300)), max_size=8)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=25,
)


@fuzz
@given(frames=frames, cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=6))
def test_frames_survive_any_split(frames: list[tuple[bytes, bytes]], cuts: list[int]) -> None:
    """A non-blocking reader fed the stream in arbitrary pieces gets the same frames back."""
    stream = b"".join(protocol.encode_frame(k, p) for k, p in frames)
    buf, got = bytearray(), []
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    for a, b in itertools.pairwise(bounds):
        buf += stream[a:b]
        got += protocol.parse_frames(buf)
    assert got == frames and not buf


@fuzz
@given(data=st.binary(max_size=2000))
def test_parse_frames_on_garbage(data: bytes) -> None:
    buf = bytearray(data)
    try:
        got = protocol.parse_frames(buf)
    except protocol.ProtocolError:
        return
    # What is left is an incomplete frame; everything before it was consumed.
    assert sum(protocol.HEADER_SIZE + len(p) for _, p in got) + len(buf) == len(data)
    if len(buf) >= protocol.HEADER_SIZE:
        assert protocol.HEADER.unpack_from(buf)[1] > len(buf) - protocol.HEADER_SIZE


@fuzz
@given(data=st.binary(max_size=3000), header=st.binary(min_size=0, max_size=5))
def test_recv_frame_on_garbage(data: bytes, header: bytes) -> None:
    """The blocking reader, over a real socket the peer closes: frames, then None or ProtocolError."""
    a, b = socket.socketpair()
    with a, b:
        a.sendall(header + data)
        a.shutdown(socket.SHUT_WR)
        b.settimeout(5)
        for _ in range(len(data) + 2):
            try:
                frame = protocol.recv_frame(b)
            except protocol.ProtocolError:
                return
            if frame is None:
                return
        raise AssertionError("recv_frame never reached the end of the stream")


@fuzz
@given(payload=st.binary(max_size=500) | st.text(max_size=300).map(str.encode))
def test_decode_json_on_garbage(payload: bytes) -> None:
    with contextlib.suppress(protocol.ProtocolError):
        assert isinstance(protocol.decode_json(payload), dict)


@pytest.mark.parametrize("depth", [10_000, 200_000])
def test_decode_json_deeply_nested(depth: int) -> None:
    """Nesting deeper than the recursion limit is a ProtocolError, not a RecursionError."""
    for opener in (b"[", b'{"a":'):
        with pytest.raises(protocol.ProtocolError):
            protocol.decode_json(b'{"x":' + opener * depth)


@fuzz
@given(value=st.dictionaries(st.text(max_size=10), json_values, max_size=6))
def test_json_round_trip(value: dict[str, Any]) -> None:
    """The agent's own codec agrees with the json package both ways."""
    text = protocol.dumps(value)
    assert json.loads(text) == value
    assert protocol.loads(json.dumps(value)) == value
    try:
        frame = protocol.encode_json(value)
    except UnicodeEncodeError:
        raise AssertionError("encode_json must replace lone surrogates") from None
    assert frame[:1] == protocol.KIND_JSON


@fuzz
@given(value=st.floats(allow_nan=True, allow_infinity=True))
def test_json_refuses_what_is_not_json(value: float) -> None:
    if math.isfinite(value):
        assert protocol.loads(protocol.dumps(value)) == value
    else:
        with pytest.raises(ValueError):
            protocol.dumps(value)


@fuzz
@given(path=st.text(max_size=200), home=st.sampled_from(["/home/user", "/root", "/"]))
def test_norm_path(path: str, home: str) -> None:
    if not path or "\0" in path:
        with pytest.raises(OpError):
            norm_path(path, home)
        return
    full = norm_path(path, home)
    assert full.startswith("/") and not full.startswith("//")
    assert os.path.normpath(full) == full  # no ".", "..", "//" or trailing "/" left
    if not path.startswith("/") and ".." not in path.split("/"):
        assert full == home or full.startswith(home.rstrip("/") + "/")


@fuzz
@given(value=st.none() | st.integers() | st.binary() | st.lists(st.text()) | st.booleans())
def test_norm_path_rejects_non_strings(value: Any) -> None:
    with pytest.raises(OpError):
        norm_path(value, "/home/user")


@fuzz
@given(rest=st.text(max_size=100).filter(lambda p: "\0" not in p))
def test_e2b_home_paths(rest: str) -> None:
    """`~` and `~/x` are the user's home; other paths are untouched."""
    home = "/home/user"
    assert norm_path(guest_path("~"), home) == home
    tilde = norm_path(guest_path("~/" + rest), home)
    if ".." not in rest.split("/") and not rest.startswith("/"):
        assert tilde == home or tilde.startswith(home + "/")
    if not rest.startswith("~"):
        assert guest_path(rest) == rest
