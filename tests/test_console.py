"""The web console (docs/console.md) in a real browser: Debian's chromium driven by Playwright against
a real `cove serve`. Sign-in, the sandbox list, one sandbox's terminal, files, lifecycle and charts,
tenancy, and the session's CSRF defence. Screenshots of every page go to docs/images/console-*.png."""

from __future__ import annotations

import itertools
import json
import os
import secrets
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Server

CHROMIUM = os.environ.get("COVE_TEST_CHROMIUM", "/usr/bin/chromium")
IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"
XSS = "<img src=x onerror=alert(1)>"

try:
    from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - the dev extra brings it
    sync_playwright = None  # type: ignore[assignment]


def _no_browser() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if sync_playwright is None:
        return "playwright is not installed (pip install -e '.[dev]' with PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1)"
    if not os.path.exists(CHROMIUM):
        return f"no chromium at {CHROMIUM} (COVE_TEST_CHROMIUM): apt-get install chromium (setup.sh does)"
    return None


def _key(api: httpx.Client, tenant: str, admin: bool = False) -> str:
    r = api.post(
        "/v1/keys", json={"name": f"{tenant}-{secrets.token_hex(3)}", "tenant": tenant, "admin": admin}
    )
    assert r.status_code == 201, r.text
    return r.json()["key"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    why = _no_browser()
    if why:
        pytest.skip(why)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def tenant(server: Server) -> dict[str, str]:
    """Two tenants of their own: A signs in to the console; B owns a sandbox A must never see."""
    suffix = secrets.token_hex(3)
    with server.client() as admin:
        a, b = _key(admin, f"console-a-{suffix}"), _key(admin, f"console-b-{suffix}")
    with server.client(b) as api_b:
        r = api_b.post("/v1/sandboxes", json={"timeout": 600, "metadata": {"owner": "tenant-b"}})
        assert r.status_code == 201, r.text
        b_sandbox = r.json()["id"]
    yield {"a": a, "b": b, "b_sandbox": b_sandbox}
    with server.client(b) as api_b:
        api_b.delete(f"/v1/sandboxes/{b_sandbox}")
    with server.client(a) as api_a:
        for sb in api_a.get("/v1/sandboxes", params={"limit": 1000}).json()["items"]:
            api_a.delete(f"/v1/sandboxes/{sb['id']}")


@pytest.fixture(scope="module")
def context(browser: Browser, server: Server) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport={"width": 1400, "height": 950}, base_url=server.url)
    yield ctx
    ctx.close()


@pytest.fixture(scope="module")
def page(context: BrowserContext) -> Iterator[Page]:
    p = context.new_page()
    p.errors = []  # type: ignore[attr-defined]
    p.dialogs = []  # type: ignore[attr-defined]
    p.on("pageerror", lambda e: p.errors.append(str(e)))  # type: ignore[attr-defined]

    def on_dialog(d: Any) -> None:
        p.dialogs.append(d.message)  # type: ignore[attr-defined]
        d.accept()

    p.on("dialog", on_dialog)
    yield p
    assert not p.errors, f"errors in the console's pages: {p.errors}"  # type: ignore[attr-defined]


def _shot(page: Page, name: str, full: bool = False) -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(IMAGES / f"console-{name}.png"), full_page=full)


def _session_cookie(context: BrowserContext) -> dict[str, Any]:
    found = [c for c in context.cookies() if c["name"] == "cove_session"]
    assert found, context.cookies()
    return found[0]


def _csrf(page: Page) -> str:
    return page.locator('meta[name="csrf-token"]').get_attribute("content") or ""


def _sign_in(page: Page, key: str) -> None:
    page.goto("/console")
    page.fill("#api_key", key)
    page.click("#sign-in")
    page.wait_for_url("**/console/sandboxes")


# -- sign-in -----------------------------------------------------------------------------------


