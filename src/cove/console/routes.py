"""The console's pages: sign-in and sign-out (a server-side session in an HttpOnly, SameSite=Strict
cookie), and one page shell per object kind; the data comes from /v1 in the page's scripts."""

from __future__ import annotations

import hmac
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from cove import __version__
from cove.controlplane.auth import SESSION_COOKIE, Caller, Session, hash_key, same_origin
from cove.controlplane.errors import ApiError
from cove.controlplane.schemas import SandboxOut

if TYPE_CHECKING:
    from cove.controlplane.app import Cove

HERE = Path(__file__).parent
PREFIX = "/console"
templates = Jinja2Templates(directory=HERE / "templates")  # autoescapes every .html template
router = APIRouter(prefix=PREFIX, include_in_schema=False)

# Pages only load this server's own scripts, styles and connections, and nobody may frame them.
# 'unsafe-inline' styles: xterm.js's renderer writes a <style> element of its own.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

# The simple pages: what each lists, from which public route (rendered by static/js/tables.js).
PAGES: dict[str, dict[str, Any]] = {
    "snapshots": {"title": "Snapshots", "api": "/v1/snapshots"},
    "templates": {"title": "Templates", "api": "/v1/templates"},
    "volumes": {"title": "Volumes", "api": "/v1/volumes"},
    "pools": {"title": "Pools", "api": "/v1/pools"},
    "keys": {"title": "API keys", "api": "/v1/keys", "admin": True},
    "quota": {"title": "Quota", "api": "/v1/quota"},
    "audit": {"title": "Audit log", "api": "/v1/audit"},
}
NAV = [("sandboxes", "Sandboxes"), *((k, v["title"]) for k, v in PAGES.items())]


def _cove(request: Request) -> Cove:
    return request.app.state.cove


async def _signed_in(request: Request) -> tuple[Session, Caller] | None:
    cove = _cove(request)
    session = await cove.sessions.get(request.cookies.get(SESSION_COOKIE))
    if session is None:
        return None
    who = await cove.sessions.caller(session)
    return (session, who) if who else None


def _page(
    request: Request, name: str, context: dict[str, Any], status: int = 200, session: Session | None = None
) -> HTMLResponse:
    base = {
        "prefix": PREFIX,
        "version": __version__,
        "csrf": session.csrf if session else "",
        "nav": NAV,
        **context,
    }
    return templates.TemplateResponse(request, name, base, status_code=status, headers=HEADERS)


def _to_login(request: Request) -> RedirectResponse:
    return RedirectResponse(f"{PREFIX}/login", status_code=303, headers={"Cache-Control": "no-store"})


@router.get("", response_model=None)
@router.get("/", response_model=None)
async def home(request: Request) -> Response:
    signed = await _signed_in(request)
    return RedirectResponse(f"{PREFIX}/sandboxes" if signed else f"{PREFIX}/login", status_code=303)


@router.get("/login", response_model=None)
async def login_page(request: Request) -> Response:
    if await _signed_in(request):
        return RedirectResponse(f"{PREFIX}/sandboxes", status_code=303)
    return _page(request, "login.html", {"error": None, "page": "login"})


@router.post("/login", response_model=None)
async def login(request: Request) -> Response:
    """Exchange an API key for a session. The key is checked, hashed and forgotten: the cookie holds
    a random session id, the server the key's hash."""
    if not same_origin(request):  # a login form posted from another site
        return _page(request, "login.html", {"error": "cross-site sign-in refused", "page": "login"}, 403)
    form = await request.form()
    key = str(form.get("api_key") or "").strip()
    cove = _cove(request)
    rec = await cove.keys.lookup(hash_key(key)) if key else None
    if rec is None:
        error = "That is not a valid API key." if key else "Enter an API key."
        return _page(request, "login.html", {"error": error, "page": "login"}, 401)
    await cove.sessions.end(request.cookies.get(SESSION_COOKIE))  # a new id at every sign-in (no fixation)
    session_id, _ = await cove.sessions.create(rec.hash)
    response = RedirectResponse(f"{PREFIX}/sandboxes", status_code=303, headers={"Cache-Control": "no-store"})
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
        max_age=int(cove.sessions.lifetime),
    )
    return response


@router.post("/logout", response_model=None)
async def logout(request: Request) -> Response:
    cove = _cove(request)
    session_id = request.cookies.get(SESSION_COOKIE)
    session = await cove.sessions.get(session_id)
    form = await request.form()
    token = str(form.get("csrf") or request.headers.get("x-csrf-token") or "")
    if session is not None:
        if not hmac.compare_digest(token, session.csrf):
            raise ApiError(403, "csrf_failed", "missing or wrong CSRF token for this session")
        await cove.sessions.end(session_id)
    response = _to_login(request)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


@router.get("/sandboxes", response_model=None)
async def sandboxes_page(request: Request) -> Response:
    signed = await _signed_in(request)
    if signed is None:
        return _to_login(request)
    session, who = signed
    return _page(request, "sandboxes.html", {"page": "sandboxes", "who": who}, session=session)


@router.get("/sandboxes/{sandbox_id}", response_model=None)
async def sandbox_page(request: Request, sandbox_id: str) -> Response:
    signed = await _signed_in(request)
    if signed is None:
        return _to_login(request)
    session, who = signed
    try:  # the same lookup as GET /v1/sandboxes/{id}: another tenant's sandbox is not found
        rec = await _cove(request).service.get(who, sandbox_id)
    except ApiError as e:
        if e.status != 404:
            raise
        context = {"page": "sandboxes", "who": who, "missing": sandbox_id}
        return _page(request, "not_found.html", context, 404, session)
    sandbox = SandboxOut.of(rec).model_dump(mode="json")
    context = {
        "page": "sandboxes",
        "who": who,
        "sb": sandbox,
        "sb_json": json.dumps(sandbox),
        "base_url": str(request.base_url).rstrip("/"),
    }
    return _page(request, "sandbox.html", context, session=session)


@router.get("/{name}", response_model=None)
async def table_page(request: Request, name: str) -> Response:
    signed = await _signed_in(request)
    if signed is None:
        return _to_login(request)
    session, who = signed
    spec = PAGES.get(name)
    if spec is None:
        return _page(request, "not_found.html", {"page": name, "who": who, "missing": None}, 404, session)
    context = {"page": name, "who": who, "spec": spec, "base_url": str(request.base_url).rstrip("/")}
    return _page(request, "table.html", context, session=session)


class _Static(StaticFiles):
    """The console's own files: cacheable, never sniffed."""

    async def get_response(self, path: str, scope: Any) -> Response:
        response = await super().get_response(path, scope)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers.setdefault("Cache-Control", "public, max-age=300")
        return response


def install(app: FastAPI, cove: Cove) -> None:
    """Mount the console at /console on the application that serves cove's API."""
    app.include_router(router)
    app.mount(f"{PREFIX}/static", _Static(directory=HERE / "static"), name="console-static")
