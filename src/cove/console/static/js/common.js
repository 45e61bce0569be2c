// The console's small shared kit: calls to cove's public API with the session cookie (and the
// session's CSRF token on every state-changing call), and DOM helpers that only ever set text.

export const CSRF = document.querySelector('meta[name="csrf-token"]')?.content ?? "";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// fetch() one /v1 route. `json`: a body to send as JSON; `body`: raw bytes (a File, a string).
// Answers the parsed JSON (or null for 204), the Response itself when `raw` is set.
export async function api(method, path, { json, body, query, raw = false, signal } = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(query ?? {})) {
    for (const item of Array.isArray(v) ? v : [v]) if (item !== undefined && item !== "") url.searchParams.append(k, item);
  }
  const headers = {};
  if (!["GET", "HEAD"].includes(method)) headers["X-CSRF-Token"] = CSRF;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  const r = await fetch(url, { method, headers, body, credentials: "same-origin", signal });
  if (r.status === 401) {
    location.href = "/console/login";
    throw new ApiError(401, "unauthorized", "signed out");
  }
  if (!r.ok) {
    let code = "error", message = `${r.status} ${r.statusText}`;
    try {
      const e = (await r.json()).error;
      code = e.code; message = e.message;
    } catch { /* not JSON */ }
    throw new ApiError(r.status, code, message);
  }
  if (raw) return r;
  if (r.status === 204) return null;
  const type = r.headers.get("content-type") ?? "";
  return type.includes("json") ? r.json() : r.text();
}

// h("td", {class: "x", title: t}, "text", child…): an element whose strings are text nodes, never HTML.
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "checked" || k === "disabled" || k === "value") el[k] = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function toast(message, error = false) {
  const t = document.getElementById("toast");
  if (!t) return;
  t.textContent = message;
  t.className = error ? "show error" : "show";
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (t.className = ""), error ? 6000 : 2500);
}

export function copyButton(text) {
  return h("button", { class: "copy", "data-copy": text, title: "copy" }, "copy");
}

// Every [data-copy] button copies its text (one listener for the whole page).
document.addEventListener("click", async (ev) => {
  const b = ev.target.closest?.("[data-copy]");
  if (!b) return;
  ev.preventDefault();
  try {
    await navigator.clipboard.writeText(b.dataset.copy);
    toast(`copied ${b.dataset.copy}`);
  } catch {
    toast("the browser refused the clipboard", true);
  }
});

export function age(iso, now = Date.now()) {
  if (!iso) return "";
  const s = Math.max(0, Math.round((now - Date.parse(iso)) / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d`;
}

export function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

// "/" focuses the search box (where there is one); Escape leaves it.
document.addEventListener("keydown", (ev) => {
  if (ev.target.closest?.("input, textarea, select, .xterm")) {
    if (ev.key === "Escape") ev.target.blur?.();
    return;
  }
  if (ev.key === "/" && document.getElementById("search")) {
    ev.preventDefault();
    document.getElementById("search").focus();
  }
});

// Relative times in server-rendered pages (<time class="age" datetime=…>), kept current.
function ages() {
  for (const t of document.querySelectorAll("time.age")) {
    t.title = t.getAttribute("datetime");
    t.textContent = `${age(t.getAttribute("datetime"))} ago`;
  }
}
ages();
setInterval(ages, 10000);
