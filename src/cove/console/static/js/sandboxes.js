// The sandboxes page: the caller's sandboxes from GET /v1/sandboxes, refreshed every 2 s (rows are
// updated in place, so selections survive), filtered by state, label and a search; create from a
// template or snapshot (POST /v1/sandboxes), kill the selected ones (DELETE /v1/sandboxes/{id}).
import { api, age, bytes, copyButton, h, toast } from "./common.js";

const LIVE = ["starting", "running", "paused", "hibernated"];
const POLL_MS = 2000;
const tbody = document.querySelector("#sandboxes tbody");
const search = document.getElementById("search");
const stateSel = document.getElementById("state");
const labelIn = document.getElementById("label");
const killBtn = document.getElementById("kill-selected");
const selectAll = document.getElementById("select-all");
const rows = new Map(); // id -> {tr, key, sb}
const selected = new Set();
let items = [];
let usage = {}; // id -> the newest point of GET /v1/sandboxes/metrics
let timer = null;

function states() {
  const v = stateSel.value;
  return v === "live" ? LIVE : v ? [v] : [];
}

function labelQuery() {
  return labelIn.value.split(",").map((s) => s.trim()).filter((s) => s.includes("="));
}

async function fetchAll() {
  const out = [];
  let cursor;
  do {
    const page = await api("GET", "/v1/sandboxes", {
      query: { state: states(), metadata: labelQuery(), limit: 1000, cursor },
    });
    out.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor && out.length < 10000);
  return out;
}

function matches(sb, q) {
  if (!q) return true;
  const hay = [sb.id, sb.template, sb.state, sb.runtime, sb.node,
    ...Object.entries(sb.metadata).map(([k, v]) => `${k}=${v}`)].join(" ").toLowerCase();
  return q.toLowerCase().split(/\s+/).every((w) => hay.includes(w));
}

function row(sb) {
  const check = h("input", { type: "checkbox", "aria-label": `select ${sb.id}`, checked: selected.has(sb.id),
    onchange: (ev) => { ev.target.checked ? selected.add(sb.id) : selected.delete(sb.id); syncSelection(); } });
  const labels = Object.entries(sb.metadata).map(([k, v]) => h("span", { class: "label" }, `${k}=${v}`));
  const l = sb.limits;
  return h("tr", { dataset: { id: sb.id, state: sb.state } },
    h("td", {}, check),
    h("td", { class: "id" }, h("a", { href: `/console/sandboxes/${encodeURIComponent(sb.id)}` }, sb.id), " ", copyButton(sb.id)),
    h("td", {}, h("span", { class: `state state-${sb.state}` }, sb.state)),
    h("td", {}, sb.template),
    h("td", {}, sb.runtime),
    h("td", {}, sb.node || "local"),
    h("td", { class: "labels" }, labels),
    h("td", { class: "age", title: sb.created_at, dataset: { created: sb.created_at } }, age(sb.created_at)),
    h("td", { class: "muted" }, `${l.cpu ? `${l.cpu} cpu` : "any cpu"} · ${l.memory_mb} MiB`),
    h("td", { class: "usage" }),
  );
}

function showUsage(tr, id) {
  const p = usage[id];
  const text = p ? `${p.cpuUsedPct.toFixed(1)}% · ${bytes(p.memUsed)}` : "";
  const td = tr.querySelector("td.usage");
  if (td.textContent !== text) {
    td.textContent = text;
    td.title = p ? `at ${p.timestamp}: ${p.cpuUsedPct}% of ${p.cpuCount} CPUs, ${bytes(p.memUsed)} of ${bytes(p.memTotal)}` : "";
  }
}

function render() {
  const q = search.value.trim();
  const shown = items.filter((sb) => matches(sb, q));
  const seen = new Set();
  let prev = null;
  for (const sb of shown) {
    seen.add(sb.id);
    const key = JSON.stringify(sb);
    let r = rows.get(sb.id);
    if (!r || r.key !== key) {
      const tr = row(sb);
      if (r) r.tr.replaceWith(tr);
      r = { tr, key, sb };
      rows.set(sb.id, r);
    } else {
      const td = r.tr.querySelector("td.age");
      td.textContent = age(sb.created_at);
    }
    showUsage(r.tr, sb.id);
    const want = prev ? prev.nextSibling : tbody.firstChild;
    if (want !== r.tr) tbody.insertBefore(r.tr, want);
    prev = r.tr;
  }
  for (const [id, r] of rows) if (!seen.has(id)) { r.tr.remove(); rows.delete(id); }
  for (const id of [...selected]) if (!seen.has(id)) selected.delete(id);
  document.getElementById("count").textContent = shown.length === items.length ? `${items.length}` : `${shown.length} of ${items.length}`;
  document.getElementById("empty").hidden = items.length > 0;
  syncSelection();
}

