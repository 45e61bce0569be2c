"""The few calls of cove's REST API (/v1) that the controller and the router make, with one API key.

Plain httpx rather than cove.sdk: the router streams file bodies and port traffic through unchanged, and
both need the HTTP status of every failure (404 is an answer here, not an error)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx


class CoveError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def _error(r: httpx.Response) -> CoveError:
    try:
        body = r.json()
        err = body.get("error", body) if isinstance(body, dict) else {}
        code = str(err.get("code") or r.reason_phrase)
        message = str(err.get("message") or err.get("detail") or r.text)
    except ValueError:
        code, message = r.reason_phrase, r.text
    return CoveError(r.status_code, code, message[:2000])


class CoveAPI:
    def __init__(self, url: str, api_key: str, timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(timeout, connect=10.0),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        )

    async def close(self) -> None:
        await self.http.aclose()

    async def _json(self, method: str, path: str, **kw: Any) -> Any:
        r = await self.http.request(method, path, **kw)
        if r.status_code >= 400:
            raise _error(r)
        return r.json() if r.content else None

    # --- sandboxes ---------------------------------------------------------------------------------------

    async def get(self, sandbox_id: str) -> dict[str, Any] | None:
        try:
            return await self._json("GET", f"/v1/sandboxes/{sandbox_id}")
        except CoveError as e:
            if e.status == 404:
                return None
            raise

    async def find(self, metadata: dict[str, str]) -> list[dict[str, Any]]:
        """Live sandboxes with these metadata labels."""
        params: list[tuple[str, str]] = [("metadata", f"{k}={v}") for k, v in metadata.items()]
        params += [("state", s) for s in ("starting", "running", "paused", "hibernated")]
        return (await self._json("GET", "/v1/sandboxes", params=params))["items"]

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._json("POST", "/v1/sandboxes", json=body)

    async def kill(self, sandbox_id: str) -> None:
        """Ends the sandbox; one that is gone already is fine."""
        r = await self.http.delete(f"/v1/sandboxes/{sandbox_id}")
        if r.status_code >= 400 and r.status_code != 404:
            raise _error(r)

    async def hibernate(self, sandbox_id: str) -> dict[str, Any]:
        return await self._json("POST", f"/v1/sandboxes/{sandbox_id}/hibernate")

    async def resume(self, sandbox_id: str) -> dict[str, Any]:
        return await self._json("POST", f"/v1/sandboxes/{sandbox_id}/resume")

    async def set_network(self, sandbox_id: str, settings: dict[str, Any]) -> dict[str, Any]:
        return await self._json("PUT", f"/v1/sandboxes/{sandbox_id}/network", json=settings)

    # --- snapshots ---------------------------------------------------------------------------------------

    async def snapshot(self, sandbox_id: str, name: str, memory: bool) -> dict[str, Any]:
        return await self._json(
            "POST", f"/v1/sandboxes/{sandbox_id}/snapshots", json={"name": name, "memory": memory}
        )

    async def snapshots(self) -> list[dict[str, Any]]:
        return (await self._json("GET", "/v1/snapshots"))["items"]

    async def delete_snapshot(self, snapshot_id: str) -> None:
        r = await self.http.delete(f"/v1/snapshots/{snapshot_id}")
        if r.status_code >= 400 and r.status_code != 404:
            raise _error(r)

    # --- inside a sandbox (the router) ------------------------------------------------------------------

    async def exec(self, sandbox_id: str, cmd: str, timeout: float | None) -> dict[str, Any]:
        body: dict[str, Any] = {"cmd": cmd}
        if timeout:
            body["timeout"] = timeout
        # The read waits past the command's own limit: cove answers timed_out after killing it.
        read = (timeout or 3600.0) + 30.0
        return await self._json(
            "POST", f"/v1/sandboxes/{sandbox_id}/exec", json=body, timeout=httpx.Timeout(read, connect=10.0)
        )

    async def write(self, sandbox_id: str, path: str, chunks: AsyncIterator[bytes]) -> dict[str, Any]:
        return await self._json(
            "PUT", f"/v1/sandboxes/{sandbox_id}/files", params={"path": path}, content=chunks
        )

    async def open(self, sandbox_id: str, path: str) -> httpx.Response:
        """The file's response, streaming (the caller closes it); raises CoveError for a failure."""
        req = self.http.build_request("GET", f"/v1/sandboxes/{sandbox_id}/files", params={"path": path})
        r = await self.http.send(req, stream=True)
        if r.status_code >= 400:
            await r.aread()
            await r.aclose()
            raise _error(r)
        return r

    async def list(self, sandbox_id: str, path: str) -> list[dict[str, Any]]:
        return (await self._json("GET", f"/v1/sandboxes/{sandbox_id}/files/list", params={"path": path}))[
            "entries"
        ]

    async def stat(self, sandbox_id: str, path: str) -> dict[str, Any] | None:
        try:
            return await self._json("GET", f"/v1/sandboxes/{sandbox_id}/files/stat", params={"path": path})
        except CoveError as e:
            if e.status == 404:
                return None
            raise
