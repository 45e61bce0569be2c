"""Errors of the object store: each names the bucket and key (or the manifest and file) it is about,
and never a secret.

They derive from `ObjectStoreError` so that a caller (the control plane) can tell "the object store
failed" from its own errors with one except clause.
"""

from __future__ import annotations


class ObjectStoreError(Exception):
    """Base class of every object store error."""


class ConfigError(ObjectStoreError):
    """COVE_OBJECT_STORE or an AWS_* variable is missing or malformed."""


class AccessDenied(ObjectStoreError):
    """The server refused the request (403): wrong credentials, or credentials that may not do this."""


class BucketNotFound(ObjectStoreError):
    """The bucket does not exist at the endpoint (404 NoSuchBucket)."""


class ObjectNotFound(ObjectStoreError):
    """The key does not exist (404)."""


class ManifestNotFound(ObjectNotFound):
    """No complete manifest of that kind and id is in the bucket."""


class Unreachable(ObjectStoreError):
    """The endpoint could not be reached (connection refused, DNS, timeouts) after every retry."""


class ServerError(ObjectStoreError):
    """The server kept answering 5xx or throttling after every retry."""


class CorruptData(ObjectStoreError):
    """Stored data failed its checksum (a chunk or a manifest), or a chunk a manifest names is missing.

    `manifest` is "kind/id" (the snapshot), `path` the file inside the tree that needed the chunk (or
    None for a manifest's own checksum), `chunk` the chunk's sha256 (or None).
    """

    def __init__(
        self, message: str, *, manifest: str | None = None, path: str | None = None, chunk: str | None = None
    ) -> None:
        super().__init__(message)
        self.manifest = manifest
        self.path = path
        self.chunk = chunk


class NoSpace(ObjectStoreError):
    """The destination of a download has no room for it (checked first, and on ENOSPC while writing)."""


class UploadAborted(ObjectStoreError):
    """An upload gave up before writing its manifest (its lease went stale, or a GC would not finish)."""
