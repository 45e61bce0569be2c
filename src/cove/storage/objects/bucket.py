"""Access to the bucket: put, get, head, list and delete under the store's prefix, with retries and
errors that name the bucket and key.

The client is boto3 (botocore underneath). Why, measured on this project's 2-core VM against moto's
S3 server on loopback (docs/object-storage.md has the table):
- obstore (Rust's object_store) put 1 MiB objects about 1.25× faster with 8 threads (156 vs 122 MB/s),
  gets and heads alike within noise: the server is the bound, not the client; it would add a 5.6 MB
  native wheel and a second error model for a gain that disappears on a real network.
- boto3 is already what cove's bucket-mount tests use, is the reference S3 client that every
  S3-compatible server is tested against, reads the standard AWS variables and credential chain
  (profiles, instance metadata, web identity) itself, exposes S3's error codes (AccessDenied,
  NoSuchBucket, SlowDown) unchanged, and its "standard" retry mode retries exactly what must be retried
  (5xx, throttling, connection resets and timeouts) with exponential backoff and jitter.
- aiobotocore would only matter inside an event loop; uploads here are a thread pool around a
  CPU-bound chunker, where the synchronous client is simpler and as fast.

Request checksums are computed only "when required": botocore ≥ 1.36 otherwise adds CRC32 trailers
that several S3-compatible servers (older MinIO and Ceph, GCS) reject, and every chunk carries its
own sha256, checked on read, anyway.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from cove.storage.objects.errors import (
    AccessDenied,
    BucketNotFound,
    ConfigError,
    ObjectNotFound,
    ObjectStoreError,
    ServerError,
    Unreachable,
)
from cove.storage.objects.settings import ObjectStoreSettings

_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
_CONNECTION_ERRORS = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionClosedError,
)


@dataclass(frozen=True)
class ObjectInfo:
    name: str  # relative to the store's prefix, e.g. "chunks/<sha256>"
    size: int
    last_modified: datetime


@dataclass
class BucketStats:
    """Requests made through one Bucket (tests count PUTs with it; the bench reports bytes)."""

    puts: int = 0
    put_bytes: int = 0
    gets: int = 0
    get_bytes: int = 0
    heads: int = 0
    lists: int = 0
    deletes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in vars(self).items() if not k.startswith("_")}


class Bucket:
    """One bucket and prefix; thread-safe (boto3 clients are), one connection per worker."""

    def __init__(self, settings: ObjectStoreSettings, *, pool: int | None = None) -> None:
        self.settings = settings
        self.url = settings.url
        self.name = settings.url.bucket
        self.endpoint = settings.endpoint or f"https://s3.{settings.region}.amazonaws.com"
        self.stats = BucketStats()
        config = botocore.config.Config(
            region_name=settings.region,
            retries={"mode": "standard", "max_attempts": settings.attempts},
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            max_pool_connections=pool or settings.workers + 4,
            # Custom endpoints (MinIO, Ceph, moto) rarely have wildcard DNS for virtual-host buckets.
            s3={"addressing_style": "path" if settings.endpoint else "auto"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._session = boto3.session.Session()
        self._client: Any = self._session.client(
            "s3",
            endpoint_url=settings.endpoint,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key,
            aws_session_token=settings.session_token,
            config=config,
        )

    # -- errors ------------------------------------------------------------------------------------

    def where(self, name: str | None = None) -> str:
        return f"s3://{self.name}/{self.url.key(name)}" if name else f"s3://{self.name}"

    def _key_hint(self) -> str:
        key = self.settings.access_key_id
        if key is None:
            creds = self._session.get_credentials()  # what boto3's chain found, if anything
            key = getattr(creds, "access_key", None)
        return f"access key id …{key[-4:]}" if key else "no access key id"

    def _error(self, exc: Exception, op: str, name: str | None) -> ObjectStoreError:
        """Turn a botocore error into ours, naming the operation, bucket and key (never the secret)."""
        where = self.where(name)
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return ConfigError(
                f"{op} {where}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
            )
        if isinstance(exc, _CONNECTION_ERRORS):
            return Unreachable(
                f"{op} {where}: cannot reach the object store at {self.endpoint} after "
                f"{self.settings.attempts} attempts ({type(exc).__name__}: {exc})"
            )
        if isinstance(exc, botocore.exceptions.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            message = err.get("Message") or code
            if code in _CREDENTIAL_CODES:
                return AccessDenied(
                    f"{op} {where}: the credentials were rejected ({code}: {message}); check "
                    f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY ({self._key_hint()}) for {self.endpoint}"
                )
            if status == 403 or code in ("AccessDenied", "AllAccessDisabled", "403"):
                hint = (
                    "the credentials may not write here (a read-only key, or a bucket policy that denies it)"
                    if op in ("PUT", "DELETE")
                    else "the credentials may not read here"
                )
                return AccessDenied(f"{op} {where}: access denied (403 {code}): {hint} ({self._key_hint()})")
            if code == "NoSuchBucket":
                return BucketNotFound(f"{op} {where}: bucket {self.name!r} does not exist at {self.endpoint}")
            if status == 404 or code in ("NoSuchKey", "404", "NotFound"):
                return ObjectNotFound(f"{op} {where}: no such key")
            if status >= 500 or code in ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout"):
                return ServerError(
                    f"{op} {where}: the server kept failing ({status} {code}: {message}) after "
                    f"{self.settings.attempts} attempts"
                )
            return ObjectStoreError(f"{op} {where}: {status} {code}: {message}")
        if isinstance(exc, botocore.exceptions.BotoCoreError):
            return ObjectStoreError(f"{op} {where}: {exc}")
        raise exc

    # -- operations -------------------------------------------------------------------------------

    def put(self, name: str, body: bytes) -> None:
        try:
            self._client.put_object(Bucket=self.name, Key=self.url.key(name), Body=body)
        except Exception as exc:
            raise self._error(exc, "PUT", name) from exc
        self.stats.add(puts=1, put_bytes=len(body))

    def get(self, name: str) -> bytes:
        try:
            resp = self._client.get_object(Bucket=self.name, Key=self.url.key(name))
            body: bytes = resp["Body"].read()
        except Exception as exc:
            raise self._error(exc, "GET", name) from exc
        self.stats.add(gets=1, get_bytes=len(body))
        return body

    def head(self, name: str) -> ObjectInfo | None:
        """The object's size and time, or None when the key does not exist."""
        try:
            resp = self._client.head_object(Bucket=self.name, Key=self.url.key(name))
        except Exception as exc:
            err = self._error(exc, "HEAD", name)
            if type(err) is ObjectNotFound:
                self.stats.add(heads=1)
                return None
            raise err from exc
        self.stats.add(heads=1)
        return ObjectInfo(name, int(resp["ContentLength"]), resp["LastModified"])

    def list(self, prefix: str) -> tuple[list[ObjectInfo], datetime]:
        """Every object whose name starts with `prefix`, and the server's clock at the listing (from
        its Date header), so that ages are measured on one clock whatever the node's says."""
        full = self.url.key(prefix)
        strip = len(self.url.key(""))
        out: list[ObjectInfo] = []
        now: datetime | None = None
        token: str | None = None
        try:
            while True:
                kwargs: dict[str, Any] = {"Bucket": self.name, "Prefix": full}
                if token:
                    kwargs["ContinuationToken"] = token
                resp = self._client.list_objects_v2(**kwargs)
                self.stats.add(lists=1)
                if now is None:
                    now = _server_time(resp)
                for obj in resp.get("Contents", ()):
                    out.append(ObjectInfo(obj["Key"][strip:], int(obj["Size"]), obj["LastModified"]))
                if not resp.get("IsTruncated"):
                    break
                token = resp["NextContinuationToken"]
        except Exception as exc:
            raise self._error(exc, "LIST", prefix or None) from exc
        return out, now or datetime.now(UTC)

    def delete(self, names: Iterable[str]) -> int:
        """Delete objects, 1000 per request (S3's limit); returns how many were deleted."""
        batch: list[str] = []
        done = 0
        for name in names:
            batch.append(name)
            if len(batch) == 1000:
                done += self._delete_batch(batch)
                batch = []
        if batch:
            done += self._delete_batch(batch)
        return done

    def delete_one(self, name: str) -> None:
        try:
            self._client.delete_object(Bucket=self.name, Key=self.url.key(name))
        except Exception as exc:
            raise self._error(exc, "DELETE", name) from exc
        self.stats.add(deletes=1)

    def _delete_batch(self, names: list[str]) -> int:
        try:
            resp = self._client.delete_objects(
                Bucket=self.name,
                Delete={"Objects": [{"Key": self.url.key(n)} for n in names], "Quiet": True},
            )
        except Exception as exc:
            raise self._error(exc, "DELETE", names[0]) from exc
        errors = resp.get("Errors") or []
        if errors:
            first = errors[0]
            raise ObjectStoreError(
                f"DELETE s3://{self.name}/{first.get('Key')}: {first.get('Code')}: {first.get('Message')} "
                f"({len(errors)} of {len(names)} keys not deleted)"
            )
        self.stats.add(deletes=len(names))
        return len(names)

    def check(self) -> None:
        """Fail now, with a clear error, if the bucket cannot be listed (credentials, bucket, endpoint)."""
        try:
            self._client.list_objects_v2(Bucket=self.name, Prefix=self.url.key(""), MaxKeys=1)
        except Exception as exc:
            raise self._error(exc, "LIST", None) from exc

    def close(self) -> None:
        self._client.close()


def _server_time(resp: dict[str, Any]) -> datetime | None:
    date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if not date:
        return None
    try:
        return parsedate_to_datetime(date)
    except (TypeError, ValueError):
        return None