def test_sign_in_keeps_only_a_session_id_in_an_httponly_strict_cookie(
    page: Page, context: BrowserContext, tenant: dict[str, str]
) -> None:
    page.goto("/console")
    page.wait_for_url("**/console/login")
    _shot(page, "login")
    page.fill("#api_key", "cove_not_a_key")
    page.click("#sign-in")
    expect(page.locator("#login-error")).to_have_text("That is not a valid API key.")
    assert not [c for c in context.cookies() if c["name"] == "cove_session"]

    _sign_in(page, tenant["a"])
    cookie = _session_cookie(context)
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert tenant["a"] not in cookie["value"]
    assert tenant["a"] not in page.url
    assert page.evaluate("() => JSON.stringify(localStorage) + JSON.stringify(sessionStorage)") == "{}{}"
    assert page.evaluate("() => document.cookie") == ""  # HttpOnly: scripts cannot read it


# -- the sandboxes list --------------------------------------------------------------------------


def test_create_a_sandbox_from_the_list(page: Page, server: Server, tenant: dict[str, str]) -> None:
    page.goto("/console/sandboxes")
    expect(page.locator("#empty")).to_be_visible()  # nothing yet: the page says what to do
    page.click("#new")
    page.fill("#create-labels", "made-by=console")
    page.click("#create-submit")
    row = page.locator("#sandboxes tbody tr").filter(has_text="made-by=console")
    expect(row).to_have_count(1, timeout=20_000)
    expect(row.locator(".state")).to_have_text("running")
    with server.client(tenant["a"]) as api:
        items = api.get("/v1/sandboxes", params={"metadata": "made-by=console"}).json()["items"]
    assert len(items) == 1 and items[0]["state"] == "running"
    assert row.get_attribute("data-id") == items[0]["id"]
    expect(row.locator("td.usage")).to_contain_text("%", timeout=15_000)  # CPU and memory now


def test_a_label_holding_html_renders_as_text(page: Page, server: Server, tenant: dict[str, str]) -> None:
    with server.client(tenant["a"]) as api:
        r = api.post("/v1/sandboxes", json={"timeout": 600, "metadata": {"note": XSS}})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
    # The list (rendered by script with textContent) updates without a reload.
    row = page.locator(f'#sandboxes tbody tr[data-id="{sid}"]')
    expect(row).to_have_count(1, timeout=10_000)
    expect(row.locator(".label")).to_have_text(f"note={XSS}")
    assert page.locator("#sandboxes img").count() == 0
    page.fill("#search", "made-by note")
    expect(page.locator("#sandboxes tbody tr")).to_have_count(0)
    page.fill("#search", "")
    _shot(page, "sandboxes")
    # The sandbox's own page (rendered by Jinja2, autoescaped).
    page.goto(f"/console/sandboxes/{sid}")
    expect(page.locator("#labels .label")).to_have_text(f"note={XSS}")
    assert page.locator("main img").count() == 0
    page.wait_for_timeout(300)
    assert not page.dialogs, page.dialogs  # type: ignore[attr-defined]


def test_another_tenants_sandbox_is_not_listed_and_its_page_is_404(
    page: Page, context: BrowserContext, server: Server, tenant: dict[str, str]
) -> None:
    page.goto("/console/sandboxes")
    expect(page.locator("#sandboxes tbody tr").first).to_be_visible()
    page.select_option("#state", "")  # every state
    page.wait_for_timeout(500)
    assert page.locator(f'tr[data-id="{tenant["b_sandbox"]}"]').count() == 0
    assert "tenant-b" not in page.locator("#sandboxes").inner_text()
    response = page.goto(f"/console/sandboxes/{tenant['b_sandbox']}")
    assert response is not None and response.status == 404
    expect(page.locator("h1")).to_have_text("Not found")
    # The API answers the session the same way.
    cookies = {"cove_session": _session_cookie(context)["value"]}
    with httpx.Client(base_url=server.url, cookies=cookies) as c:
        assert c.get(f"/v1/sandboxes/{tenant['b_sandbox']}").status_code == 404
        assert c.get(f"/v1/sandboxes/{tenant['b_sandbox']}/metrics").status_code == 404


