"""Where the object store is and how to reach it: `COVE_OBJECT_STORE=s3://bucket/prefix` plus the
standard AWS variables, and the node-side knobs (cache, parallelism, compression, retries).

| variable | default | meaning |
|---|---|---|
| COVE_OBJECT_STORE | (required) | `s3://bucket` or `s3://bucket/prefix`: every key lives under the prefix |
| AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL | AWS | an S3-compatible endpoint (MinIO, Ceph RGW, GCS, moto) |
| AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN | boto3's chain | credentials |
| AWS_DEFAULT_REGION, AWS_REGION | us-east-1 | the region requests are signed for |
| COVE_OBJECT_CACHE | $COVE_HOME/object-cache | the node's chunk cache; `off` for none |
| COVE_OBJECT_CACHE_SIZE | 10G | the cache's size limit (LRU eviction above it) |
| COVE_OBJECT_STORE_WORKERS | 16 | parallel requests per upload or download |
| COVE_OBJECT_STORE_COMPRESSION | zstd | `zstd` (level 1, only where it saves ≥ 10 %) or `none` |
| COVE_OBJECT_STORE_ATTEMPTS | 6 | attempts per request (botocore "standard" retries: 5xx, throttling, resets) |
| COVE_OBJECT_STORE_LEASE_TTL | 600 | seconds after its last renewal that an upload's lease counts as dead (gc.py) |
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from cove.storage.objects.errors import ConfigError

# S3's bucket naming rules (virtual-host safe): 3-63 of a-z 0-9 . -, starting and ending alphanumeric.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SEGMENT = re.compile(r"^[A-Za-z0-9!_.*'()-]+$")  # S3's "safe characters" for key segments
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.I)


@dataclass(frozen=True)
class StoreURL:
    """A parsed `s3://bucket/prefix`; `prefix` has no leading or trailing slash ("" for none)."""

    bucket: str
    prefix: str = ""

    def key(self, name: str) -> str:
        """The full key of `name` (e.g. "chunks/ab…") under the prefix."""
        return f"{self.prefix}/{name}" if self.prefix else name

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def parse_store_url(url: str) -> StoreURL:
    """Parse and check COVE_OBJECT_STORE; every error says what was expected (never echoing a secret)."""
    raw = url.strip()
    if not raw:
        raise ConfigError("COVE_OBJECT_STORE is empty: expected s3://bucket or s3://bucket/prefix")
    parts = urlsplit(raw)
    if "@" in parts.netloc:
        # Someone put credentials in the URL: say so without repeating them.
        raise ConfigError(
            "COVE_OBJECT_STORE must not hold credentials (user:secret@): set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY instead"
        )
    shown = raw if len(raw) < 200 else raw[:200] + "…"
    if parts.scheme != "s3":
        raise ConfigError(f"COVE_OBJECT_STORE={shown!r}: expected s3://bucket/prefix (scheme s3)")
    if parts.query or parts.fragment or ":" in parts.netloc:
        raise ConfigError(
            f"COVE_OBJECT_STORE={shown!r}: expected s3://bucket/prefix without a port, query or fragment "
            "(the endpoint goes in AWS_ENDPOINT_URL)"
        )
    bucket = parts.netloc
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise ConfigError(
            f"COVE_OBJECT_STORE={shown!r}: {bucket!r} is not a valid bucket name "
            "(3-63 characters of a-z, 0-9, '.' and '-', starting and ending with a letter or digit)"
        )
    segments = [s for s in parts.path.split("/") if s]
    for s in segments:
        if s in (".", "..") or not _SEGMENT.match(s):
            raise ConfigError(
                f"COVE_OBJECT_STORE={shown!r}: prefix segment {s!r} is not allowed "
                "(use letters, digits and !_.*'()-, no '.' or '..')"
            )
    return StoreURL(bucket=bucket, prefix="/".join(segments))


def parse_size(text: str, name: str) -> int:
    """'10G', '512M', '1.5GiB' or a byte count, into bytes."""
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"{name}={text!r}: expected a size such as 10G, 512M or a byte count")
    unit = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * unit)


def _endpoint(env: Mapping[str, str]) -> str | None:
    value = (env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or "").strip()
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        raise ConfigError(f"AWS_ENDPOINT_URL={value.split('@')[-1]!r}: expected http(s)://host[:port]")
    return value.rstrip("/")


def _int(env: Mapping[str, str], name: str, default: int, low: int = 1) -> int:
    value = env.get(name, "").strip()
    if not value:
        return default
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r}: expected an integer") from None
    if n < low:
        raise ConfigError(f"{name}={value!r}: expected at least {low}")
    return n


@dataclass(frozen=True)
class ObjectStoreSettings:
    url: StoreURL
    endpoint: str | None = None
    region: str = "us-east-1"
    # None: boto3's own chain (environment, profile, instance metadata). The secret is kept out of repr.
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    cache_dir: Path | None = None
    cache_limit: int = 10 << 30
    workers: int = 16
    compression: str = "zstd"
    attempts: int = 6
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    lease_ttl: float = 600.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ObjectStoreSettings:
        env = os.environ if env is None else env
        url = env.get("COVE_OBJECT_STORE")
        if url is None:
            raise ConfigError("COVE_OBJECT_STORE is not set: expected s3://bucket or s3://bucket/prefix")
        cache = env.get("COVE_OBJECT_CACHE", "").strip()
        if cache.lower() == "off":
            cache_dir = None
        elif cache:
            cache_dir = Path(cache)
        else:
            home = env.get("COVE_HOME") or str(Path.home() / ".cove")
            cache_dir = Path(home) / "object-cache"
        compression = env.get("COVE_OBJECT_STORE_COMPRESSION", "zstd").strip().lower() or "zstd"
        if compression not in ("zstd", "none"):
            raise ConfigError(f"COVE_OBJECT_STORE_COMPRESSION={compression!r}: expected zstd or none")
        ttl = env.get("COVE_OBJECT_STORE_LEASE_TTL", "").strip()
        try:
            lease_ttl = float(ttl) if ttl else 600.0
        except ValueError:
            raise ConfigError(f"COVE_OBJECT_STORE_LEASE_TTL={ttl!r}: expected seconds") from None
        return cls(
            url=parse_store_url(url),
            endpoint=_endpoint(env),
            region=(env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1").strip(),
            access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
            cache_dir=cache_dir,
            cache_limit=parse_size(env.get("COVE_OBJECT_CACHE_SIZE", "10G"), "COVE_OBJECT_CACHE_SIZE"),
            workers=_int(env, "COVE_OBJECT_STORE_WORKERS", 16),
            compression=compression,
            attempts=_int(env, "COVE_OBJECT_STORE_ATTEMPTS", 6),
            lease_ttl=lease_ttl,
        )
