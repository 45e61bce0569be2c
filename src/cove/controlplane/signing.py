"""Tokens derived from one server secret: per-sandbox access tokens and signed, expiring URLs.

Nothing is stored per token: a token is an HMAC of what it grants, so checking it costs one hash and
revoking all of them means replacing `$COVE_HOME/secret`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path


class Signer:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: bytes | None = None

    @property
    def key(self) -> bytes:
        if self._key is None:
            self._key = self._load()
        return self._key

    def _load(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            pass
        key = secrets.token_bytes(32)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        try:
            os.link(tmp, self.path)  # first writer wins if two servers start at once
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        return self.path.read_bytes()

    def token(self, purpose: str, subject: str) -> str:
        """A stable token granting `purpose` on `subject` (e.g. "envd", a sandbox id)."""
        mac = hmac.new(self.key, f"{purpose}\0{subject}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac[:24]).decode()

    def check(self, purpose: str, subject: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.token(purpose, subject), token or "")

    def sign(self, purpose: str, subject: str, expires: int) -> str:
        """A signature for `subject` valid until the unix time `expires` (0: forever)."""
        return self.token(purpose, f"{subject}\0{expires}")

    def verify(self, purpose: str, subject: str, signature: str | None, expires: int) -> bool:
        if expires and expires < time.time():
            return False
        return self.check(purpose, f"{subject}\0{expires}", signature)