# -- one sandbox ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox_id(server: Server, tenant: dict[str, str]) -> str:
    with server.client(tenant["a"]) as api:
        r = api.post("/v1/sandboxes", json={"timeout": 600, "metadata": {"role": "workbench"}})
        assert r.status_code == 201, r.text
        return r.json()["id"]


def _rows(page: Page) -> list[str]:
    return page.evaluate("() => [...document.querySelectorAll('.xterm-rows > div')].map(d => d.textContent)")


def test_the_terminal_runs_echo_hello(page: Page, sandbox_id: str) -> None:
    page.goto(f"/console/sandboxes/{sandbox_id}")
    page.wait_for_function("() => window.coveTerminal && window.coveTerminal.connected", timeout=20_000)
    page.click("#terminal")
    page.keyboard.type("echo hello\n")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.xterm-rows > div')].some(d => d.textContent.trim() === 'hello')",
        timeout=10_000,
    )
    # Keystroke-to-echo round trips: one key at a time, each waited for (reported, not asserted).
    page.keyboard.press("Control+u")
    rtts = []
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789":
        before = page.evaluate("() => window.coveTerminal.rtts.length")
        page.keyboard.type(ch)
        page.wait_for_function(f"() => window.coveTerminal.rtts.length > {before}", timeout=5000)
        rtts.append(page.evaluate("() => window.coveTerminal.rtts.at(-1)"))
    page.keyboard.press("Control+u")
    page.keyboard.type("ls -la\n")
    print(
        f"\nterminal keystroke→echo round trip over {len(rtts)} keys: median {statistics.median(rtts):.1f} ms, "
        f"p90 {sorted(rtts)[int(len(rtts) * 0.9)]:.1f} ms, min {min(rtts):.1f} ms, max {max(rtts):.1f} ms"
    )


def test_the_terminal_follows_the_page_size(page: Page, sandbox_id: str) -> None:
    page.set_viewport_size({"width": 1000, "height": 900})  # narrower: fewer columns
    page.wait_for_timeout(500)
    cols = page.evaluate("() => window.coveTerminal.size[1]")
    page.keyboard.type("stty size\n")
    page.wait_for_function(
        f"() => [...document.querySelectorAll('.xterm-rows > div')].some(d => /^\\d+ {cols}$/.test(d.textContent.trim()))",
        timeout=10_000,
    )
    page.set_viewport_size({"width": 1400, "height": 950})


def test_upload_a_file_and_see_it_in_the_tree(page: Page, sandbox_id: str, tmp_path: Path) -> None:
    local = tmp_path / "notes.txt"
    local.write_text("first draft\n")
    page.set_input_files("#upload", str(local))
    entry = page.locator('#tree li.file[data-path$="/notes.txt"]')
    expect(entry).to_have_count(1, timeout=10_000)
    # Dropped onto the pane, as from a file manager.
    page.evaluate(
        """() => {
            const dt = new DataTransfer();
            dt.items.add(new File(["dropped\\n"], "dropped.txt", { type: "text/plain" }));
            document.getElementById("files").dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true }));
        }"""
    )
    expect(page.locator('#tree li.file[data-path$="/dropped.txt"]')).to_have_count(1, timeout=10_000)


def test_edit_and_save_a_file_then_read_it_through_the_api(
    page: Page, server: Server, sandbox_id: str, tenant: dict[str, str]
) -> None:
    entry = page.locator('#tree li.file[data-path$="/notes.txt"]')
    path = entry.get_attribute("data-path")
    entry.locator(".name").click()
    expect(page.locator("#editor-text")).to_have_value("first draft\n")
    page.fill("#editor-text", "second draft, saved from the console\n")
    page.click("#editor-save")
    with server.client(tenant["a"]) as api:
        deadline = time.monotonic() + 10
        while True:
            body = api.get(f"/v1/sandboxes/{sandbox_id}/files", params={"path": path}).text
            if body == "second draft, saved from the console\n" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert body == "second draft, saved from the console\n"
    _shot(page, "files")


