"""The small blob that ``persist_workspace`` returns when the workspace is kept as a cove snapshot:
a magic first line, then JSON naming the snapshot. Anything else is treated as a tar."""

from __future__ import annotations

import json

MAGIC = b"COVE_SANDBOX_SNAPSHOT_V1\n"


def encode(snapshot_id: str, sandbox_id: str) -> bytes:
    body = {"snapshot_id": snapshot_id, "sandbox_id": sandbox_id}
    return MAGIC + json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def decode(raw: bytes) -> str | None:
    """The snapshot id in a blob made by :func:`encode`, or None if ``raw`` is not one."""
    if not raw.startswith(MAGIC):
        return None
    try:
        body = json.loads(raw[len(MAGIC) :].decode())
    except (UnicodeDecodeError, ValueError):
        return None
    snapshot_id = body.get("snapshot_id") if isinstance(body, dict) else None
    return snapshot_id if isinstance(snapshot_id, str) and snapshot_id else None
