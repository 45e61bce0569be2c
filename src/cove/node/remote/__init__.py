"""The node API: the node contract (`cove.node.base`) served over the network.

Several API servers share one database and reach the node that holds a sandbox over TCP: the node
runs a `NodeServer` (server.py) in front of its `LocalNode`, and each API server holds a `RemoteNode`
(client.py) per node, which is a `NodeAgent` like any other.

Transport: one TCP listener per node, TLS optional (an `ssl.SSLContext` on both sides). Every
connection starts with one JSON request line (at most 1 MiB, read within 10 s) carrying the node's
token, compared in constant time; a missing or wrong one is answered `unauthorized` and the
connection closes. The request is then either

- a **call**, `{"token", "call": "<dotted name>", "args": {...}}`, answered by one line
  `{"ok": true, "result": ...}` or `{"ok": false, "code", "message"}`. The names are an allow-list
  built from the contract (`server.CALLS`): the node's methods, its parts' (`volumes.create`,
  `checkpoints.restore`…), the attributes (`generation`, `volumes.limits`, `contexts.status`) and
  `describe`, the answers to every sync method at once. A NodeError becomes `node_error` and is raised
  again by the client with the same message. The connection then takes the next request line: the
  client keeps a few idle connections per node, so a call costs one round trip;
- a **tunnel**, `{"token", "tunnel": "guest" | "context" | "port", "sandbox", ...}`: the node opens the
  guest agent's socket (the same checked O_PATH open as `GuestClient`), a code context's bridge, or a
  socket to a port in the sandbox (`network.connect`), answers `{"ok": true}` (or an error code:
  `guest_unavailable`, `port_not_open`, `sandbox_gone`, `timeout`) and from then on splices bytes both
  ways, passing on each side's end as a half-close. The guest protocol (docs/guest-protocol.md) runs
  unchanged through it: `RemoteNode.guest` is a `GuestClient` whose connections are tunnels, kept
  between operations as the local node keeps its own.

Why a line protocol on raw TCP rather than HTTP: the guest protocol is already a framed byte stream
and a tunnel is a splice, so a call needs no more than a line each way; HTTP would add headers and
chunking to every exec for nothing, and an upgrade dance to every tunnel.

Values: wire.py encodes the contract's plain data (tuples, sets and its frozen dataclasses as tagged
JSON; no pickle), and the server checks every argument's type, every id's charset and every port's
range before the node sees it.
"""
