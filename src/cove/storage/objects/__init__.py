"""Durable state in S3-compatible object storage: content-addressed, deduplicated, crash-consistent.

    store = ObjectStore.from_env()           # COVE_OBJECT_STORE=s3://bucket/prefix + AWS_* variables
    m1 = store.upload_tree(layer_dir, "snap-1")
    m2 = store.upload_tree(layer_dir, "snap-2", parent=m1)   # reads and PUTs only what changed
    store.download_tree("snap-2", dest)      # exact, verified, all or nothing
    store.upload_images(criu_dir, "hib-1")   # a CRIU image directory (flat)
    store.collect_garbage()                  # chunks no manifest references; safe during uploads

Keys under the prefix: `chunks/<sha256>` (content), `manifests/<kind>/<id>.json` (written last),
`leases/<id>.json` (uploads in progress), `gc/running.json` (a GC in progress). The design, the
measurements behind its choices and the settings are in docs/object-storage.md.

Modules: settings (the URL and variables), bucket (the S3 client, retries, errors), chunks (cutting,
naming, encoding), manifests (the JSON format and its checksum), trees (walking, uploading,
restoring), cache (the node's LRU chunk cache), leases and gc (deleting safely during uploads),
store (the facade).
"""

from cove.storage.objects.cache import ChunkCache
from cove.storage.objects.errors import (
    AccessDenied,
    BucketNotFound,
    ConfigError,
    CorruptData,
    ManifestNotFound,
    NoSpace,
    ObjectNotFound,
    ObjectStoreError,
    ServerError,
    Unreachable,
    UploadAborted,
)
from cove.storage.objects.gc import GcReport
from cove.storage.objects.manifests import Entry, Manifest, UploadStats
from cove.storage.objects.settings import ObjectStoreSettings, StoreURL, parse_store_url
from cove.storage.objects.store import CRIU, LAYER, ObjectStore

__all__ = [
    "CRIU",
    "LAYER",
    "AccessDenied",
    "BucketNotFound",
    "ChunkCache",
    "ConfigError",
    "CorruptData",
    "Entry",
    "GcReport",
    "Manifest",
    "ManifestNotFound",
    "NoSpace",
    "ObjectNotFound",
    "ObjectStore",
    "ObjectStoreError",
    "ObjectStoreSettings",
    "ServerError",
    "StoreURL",
    "Unreachable",
    "UploadAborted",
    "UploadStats",
    "parse_store_url",
]
