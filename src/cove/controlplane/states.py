"""A sandbox's states and the only transitions between them (persisted in the store, compare-and-set).

starting   -> running | error | lost
running    -> paused | hibernated | killed | error | lost
paused     -> running | hibernated | killed | error | lost
hibernated -> running | killed | error | lost

`lost`: the node that held it stopped heartbeating (docs/fleet.md); what it had is out of reach.
"""

from __future__ import annotations

TRANSITIONS = {
    "starting": {"running", "error", "lost"},
    "running": {"paused", "hibernated", "killed", "error", "lost"},
    "paused": {"running", "hibernated", "killed", "error", "lost"},
    "hibernated": {"running", "killed", "error", "lost"},
    "killed": set(),
    "error": set(),
    "lost": set(),
}
LIVE = ("starting", "running", "paused", "hibernated")  # states that hold resources
ACTIVE = ("running", "paused")  # states with processes