def test_the_usage_chart_shows_points(page: Page, sandbox_id: str) -> None:
    page.wait_for_function("() => window.coveMetrics && window.coveMetrics.points >= 2", timeout=30_000)
    assert page.locator("#chart-cpu canvas").count() == 1
    assert page.locator("#chart-mem canvas").count() == 1
    assert page.locator("#chart-net canvas").count() == 1
    with httpx.Client(
        base_url=page.url.split("/console")[0],
        cookies={"cove_session": _session_cookie(page.context)["value"]},
    ) as c:
        latest = c.get("/v1/sandboxes/metrics").json()["sandboxes"]
    assert set(latest[sandbox_id]) >= {
        "timestamp",
        "cpuUsedPct",
        "cpuCount",
        "memUsed",
        "memTotal",
        "diskUsed",
        "diskTotal",
        "netTxBytes",
        "netRxBytes",
    }
    assert latest[sandbox_id]["memUsed"] > 0
    page.click("#editor-close")
    page.locator("#chart-mem").scroll_into_view_if_needed()
    page.wait_for_timeout(500)  # the charts' last redraw
    _shot(page, "sandbox", full=True)


def test_hibernate_and_resume_show_their_states(
    page: Page, server: Server, sandbox_id: str, tenant: dict[str, str]
) -> None:
    page.click('[data-action="hibernate"]')
    expect(page.locator("#state")).not_to_have_text("hibernating…", timeout=60_000)
    assert page.locator("#action-error").is_hidden(), page.locator("#action-error").text_content()
    expect(page.locator("#state")).to_have_text("hibernated")
    with server.client(tenant["a"]) as api:
        assert api.get(f"/v1/sandboxes/{sandbox_id}").json()["state"] == "hibernated"
    expect(page.locator('[data-action="pause"]')).to_be_disabled()
    _shot(page, "hibernated")
    page.click('[data-action="resume"]')
    expect(page.locator("#state")).to_have_text("running", timeout=60_000)


def test_processes_show_their_output_and_a_port_opens_in_a_new_tab(
    page: Page, context: BrowserContext, server: Server, sandbox_id: str, tenant: dict[str, str]
) -> None:
    with server.client(tenant["a"]) as api:
        r = api.post(
            f"/v1/sandboxes/{sandbox_id}/processes",
            json={"cmd": "echo serving; exec python3 -m http.server 8000 --bind 127.0.0.1", "tag": "web"},
        )
        assert r.status_code == 201, r.text
    row = page.locator("#processes tbody tr").filter(has_text="web")
    expect(row).to_have_count(1, timeout=10_000)
    row.get_by_role("button", name="output").click()
    expect(page.locator("#log-text")).to_contain_text("serving", timeout=10_000)
    page.click("#log-close")
    page.fill("#port", "8000")
    deadline = time.monotonic() + 10
    while True:  # the server may take a moment to listen
        with context.expect_page() as opened:
            page.click("#port-form button[type=submit]")
        tab = opened.value
        tab.wait_for_url(f"http://8000-{sandbox_id}.localhost:*/**")
        tab.wait_for_load_state()
        if "Directory listing" in tab.content() or time.monotonic() > deadline:
            break
        tab.close()
        time.sleep(0.5)
    assert "Directory listing" in tab.content(), tab.content()[:500]
    assert tab.url.startswith(f"http://8000-{sandbox_id}.localhost:")  # the sandbox's own origin
    tab.close()
    row.get_by_role("button", name="kill").click()
    expect(row.locator(".state")).to_have_count(0, timeout=10_000)  # exited


