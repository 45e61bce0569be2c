"""One error shape for every failure: `{"error": {"code", "message"}}` with a 4xx status."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("cove.api")

# guest agent error code -> HTTP status
GUEST_STATUS = {
    "not_found": 404,
    "exists": 409,
    "permission_denied": 403,
    "not_a_directory": 400,
    "is_a_directory": 400,
    "not_empty": 409,
    "invalid": 400,
    "too_large": 413,
    "busy": 503,
    "conflict": 409,  # e.g. stdin to a process that has exited  # the sandbox cannot start another process (its pid limit)
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra
        self.headers: dict[str, str] | None = None  # e.g. Retry-After on a 429/503

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": {"code": self.code, "message": self.message, **self.extra}},
            self.status,
            headers=self.headers,
        )


def not_found(kind: str, ident: str) -> ApiError:
    return ApiError(404, f"{kind}_not_found", f"{kind} {ident!r} not found")


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        fields = []
        for err in exc.errors():
            name = _field_name(tuple(err.get("loc", ())))
            msg = err.get("msg", "invalid")
            if err.get("type") == "json_invalid":
                name, msg = "body", f"malformed JSON: {err.get('ctx', {}).get('error', msg)}"
            fields.append({"field": name, "message": msg})
        message = "; ".join(f"{f['field']}: {f['message']}" for f in fields) or "invalid request"
        return ApiError(422, "validation_error", message, fields=fields).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(
            exc.status_code, "error"
        )
        return ApiError(exc.status_code, code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return ApiError(500, "internal", f"internal error: {type(exc).__name__}: {exc}").response()
