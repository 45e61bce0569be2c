"""Upload leases and the GC marker: how uploads and garbage collection stay out of each other's way.

An upload puts `leases/<id>.json` before it reads anything (the parent manifest, the chunk listing)
and renews it every TTL/4 until its manifest is written. A GC puts `gc/running.json`, then lists the
leases, and sweeps only when none is live (renewed within TTL by the server's clock); an upload, after
putting its lease, looks for the marker, and while a live one is there it takes its lease back and
waits. Both write their own flag and then read the other's, and S3 is strongly consistent (a LIST or
GET that starts after a PUT returned sees it), so at least one of them sees the other: a sweep never
overlaps an upload that has read anything. Hence an upload may trust every chunk it sees (parent or
listing) until it commits, without HEADs or per-chunk timestamps.

The two clocks that could disagree never meet: ages are measured on the server's clock (LastModified
against the Date of the same LIST), durations on each process's monotonic clock. What is left is the
usual lease assumption: an upload whose renewals stopped for TTL/2 (a paused VM, a partition)
refuses to commit (UploadAborted), and a GC stops deleting TTL/2 after its marker was written, so a
marker older than TTL is from a GC that died and is ignored.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from datetime import datetime

from cove.storage.objects.bucket import Bucket
from cove.storage.objects.errors import UploadAborted

log = logging.getLogger("cove.storage.objects")

LEASES = "leases/"
GC_MARKER = "gc/running.json"


def age_s(then: datetime, now: datetime) -> float:
    return (now - then).total_seconds()


def gc_marker_age(bucket: Bucket) -> float | None:
    """Seconds since the GC marker was written (server clock), or None when there is none."""
    infos, now = bucket.list(GC_MARKER)
    for info in infos:
        if info.name == GC_MARKER:
            return age_s(info.last_modified, now)
    return None


class Lease:
    """An upload's claim that the chunks it has seen must stay; see the module docstring."""

    def __init__(self, bucket: Bucket, ttl: float, what: str) -> None:
        self.bucket = bucket
        self.ttl = ttl
        self.what = what
        self.id = f"{int(time.time())}-{secrets.token_hex(6)}"
        self.name = f"{LEASES}{self.id}.json"
        self._last_ok = 0.0
        self._broken = 0.0  # the longest gap between renewals, once it exceeded TTL/2
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._body = json.dumps(
            {"what": what, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        ).encode()

    def acquire(self) -> None:
        """Put the lease, waiting out a running GC (at most TTL: a marker that old is a dead GC's)."""
        deadline = time.monotonic() + self.ttl
        while True:
            self._put()
            age = gc_marker_age(self.bucket)
            if age is None or age >= self.ttl or time.monotonic() > deadline:
                break
            # A GC is sweeping, or about to: step back so that it can finish, then try again.
            self.bucket.delete_one(self.name)
            self._last_ok = 0.0  # not held while waiting: no gap to account for
            log.info("object store: %s waits for a running GC (marker %.0f s old)", self.what, age)
            time.sleep(min(1.0, self.ttl / 20))
        self._thread = threading.Thread(target=self._renew, name=f"lease-{self.id}", daemon=True)
        self._thread.start()

    def _put(self) -> None:
        self.bucket.put(self.name, self._body)
        now = time.monotonic()
        # A renewal after a long gap does not make the lease whole again: a GC may have swept in the
        # gap, taking chunks this upload counts on.
        if self._last_ok and now - self._last_ok > self.ttl / 2:
            self._broken = max(self._broken, now - self._last_ok)
        self._last_ok = now

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self._put()
            except Exception as exc:  # the commit check below turns a lost lease into an error
                log.warning("object store: renewing the lease of %s failed: %s", self.what, exc)

    def assert_fresh(self) -> None:
        """Raise unless the lease was renewed recently enough that no GC can have swept meanwhile."""
        stale = max(time.monotonic() - self._last_ok, self._broken)
        if stale > self.ttl / 2:
            raise UploadAborted(
                f"upload of {self.what}: its lease in {self.bucket.where(self.name)} went "
                f"{stale:.0f} s without renewal (limit {self.ttl / 2:.0f} s); a GC may have run, so the manifest was "
                "not written: upload again"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.bucket.delete_one(self.name)
        except Exception as exc:  # a stale lease only delays GC until it expires
            log.warning("object store: could not remove the lease of %s: %s", self.what, exc)