ECHO_HEADERS = """
import http.server as h
class H(h.BaseHTTPRequestHandler):
    def do_GET(self):
        body = str(self.headers).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
h.HTTPServer(("127.0.0.1", 8001), H).serve_forever()
"""


def test_a_sandboxs_port_never_sees_the_session_cookie(
    context: BrowserContext, server: Server, sandbox_id: str, tenant: dict[str, str]
) -> None:
    with server.client(tenant["a"]) as api:
        proc = api.post(
            f"/v1/sandboxes/{sandbox_id}/processes", json={"argv": ["python3", "-c", ECHO_HEADERS]}
        )
        assert proc.status_code == 201, proc.text
        session = _session_cookie(context)["value"]
        deadline = time.monotonic() + 10
        while True:
            r = api.get(
                f"/v1/sandboxes/{sandbox_id}/ports/8001/",
                headers={"Cookie": f"cove_session={session}; theirs=1"},
            )
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        api.delete(f"/v1/sandboxes/{sandbox_id}/processes/{proc.json()['id']}")
    assert r.status_code == 200, r.text
    assert "theirs=1" in r.text and "cove_session" not in r.text and session not in r.text


def test_the_egress_policy_is_changed_from_the_page(
    page: Page, server: Server, sandbox_id: str, tenant: dict[str, str]
) -> None:
    page.locator("#network-edit summary").click()
    page.select_option("#net-mode", "allow")
    page.fill("#net-allow", "pypi.org, *.pythonhosted.org:443")
    page.click("#network-form button[type=submit]")
    expect(page.locator("#network")).to_contain_text("pypi.org, *.pythonhosted.org:443")
    with server.client(tenant["a"]) as api:
        net = api.get(f"/v1/sandboxes/{sandbox_id}/network").json()
    assert net["mode"] == "allow" and net["allow"] == ["pypi.org", "*.pythonhosted.org:443"]


def test_fork_twice_links_both_children(
    page: Page, server: Server, sandbox_id: str, tenant: dict[str, str]
) -> None:
    page.fill("#fork-count", "2")
    page.click('[data-action="fork"]')
    links = page.locator("#action-result a")
    expect(links).to_have_count(2, timeout=60_000)
    expect(page.locator("#state")).to_have_text("running")
    with server.client(tenant["a"]) as api:
        for link in links.all():
            child = (link.text_content() or "").strip()
            assert api.get(f"/v1/sandboxes/{child}").json()["state"] == "running"
    page.wait_for_function("() => window.coveTerminal.connected", timeout=20_000)  # back after the fork


# -- the session's CSRF defence ---------------------------------------------------------------------


