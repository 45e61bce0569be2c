"""Which store a location names: a `postgresql://` URL is PostgreSQL, anything else a SQLite file.

The control plane and the CLI go through `make_store`, so neither names a backend; psycopg is imported
only when a URL asks for it."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from cove.store.base import Store, StoreError
from cove.store.sqlite import SQLiteStore
from cove.store.url import redact_url

_SCHEMES = ("postgresql", "postgres")


def is_database_url(location: str | Path) -> bool:
    return isinstance(location, str) and "://" in location


def make_store(location: str | Path) -> Store:
    """The store at `location` (not yet open): a PostgreSQL URL, or a SQLite file's path."""
    if not is_database_url(location):
        return SQLiteStore(Path(location))
    url = str(location)
    if urlsplit(url).scheme not in _SCHEMES:
        raise StoreError(
            f"{redact_url(url)}: not a database URL cove knows (use postgresql://user@host:port/db)"
        )
    from cove.store.postgres import PostgresStore

    return PostgresStore(url)


def describe(location: str | Path) -> str:
    """The location as messages may show it: a URL without its password."""
    return redact_url(str(location)) if is_database_url(location) else str(location)
