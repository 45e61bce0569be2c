"""Garbage collection: delete the chunks that no complete manifest references.

Safe while uploads run, by the lease protocol of leases.py:
1. put the marker `gc/running.json` (from now on, new uploads wait);
2. list the leases until none is live (renewed within TTL, server clock), for at most `wait_s`:
   uploads already running finish and commit; if some are still running then, give up (remove the
   marker and report why), since their chunks are in the bucket but in no manifest yet;
3. list the chunks, then read every manifest (verifying each: a manifest that fails its checksum stops
   the GC, since what it references cannot be known) and delete the chunks none references, stopping
   TTL/2 after step 1 so that an upload that waited TTL never meets a deletion;
4. remove dead uploads' leases (their chunks were just swept) and the marker.

A chunk that a crashed upload left (kill -9 before its manifest) is unreferenced and goes at the next
GC after its lease expires; a chunk of a deleted manifest goes at the next GC. Run it from one place
(the control plane's leader); two GCs at once are still safe (each only deletes what no manifest
references while no upload runs), just wasteful.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from cove.storage.objects.bucket import Bucket
from cove.storage.objects.chunks import chunk_name
from cove.storage.objects.leases import GC_MARKER, LEASES, age_s
from cove.storage.objects.manifests import Manifest

log = logging.getLogger("cove.storage.objects")


@dataclass
class GcReport:
    swept: bool
    reason: str = ""
    manifests: int = 0
    chunks_kept: int = 0
    chunks_deleted: int = 0
    bytes_deleted: int = 0
    leases_removed: int = 0
    waiting_for: list[str] = field(default_factory=list)  # live leases when it gave up
    seconds: float = 0.0


def collect_garbage(bucket: Bucket, *, ttl: float, wait_s: float = 60.0) -> GcReport:
    t0 = time.monotonic()
    bucket.put(GC_MARKER, b'{"gc": "running"}')
    try:
        return _collect(bucket, ttl, wait_s, t0)
    finally:
        try:
            bucket.delete_one(GC_MARKER)
        except Exception as exc:  # a leftover marker only makes uploads wait until it is TTL old
            log.warning("object store GC: could not remove %s: %s", GC_MARKER, exc)


def _collect(bucket: Bucket, ttl: float, wait_s: float, t0: float) -> GcReport:
    while True:
        leases, now = bucket.list(LEASES)
        live = [lease.name for lease in leases if age_s(lease.last_modified, now) < ttl]
        if not live:
            break
        if time.monotonic() - t0 > wait_s:
            return GcReport(
                swept=False,
                reason=f"{len(live)} upload(s) still running after {wait_s:.0f} s",
                waiting_for=live,
                seconds=time.monotonic() - t0,
            )
        time.sleep(min(0.5, ttl / 20))
    dead = [lease.name for lease in leases]

    chunks, _ = bucket.list("chunks/")
    manifests, _ = bucket.list("manifests/")
    referenced: set[str] = set()
    count = 0
    for info in manifests:
        if not info.name.endswith(".json"):
            continue
        where = info.name.removeprefix("manifests/").removesuffix(".json")
        referenced |= Manifest.from_bytes(bucket.get(info.name), where).chunk_shas()
        count += 1
    garbage = [c for c in chunks if c.name.removeprefix("chunks/") not in referenced]

    report = GcReport(swept=True, manifests=count, chunks_kept=len(chunks) - len(garbage))
    for start in range(0, len(garbage), 1000):
        if time.monotonic() - t0 > ttl / 2:
            report.swept = False
            report.reason = f"stopped after {ttl / 2:.0f} s (the marker's safe time); run again"
            break
        batch = garbage[start : start + 1000]
        bucket.delete(chunk_name(c.name.removeprefix("chunks/")) for c in batch)
        report.chunks_deleted += len(batch)
        report.bytes_deleted += sum(c.size for c in batch)
    if dead:
        report.leases_removed = bucket.delete(dead)
    report.seconds = time.monotonic() - t0
    log.info(
        "object store GC: %d manifests, %d chunks kept, %d deleted (%d bytes)",
        count,
        report.chunks_kept,
        report.chunks_deleted,
        report.bytes_deleted,
    )
    return report
