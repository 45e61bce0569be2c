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

// -- what each page can do (every action a public route) --------------------------------------------
const admin = page.dataset.admin === "yes";
const enc = encodeURIComponent;
const button = (label, fn, cls = "") => h("button", { class: cls, onclick: async (ev) => {
  ev.target.disabled = true;
  try { await fn(); } catch (e) { toast(e.message, true); } finally { ev.target.disabled = false; }
} }, label);
const confirmed = (text) => confirm(text);

const ACTIONS = {
  snapshots: (r) => [
    button("new sandbox", async () => {
      const sb = await api("POST", "/v1/sandboxes", { json: { snapshot: r.id } });
      location.assign(`/console/sandboxes/${enc(sb.id)}`);
    }),
    button("delete", async () => { if (confirmed(`Delete snapshot ${r.id}?`)) { await api("DELETE", `/v1/snapshots/${enc(r.id)}`); load(); } }, "danger"),
  ],
  templates: (r) => [
    button("new sandbox", async () => {
      const sb = await api("POST", "/v1/sandboxes", { json: { template: r.name } });
      location.assign(`/console/sandboxes/${enc(sb.id)}`);
    }),
    r.name === "base" ? "" : button("delete", async () => { if (confirmed(`Delete template ${r.name}?`)) { await api("DELETE", `/v1/templates/${enc(r.name)}`); load(); } }, "danger"),
  ],
  volumes: (r) => [button("delete", async () => { if (confirmed(`Delete volume ${r.name}?`)) { await api("DELETE", `/v1/volumes/${enc(r.name)}`); load(); } }, "danger")],
  pools: (r) => (admin ? [button("delete", async () => { if (confirmed(`Delete pool ${r.name}?`)) { await api("DELETE", `/v1/pools/${enc(r.name)}`); load(); } }, "danger")] : []),
  keys: (r) => [button("rotate", async () => {
    if (!confirmed(`Rotate key ${r.name} (${r.id})? The old secret stops working at once.`)) return;
    const k = await api("POST", `/v1/keys/${enc(r.id)}/rotate`);
    document.getElementById("extra").append(h("p", { class: "card" }, `New secret of ${r.name}, shown only now: `, h("code", {}, k.key), " ", copyButton(k.key)));
  }), " ", button("revoke", async () => { if (confirmed(`Revoke key ${r.name} (${r.id})? It stops working at once.`)) { await api("DELETE", `/v1/keys/${enc(r.id)}`); load(); } }, "danger")],
};

function field(name, label, attrs = {}) {
  return h("label", {}, label, " ", h("input", { name, ...attrs }));
}

// A small form above the table: fields, a submit that calls the API, the answer shown below it.
function form(fields, submit, onSubmit) {
  const out = h("div", { class: "form-result" });
  const f = h("form", { class: "files-bar card", id: `${name}-form` }, ...fields, h("button", { type: "submit", class: "primary" }, submit));
  f.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const data = Object.fromEntries(new FormData(f));
    out.replaceChildren();
    try { await onSubmit(data, out); load(); } catch (e) { out.replaceChildren(h("p", { class: "error" }, e.message)); }
  });
  return [f, out];
}

