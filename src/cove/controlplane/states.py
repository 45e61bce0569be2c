"""A sandbox's states and the only transitions between them (persisted in the store, compare-and-set).

starting   -> running | error | lost
running    -> paused | hibernated | killed | error | lost
paused     -> running | hibernated | killed | error | lost
hibernated -> running | killed | error | lost
lost       -> running | hibernated | killed | error

`lost`: the node that held it stopped heartbeating (docs/fleet.md), so it is out of reach. When
that node starts again with the sandbox intact, the sandbox comes back (running, or hibernated);
a kill meanwhile is recorded, and the node removes the sandbox when it returns.
"""

from __future__ import annotations

TRANSITIONS = {
    "starting": {"running", "error", "lost"},
    "running": {"paused", "hibernated", "killed", "error", "lost"},
    "paused": {"running", "hibernated", "killed", "error", "lost"},
    "hibernated": {"running", "killed", "error", "lost"},
    "killed": set(),
    "error": set(),
    "lost": {"running", "hibernated", "killed", "error"},
}
LIVE = ("starting", "running", "paused", "hibernated")  # states that hold resources
ACTIVE = ("running", "paused")  # states with processes
# What a sandbox's timeout does: kill it, hibernate it, or hibernate it keeping only its files.
ON_TIMEOUT = ("kill", "hibernate", "hibernate_files")
