// The simple pages: one public list route each, shown as a table (text only), with a search box.
import { age, api, bytes, copyButton, h, toast } from "./common.js";

const page = document.getElementById("table-page");
const name = page.dataset.name;
const route = page.dataset.api;
const thead = document.querySelector("#table thead");
const tbody = document.querySelector("#table tbody");
const empty = document.getElementById("empty");
const search = document.getElementById("search");

const id = (v) => (v ? [h("code", {}, v), " ", copyButton(v)] : "");
const when = (v) => (v ? h("span", { title: v }, `${age(typeof v === "number" ? new Date(v * 1000).toISOString() : v)} ago`) : "");
const list = (v) => (Array.isArray(v) ? v.map((x) => (typeof x === "object" ? JSON.stringify(x) : x)).join(", ") : "");

// Per page: its columns [header, value of a row], and what to say when it is empty.
const COLUMNS = {
  snapshots: [["id", (r) => id(r.id)], ["name", (r) => r.name], ["sandbox", (r) => r.sandbox_id ? h("a", { href: `/console/sandboxes/${encodeURIComponent(r.sandbox_id)}` }, r.sandbox_id) : ""],
    ["layers", (r) => (r.layers ?? []).length], ["memory", (r) => (r.memory ? "yes" : "no")], ["created", (r) => when(r.created_at)]],
  templates: [["name", (r) => id(r.name)], ["layers", (r) => (r.layers ?? []).length], ["tags", (r) => list(r.tags)], ["user", (r) => r.user],
    ["workdir", (r) => r.workdir], ["created", (r) => when(r.created_at)]],
  volumes: [["name", (r) => id(r.name)], ["size", (r) => bytes((r.size_mb ?? 0) * 1048576)], ["used by", (r) => list(r.sandboxes)], ["created", (r) => when(r.created_at)]],
  pools: [["name", (r) => id(r.name)], ["source", (r) => r.source], ["min", (r) => r.min], ["max", (r) => r.max], ["target", (r) => r.target],
    ["ready", (r) => r.ready], ["starting", (r) => r.starting], ["hits", (r) => r.hits], ["misses", (r) => r.misses], ["error", (r) => r.error ?? ""]],
  keys: [["id", (r) => id(r.id)], ["name", (r) => r.name], ["tenant", (r) => r.tenant], ["admin", (r) => (r.admin ? "yes" : "")], ["created", (r) => when(r.created_at)]],
  quota: [["dimension", (r) => r.dim], ["used", (r) => r.used], ["limit", (r) => r.limit ?? "no cap"]],
  audit: [["time", (r) => when(r.time)], ["action", (r) => r.action], ["object", (r) => r.object ?? ""], ["sandbox", (r) => r.sandbox ?? ""],
    ["outcome", (r) => r.outcome], ["key", (r) => r.key_id ?? ""], ["tenant", (r) => r.tenant]],
};
const EMPTY = {
  snapshots: "No snapshots yet. Open a sandbox and press Snapshot, or call sb.snapshot() from the SDK.",
  templates: "Only the base template. Build one with `cove template build` (docs/templates.md).",
  volumes: "No volumes yet. Create one with `cove volume create NAME` and mount it with volumes=[…] at create.",
  pools: "No warm pools. An admin sets one with PUT /v1/pools/{template} {min, max} (docs/pools.md).",
  keys: "No keys.",
  quota: "",
  audit: "Nothing recorded yet: lifecycle actions (create, kill, snapshot…) appear here.",
};

function rowsOf(data) {
  if (name === "quota") {
    return ["sandboxes", "cpu", "memory_mb"].map((dim) => ({ dim, used: data.usage?.[dim] ?? 0, limit: data.quota?.[dim] }));
  }
  return data.items ?? [];
}

function render(rows) {
  const cols = COLUMNS[name];
  thead.replaceChildren(h("tr", {}, cols.map(([label]) => h("th", {}, label))));
  const q = search.value.trim().toLowerCase();
  const shown = rows.filter((r) => !q || JSON.stringify(r).toLowerCase().includes(q));
  tbody.replaceChildren(...shown.map((r) => h("tr", {}, cols.map(([, f]) => h("td", {}, f(r))))));
  document.getElementById("count").textContent = `${shown.length}`;
  empty.hidden = rows.length > 0 || !EMPTY[name];
  empty.replaceChildren(h("p", {}, EMPTY[name]));
}

let rows = [];
async function load() {
  try {
    const data = await api("GET", route);
    if (name === "quota") {
      document.getElementById("extra").replaceChildren(h("p", {}, "Tenant ", h("b", {}, data.tenant), data.quota ? "" : ": no quota set (no caps)."));
    }
    rows = rowsOf(data);
    render(rows);
  } catch (e) {
    toast(e.message, true);
    empty.hidden = false;
    empty.replaceChildren(h("p", { class: "error" }, e.message));
  }
}
search.addEventListener("input", () => render(rows));
load();
setInterval(() => { if (!document.hidden) load(); }, 5000);