const FORMS = {
  volumes: () => form([field("name", "Name", { required: true, pattern: "[a-z0-9][a-z0-9-]*" }), field("size_mb", "Size (MiB)", { type: "number", value: 1024, min: 16 })],
    "Create volume", (d) => api("POST", "/v1/volumes", { json: { name: d.name, size_mb: Number(d.size_mb) } })),
  keys: () => form([field("name", "Name", { required: true }), field("tenant", "Tenant", { value: "default", required: true }),
    h("label", {}, h("input", { type: "checkbox", name: "admin", value: "yes" }), " admin")],
  "Create key", async (d, out) => {
    const k = await api("POST", "/v1/keys", { json: { name: d.name, tenant: d.tenant, admin: d.admin === "yes" } });
    out.replaceChildren(h("p", { class: "card", id: "new-key" }, "The new key, shown only now: ", h("code", {}, k.key), " ", copyButton(k.key)));
  }),
  pools: () => (admin ? form([field("name", "Template or snapshot", { required: true, value: "base" }), field("min", "Min", { type: "number", value: 1, min: 0 }), field("max", "Max", { type: "number", value: 4, min: 0 })],
    "Set pool", (d) => api("PUT", `/v1/pools/${enc(d.name)}`, { json: { min: Number(d.min), max: Number(d.max) } })) : []),
  quota: () => (admin ? form([field("tenant", "Tenant", { required: true, pattern: "[A-Za-z0-9_.-]{1,64}" }),
    field("sandboxes", "Sandboxes", { type: "number", min: 0, placeholder: "no cap" }),
    field("cpu", "CPU (cores)", { type: "number", min: 0, step: "0.5", placeholder: "no cap" }),
    field("memory_mb", "Memory (MiB)", { type: "number", min: 0, placeholder: "no cap" })],
  "Set quota", async (d, out) => {
    const num = (v) => (v === "" || v === undefined ? null : Number(v));
    const q = await api("PUT", `/v1/tenants/${enc(d.tenant)}/quota`, { json: { sandboxes: num(d.sandboxes), cpu: num(d.cpu), memory_mb: num(d.memory_mb) } });
    out.replaceChildren(h("p", { class: "card", id: "quota-set" }, `Tenant ${q.tenant}: ${JSON.stringify(q.quota)}; in use ${JSON.stringify(q.usage)}`));
  }) : []),
  templates: () => {
    const spec = h("textarea", { name: "spec", rows: 6, spellcheck: "false", class: "spec", "aria-label": "build spec" });
    spec.value = JSON.stringify({ name: "hello", from: "base", steps: [{ type: "run", cmd: "echo built > /etc/motd" }] }, null, 2);
    const logEl = h("pre", { class: "log", id: "build-log", hidden: true });
    const [f, out] = form([h("label", { class: "grow" }, "Build (JSON, docs/templates.md)", spec)], "Build", async () => {
      logEl.hidden = false;
      logEl.textContent = "";
      const r = await api("POST", "/v1/templates", { json: JSON.parse(spec.value), raw: true });
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let rest = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        rest += value;
        const lines = rest.split("\n");
        rest = lines.pop();
        for (const line of lines.filter(Boolean)) {
          const ev = JSON.parse(line);
          if (ev.type === "log") logEl.append(ev.data ?? "");
          else if (ev.type === "step") logEl.append(`── ${ev.step === null ? "base" : `step ${ev.step + 1}/${ev.total}`}: ${ev.description}${ev.cached ? " (cached)" : ""}\n`);
          else if (ev.type === "step_done") logEl.append(`── ${ev.step === null ? "base" : `step ${ev.step + 1}`} done${ev.cached ? " (cached)" : ` in ${Number(ev.seconds ?? 0).toFixed(1)} s`}\n`);
          else if (ev.type === "done") logEl.append(`── built ${typeof ev.template === "object" ? ev.template?.name : ev.template}\n`);
          else if (ev.type === "error") logEl.append(`── failed: ${ev.message}\n${ev.output ?? ""}\n`);
          logEl.scrollTop = logEl.scrollHeight;
        }
      }
    });
    return [f, logEl, out];
  },
};

function rowsOf(data) {
  if (name === "quota") {
    return ["sandboxes", "cpu", "memory_mb"].map((dim) => ({ dim, used: data.usage?.[dim] ?? 0, limit: data.quota?.[dim] }));
  }
  return data.items ?? [];
}

function render(rows) {
  const cols = COLUMNS[name];
  const actions = ACTIONS[name];
  thead.replaceChildren(h("tr", {}, cols.map(([label]) => h("th", {}, label)), actions ? h("th", {}, "") : ""));
  const q = search.value.trim().toLowerCase();
  const shown = rows.filter((r) => !q || JSON.stringify(r).toLowerCase().includes(q));
  tbody.replaceChildren(...shown.map((r) => h("tr", {}, cols.map(([, f]) => h("td", {}, f(r))), actions ? h("td", { class: "row-actions" }, actions(r)) : "")));
  document.getElementById("count").textContent = `${shown.length}`;
  empty.hidden = rows.length > 0 || !EMPTY[name];
  empty.replaceChildren(h("p", {}, EMPTY[name]));
}

let rows = [];
if (FORMS[name]) document.getElementById("extra").replaceChildren(...FORMS[name]().flat());
async function load() {
  try {
    const data = await api("GET", route);
    if (name === "quota") {
      document.getElementById("quota-tenant")?.remove();
      document.getElementById("extra").prepend(h("p", { id: "quota-tenant" }, "Tenant ", h("b", {}, data.tenant), data.quota ? "" : ": no quota set (no caps)."));
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