def test_a_cross_site_post_without_the_csrf_token_is_refused(
    page: Page, context: BrowserContext, server: Server, sandbox_id: str, tenant: dict[str, str]
) -> None:
    page.goto("/console/sandboxes")
    cookies = {"cove_session": _session_cookie(context)["value"]}
    token = _csrf(page)
    assert token
    with httpx.Client(base_url=server.url, cookies=cookies) as c:
        # What a form on another site would send: the cookie (were the browser to attach it), no token.
        r = c.post(f"/v1/sandboxes/{sandbox_id}/pause", headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_failed"
        assert c.post(f"/v1/sandboxes/{sandbox_id}/pause").status_code == 403
        assert c.delete(f"/v1/sandboxes/{sandbox_id}", headers={"X-CSRF-Token": "wrong"}).status_code == 403
        r = c.post(
            f"/v1/sandboxes/{sandbox_id}/pause",
            headers={"X-CSRF-Token": token, "Origin": "http://evil.example"},
        )
        assert r.status_code == 403  # a stolen token still needs this server's own origin
        assert c.post("/console/logout").status_code == 403
        assert c.get(f"/v1/sandboxes/{sandbox_id}").json()["state"] == "running"  # nothing happened
        # The page's own calls carry the token, and work.
        r = c.post(f"/v1/sandboxes/{sandbox_id}/pause", headers={"X-CSRF-Token": token})
        assert r.status_code == 200 and r.json()["state"] == "paused", r.text
        assert (
            c.post(f"/v1/sandboxes/{sandbox_id}/resume", headers={"X-CSRF-Token": token}).status_code == 200
        )
    # A real cross-site page: the browser withholds the SameSite=Strict cookie, so the form is anonymous.
    other = server.url.replace("127.0.0.1", "localhost")
    evil = context.new_page()
    evil.goto(f"{other}/healthz")
    evil.set_content(
        f'<form method="post" action="{server.url}/v1/sandboxes/{sandbox_id}/pause"></form>'
        "<script>document.forms[0].submit()</script>"
    )
    evil.wait_for_load_state()
    assert '"unauthorized"' in evil.content()
    evil.close()
    with server.client(tenant["a"]) as api:
        assert api.get(f"/v1/sandboxes/{sandbox_id}").json()["state"] == "running"


# -- the other pages -----------------------------------------------------------------------------------


def test_every_page_renders_as_an_admin(
    browser: Browser, server: Server, sandbox_id: str, tenant: dict[str, str]
) -> None:
    ctx = browser.new_context(viewport={"width": 1400, "height": 800}, base_url=server.url)
    p = ctx.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    p.on("dialog", lambda d: d.accept())
    _sign_in(p, server.api_key)
    with server.client(tenant["a"]) as api:  # the admin's tenant sees none of A's objects
        r = api.post(f"/v1/sandboxes/{sandbox_id}/snapshots", json={"name": "from-console-test"})
        assert r.status_code == 201, r.text
    for name in ("snapshots", "templates", "volumes", "pools", "keys", "quota", "audit"):
        p.goto(f"/console/{name}")
        p.wait_for_function("() => document.getElementById('count').textContent !== ''", timeout=10_000)
        _shot(p, name)
    expect(p.locator("#table tbody tr").first).to_be_visible()  # the audit log has entries
    # Quotas: set for a tenant by an admin.
    p.goto("/console/quota")
    p.fill("#quota-form input[name=tenant]", "console-c")
    p.fill("#quota-form input[name=sandboxes]", "3")
    p.click("#quota-form button[type=submit]")
    expect(p.locator("#quota-set")).to_contain_text('"sandboxes":3')
    with server.client() as api:
        assert api.get("/v1/tenants/console-c/quota").json()["quota"]["sandboxes"] == 3
        api.delete("/v1/tenants/console-c/quota")
    # Keys: made on the page (shown once), then revoked.
    p.goto("/console/keys")
    p.fill("#keys-form input[name=name]", "made-in-console")
    p.fill("#keys-form input[name=tenant]", "console-c")
    p.click("#keys-form button[type=submit]")
    new_key = p.locator("#new-key code").text_content() or ""
    assert new_key.startswith("cove_")
    with server.client(new_key) as c:
        assert c.get("/v1/sandboxes").status_code == 200
    row = p.locator("#table tbody tr").filter(has_text="made-in-console")
    row.get_by_role("button", name="revoke").click()
    expect(row).to_have_count(0)
    with server.client(new_key) as c:
        assert c.get("/v1/sandboxes").status_code == 401
    p.click("#sign-out")
    p.wait_for_url("**/console/login")
    ctx.close()
    assert not errors, errors
    # Dark mode follows the system's preference.
    dark = browser.new_context(
        viewport={"width": 1400, "height": 950}, base_url=server.url, color_scheme="dark"
    )
    d = dark.new_page()
    _sign_in(d, tenant["a"])
    d.goto(f"/console/sandboxes/{sandbox_id}")
    d.wait_for_function("() => window.coveTerminal && window.coveTerminal.connected", timeout=20_000)
    background = d.evaluate("() => getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(13, 17, 23)", background
    d.wait_for_timeout(500)
    _shot(d, "dark")
    dark.close()


def test_websocket_with_the_session_needs_its_token_and_this_origin(
    page: Page, context: BrowserContext, server: Server, sandbox_id: str, tenant: dict[str, str]
) -> None:
    from websockets.exceptions import InvalidHandshake, InvalidStatus
    from websockets.sync.client import connect

    page.goto("/console/sandboxes")
    token = _csrf(page)
    with server.client(tenant["a"]) as api:
        proc = api.post(f"/v1/sandboxes/{sandbox_id}/processes", json={"cmd": "cat", "stdin": True}).json()
    url = server.url.replace("http://", "ws://") + f"/v1/sandboxes/{sandbox_id}/processes/{proc['id']}/ws"
    cookie = {"Cookie": f"cove_session={_session_cookie(context)['value']}"}
    origin = server.url

    def refused(target: str, headers: dict[str, str], origin: str) -> bool:
        try:
            with connect(target, additional_headers=headers, origin=origin, open_timeout=10) as ws:
                ws.recv(timeout=5)
        except (InvalidStatus, InvalidHandshake, OSError):
            return True
        except Exception as e:  # closed by the server before or after accepting
            return "4403" in str(e) or "4401" in str(e)
        return False

    assert refused(url, cookie, origin)  # no token
    assert refused(f"{url}?csrf=wrong", cookie, origin)
    assert refused(f"{url}?csrf={token}", cookie, "http://evil.example")  # a token from another site's page
    with connect(f"{url}?csrf={token}", additional_headers=cookie, origin=origin, open_timeout=10) as ws:
        ws.send(b"over the session\n")
        assert b"over the session" in ws.recv(timeout=10)


def test_volumes_and_templates_are_made_from_their_pages(
    page: Page, server: Server, tenant: dict[str, str]
) -> None:
    page.goto("/console/volumes")
    expect(page.locator("#empty")).to_be_visible()
    page.fill("#volumes-form input[name=name]", "console-vol")
    page.click("#volumes-form button[type=submit]")
    row = page.locator("#table tbody tr").filter(has_text="console-vol")
    expect(row).to_have_count(1, timeout=10_000)
    _shot(page, "volumes")
    row.get_by_role("button", name="delete").click()
    expect(row).to_have_count(0, timeout=10_000)

    page.goto("/console/templates")
    name = f"console-tpl-{secrets.token_hex(3)}"
    spec = {"name": name, "from": "base", "steps": [{"type": "run", "cmd": "echo built-by-console"}]}
    page.fill("#templates-form textarea", json.dumps(spec))
    page.click("#templates-form button[type=submit]")
    expect(page.locator("#build-log")).to_contain_text("built-by-console", timeout=60_000)
    expect(page.locator("#build-log")).to_contain_text(f"built {name}", timeout=60_000)
    row = page.locator("#table tbody tr").filter(has_text=name)
    expect(row).to_have_count(1, timeout=10_000)
    _shot(page, "templates")
    row.get_by_role("button", name="new sandbox").click()
    page.wait_for_url("**/console/sandboxes/*")
    expect(page.locator("#f-template")).to_have_text(name)
    page.goto("/console/snapshots")  # the snapshot made above, of tenant A
    row = page.locator("#table tbody tr").filter(has_text="from-console-test")
    expect(row).to_have_count(1, timeout=10_000)
    _shot(page, "snapshots")
    row.get_by_role("button", name="new sandbox").click()
    page.wait_for_url("**/console/sandboxes/*")
    expect(page.locator("#state")).to_have_text("running", timeout=20_000)


def test_sign_out_ends_the_session(page: Page, context: BrowserContext, server: Server) -> None:
    page.goto("/console/sandboxes")
    old = _session_cookie(context)["value"]
    page.click("#sign-out")
    page.wait_for_url("**/console/login")
    assert not [c for c in context.cookies() if c["name"] == "cove_session"]
    with httpx.Client(base_url=server.url, cookies={"cove_session": old}) as c:
        assert c.get("/v1/sandboxes").status_code == 401
    page.goto("/console/sandboxes")
    page.wait_for_url("**/console/login")


def test_the_metrics_api_answers_bad_input_with_4xx(
    server: Server, sandbox_id: str, tenant: dict[str, str]
) -> None:
    with server.client(tenant["a"]) as api:
        for since in ("-1", "abc", "nan"):
            r = api.get(f"/v1/sandboxes/{sandbox_id}/metrics", params={"since": since})
            assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error", (since, r.text)
        assert api.get(f"/v1/sandboxes/{sandbox_id}/metrics", params={"since": "1e400"}).json() == []
        assert api.get("/v1/sandboxes/nosuchsandbox0000/metrics").status_code == 404
        points = api.get(f"/v1/sandboxes/{sandbox_id}/metrics").json()
        assert points and all(a["timestampUnix"] < b["timestampUnix"] for a, b in itertools.pairwise(points))
        later = api.get(f"/v1/sandboxes/{sandbox_id}/metrics", params={"since": points[-1]["timestampUnix"]})
        assert all(p["timestampUnix"] > points[-1]["timestampUnix"] for p in later.json())
    with httpx.Client(base_url=server.url) as anonymous:
        assert anonymous.get(f"/v1/sandboxes/{sandbox_id}/metrics").status_code == 401
        assert anonymous.get("/v1/sandboxes/metrics").status_code == 401


def test_sessions_end_when_idle_too_long_or_when_their_key_is_revoked(tmp_path: Path) -> None:
    """The session store itself (no server): idle expiry, revocation, sign-out, and the stored
    record holds neither the key nor the session id."""
    import asyncio

    from cove.controlplane.auth import KeyCache, Sessions, create_key
    from cove.store.sqlite import SQLiteStore

    async def main() -> None:
        store = SQLiteStore(tmp_path / "cove.db")
        await store.open()
        try:
            keys = KeyCache(store, ttl=0)
            rec, key = await create_key(store, "k", "t", admin=False)
            sessions = Sessions(store, keys, idle=0.5, ttl=0)
            sid, session = await sessions.create(rec.hash)
            assert (await sessions.get(sid)) is not None
            who = await sessions.caller(session)
            assert who is not None and who.tenant == "t"
            stored = await store.list_settings(Sessions.PREFIX)
            assert len(stored) == 1 and sid not in str(stored) and key not in str(stored)
            await asyncio.sleep(0.6)
            assert (await sessions.get(sid)) is None  # idle too long
            assert await store.list_settings(Sessions.PREFIX) == {}
            sid, session = await sessions.create(rec.hash)
            await store.delete_key(rec.id)
            assert (await sessions.caller(session)) is None  # its key was revoked
            await sessions.end(sid)
            assert (await sessions.get(sid)) is None
            assert (await sessions.get("forged")) is None and (await sessions.get(None)) is None
        finally:
            await store.close()

    # In a thread of its own: Playwright's sync API keeps an event loop running in this one.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, main()).result()


def test_a_session_survives_a_server_restart() -> None:
    """Sessions live in the store (like keys): a restarted server, or another replica of a shared
    store, knows them; signing out ends them everywhere."""
    srv = Server("console-restart")
    srv.start()
    try:
        with httpx.Client(base_url=srv.url) as browser:
            assert browser.post("/console/login", data={"api_key": srv.api_key}).status_code == 303
            page = browser.get("/console/sandboxes").text
            assert browser.get("/v1/sandboxes").status_code == 200
            srv.restart()
            assert browser.get("/v1/sandboxes").status_code == 200
            csrf = page.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]
            session_id = browser.cookies["cove_session"]
            assert browser.post("/console/logout", data={"csrf": csrf}).status_code == 303
            assert "cove_session" not in browser.cookies  # the browser forgot it
        with httpx.Client(base_url=srv.url, cookies={"cove_session": session_id}) as stale:
            assert stale.get("/v1/sandboxes").status_code == 401  # and the server too
    finally:
        srv.close()
