"""A sandbox's states and the only transitions between them (persisted in the store, compare-and-set).

starting   -> running | error
running    -> paused | hibernated | killed | error
paused     -> running | hibernated | killed | error
hibernated -> running | killed | error
"""

from __future__ import annotations

TRANSITIONS = {
    "starting": {"running", "error"},
    "running": {"paused", "hibernated", "killed", "error"},
    "paused": {"running", "hibernated", "killed", "error"},
    "hibernated": {"running", "killed", "error"},
    "killed": set(),
    "error": set(),
}
LIVE = ("starting", "running", "paused", "hibernated")  # states that hold resources
ACTIVE = ("running", "paused")  # states with processes