function syncSelection() {
  killBtn.disabled = selected.size === 0;
  killBtn.textContent = selected.size ? `Kill selected (${selected.size})` : "Kill selected";
  selectAll.checked = selected.size > 0 && selected.size === rows.size;
}

async function refresh() {
  clearTimeout(timer);
  try {
    const t0 = performance.now();
    const [all, now] = await Promise.all([fetchAll(), api("GET", "/v1/sandboxes/metrics")]);
    usage = now.sandboxes;
    items = all.sort((a, b) => (a.created_at < b.created_at ? 1 : -1)); // newest first
    render();
    document.getElementById("updated").textContent =
      `updated ${new Date().toLocaleTimeString()} (${Math.round(performance.now() - t0)} ms) · refreshes every ${POLL_MS / 1000} s`;
  } catch (e) {
    toast(e.message, true);
  } finally {
    timer = setTimeout(refresh, document.hidden ? POLL_MS * 5 : POLL_MS);
  }
}

selectAll.addEventListener("change", () => {
  for (const id of rows.keys()) selectAll.checked ? selected.add(id) : selected.delete(id);
  for (const r of rows.values()) r.tr.querySelector("input[type=checkbox]").checked = selectAll.checked;
  syncSelection();
});

killBtn.addEventListener("click", async () => {
  const ids = [...selected];
  if (!ids.length || !confirm(`Kill ${ids.length} sandbox${ids.length > 1 ? "es" : ""}?`)) return;
  killBtn.disabled = true;
  const results = await Promise.allSettled(ids.map((id) => api("DELETE", `/v1/sandboxes/${encodeURIComponent(id)}`)));
  const failed = results.filter((r) => r.status === "rejected");
  selected.clear();
  toast(failed.length ? `${failed.length} could not be killed: ${failed[0].reason.message}` : `killed ${ids.length}`, failed.length > 0);
  refresh();
});

search.addEventListener("input", render);
stateSel.addEventListener("change", refresh);
labelIn.addEventListener("change", refresh);

// -- create -----------------------------------------------------------------------------------
const dialog = document.getElementById("create-dialog");
const form = document.getElementById("create-form");
const sourceSel = document.getElementById("create-source");
const createError = document.getElementById("create-error");

function parseLabels(text) {
  const out = {};
  for (const part of text.split(",").map((s) => s.trim()).filter(Boolean)) {
    const i = part.indexOf("=");
    if (i < 1) throw new Error(`label ${JSON.stringify(part)}: expected key=value`);
    out[part.slice(0, i).trim()] = part.slice(i + 1).trim();
  }
  return out;
}

function createBody() {
  const f = new FormData(form);
  const [kind, name] = String(f.get("source") || "template:base").split(/:(.*)/s);
  const body = { [kind]: name, metadata: parseLabels(String(f.get("labels") || "")), timeout: Number(f.get("timeout") || 0) };
  if (f.get("cpu")) body.cpu = Number(f.get("cpu"));
  if (f.get("memory_mb")) body.memory_mb = Number(f.get("memory_mb"));
  return body;
}

function updateSnippet() {
  let text;
  try {
    const b = createBody();
    const args = Object.entries(b).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(", ");
    text = `from cove import Sandbox\nsb = Sandbox.create(${args})`;
  } catch (e) { text = e.message; }
  document.getElementById("create-snippet").textContent = text;
}

async function openCreate() {
  sourceSel.replaceChildren(h("option", { value: "template:base" }, "template base"));
  dialog.showModal();
  createError.hidden = true;
  updateSnippet();
  try {
    const [tpls, snaps] = await Promise.all([api("GET", "/v1/templates"), api("GET", "/v1/snapshots")]);
    for (const t of tpls.items ?? []) if (t.name !== "base") sourceSel.append(h("option", { value: `template:${t.name}` }, `template ${t.name}`));
    for (const s of snaps.items ?? []) sourceSel.append(h("option", { value: `snapshot:${s.id}` }, `snapshot ${s.name || s.id} (${s.id})`));
  } catch (e) { toast(e.message, true); }
}

document.getElementById("new").addEventListener("click", openCreate);
document.getElementById("create-cancel").addEventListener("click", () => dialog.close());
form.addEventListener("input", updateSnippet);
form.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const submit = document.getElementById("create-submit");
  submit.disabled = true;
  submit.textContent = "Creating…";
  try {
    const sb = await api("POST", "/v1/sandboxes", { json: createBody() });
    dialog.close();
    toast(`created ${sb.id}`);
    await refresh();
  } catch (e) {
    createError.textContent = e.message;
    createError.hidden = false;
  } finally {
    submit.disabled = false;
    submit.textContent = "Create";
  }
});

document.addEventListener("keydown", (ev) => {
  if (ev.target.closest?.("input, textarea, select, dialog")) return;
  if (ev.key === "c") { ev.preventDefault(); openCreate(); }
});

refresh();
