// One sandbox: its state and lifecycle buttons, a terminal (xterm.js over the process WebSocket of
// /v1/sandboxes/{id}/processes), a file browser (/v1/sandboxes/{id}/files…) and usage charts (uPlot
// over GET /v1/sandboxes/{id}/metrics). Every call is a public /v1 route.
import { Terminal } from "../vendor/xterm/xterm.mjs";
import { FitAddon } from "../vendor/addon-fit/addon-fit.mjs";
import uPlot from "../vendor/uplot/uPlot.esm.js";
import { ApiError, CSRF, api, bytes, h, toast } from "./common.js";

const root = document.getElementById("sandbox");
let sb = JSON.parse(root.dataset.sandbox);
const ID = sb.id;
const base = `/v1/sandboxes/${encodeURIComponent(ID)}`;
const stateEl = document.getElementById("state");
const actionError = document.getElementById("action-error");
let busy = null; // the action in flight ("pausing", …)

// -- state and actions ----------------------------------------------------------------------
const ENABLED = {
  running: ["pause", "hibernate", "snapshot", "fork", "kill"],
  paused: ["resume", "hibernate", "snapshot", "fork", "kill"],
  hibernated: ["resume", "kill"],
  starting: ["kill"],
};
const DOING = { pause: "pausing", resume: "resuming", hibernate: "hibernating", snapshot: "snapshotting", fork: "forking", kill: "killing" };

function showState() {
  const s = busy ?? sb.state;
  stateEl.textContent = s;
  stateEl.className = `state state-${busy ? "busy" : sb.state}`;
  const ok = ENABLED[sb.state] ?? [];
  for (const b of document.querySelectorAll("#actions [data-action]")) b.disabled = busy !== null || !ok.includes(b.dataset.action);
}

function result(...parts) {
  const el = document.getElementById("action-result");
  el.replaceChildren(...parts);
  el.hidden = false;
}

async function act(action) {
  actionError.hidden = true;
  busy = `${DOING[action]}…`;
  showState();
  const checkpoint = ["hibernate", "snapshot", "fork"].includes(action);
  try {
    if (checkpoint) { processes.stop(); await terminal.detach(); }
    if (action === "kill") {
      if (!confirm(`Kill ${ID}? Its processes and files go.`)) return;
      await api("DELETE", base);
      sb = await api("GET", base);
    } else if (action === "snapshot") {
      const snap = await api("POST", `${base}/snapshots`, { json: {} });
      result("Snapshot ", h("code", {}, snap.id), " made: start sandboxes from it on the ", h("a", { href: "/console/snapshots" }, "snapshots page"), ".");
      sb = await api("GET", base);
    } else if (action === "fork") {
      const count = Number(document.getElementById("fork-count").value || 1);
      const forked = await api("POST", `${base}/fork`, { json: { count } });
      result("Forked: ", ...forked.items.flatMap((c, i) => [i ? ", " : "", h("a", { href: `/console/sandboxes/${encodeURIComponent(c.id)}` }, c.id)]),
        forked.memory ? " (processes carried over)" : " (files only)");
      sb = await api("GET", base);
    } else {
      sb = await api("POST", `${base}/${action}`);
    }
  } catch (e) {
    actionError.textContent = `${action}: ${e.message}`;
    actionError.hidden = false;
  } finally {
    busy = null;
    showState();
    stateChanged();
    if (checkpoint && sb.state === "running") terminal.connect();
  }
}

for (const b of document.querySelectorAll("#actions [data-action]")) b.addEventListener("click", () => act(b.dataset.action));

let lastState = sb.state;
function stateChanged() {
  if (sb.state === lastState) return;
  lastState = sb.state;
  if (sb.state === "running") { terminal.connect(); files.load(); }
  else terminal.status(`the sandbox is ${sb.state}`);
}

async function pollState() {
  try {
    if (!busy) {
      sb = await api("GET", base);
      showState();
      showNetwork();
      stateChanged();
    }
  } catch (e) { if (e.status === 404) { stateEl.textContent = "gone"; return; } }
  setTimeout(pollState, document.hidden ? 10000 : 2000);
}

// -- terminal ---------------------------------------------------------------------------------
const terminal = (() => {
  const el = document.getElementById("terminal");
  const statusEl = document.getElementById("term-status");
  const dark = matchMedia("(prefers-color-scheme: dark)").matches;
  const term = new Terminal({
    cursorBlink: true, fontSize: 13, scrollback: 5000, convertEol: false,
    fontFamily: "ui-monospace, SFMono-Regular, Menlo, Consolas, monospace",
    theme: dark ? { background: "#0d1117", foreground: "#e6edf3" } : { background: "#ffffff", foreground: "#1f2328", cursor: "#1f2328", selectionBackground: "#b6d7ff" },
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(el);
  fit.fit();
  const enc = new TextEncoder();
  // Keystroke-to-echo round trips (ms), for the browser test and anyone curious (window.coveTerminal).
  const stats = { rtts: [], connected: false, process: null, size: [term.rows, term.cols] };
  window.coveTerminal = stats;
  let ws = null, pid = null, offset = 0, sentAt = null, connecting = false;

  const status = (text) => { statusEl.textContent = text; };

  async function shell() {
    const procs = await api("GET", `${base}/processes`);
    const mine = procs.items.find((p) => p.tag === "console" && p.running && p.pty);
    if (mine) return mine.id;
    offset = 0;
    const p = await api("POST", `${base}/processes`, {
      json: { cmd: "bash -l", pty: { rows: term.rows, cols: term.cols }, tag: "console", env: { TERM: "xterm-256color" } },
    });
    return p.id;
  }

  async function connect() {
    if (connecting || (ws && ws.readyState <= 1) || sb.state !== "running") return;
    connecting = true;
    try {
      const id = await shell();
      if (id !== pid) { pid = id; offset = 0; term.reset(); }
      stats.process = pid;
      const proto = location.protocol === "https:" ? "wss" : "ws";
      const q = new URLSearchParams({ offset: String(offset), csrf: CSRF });
      ws = new WebSocket(`${proto}://${location.host}${base}/processes/${pid}/ws?${q}`);
      ws.binaryType = "arraybuffer";
      ws.onopen = () => {
        stats.connected = true;
        status("connected");
        ws.send(JSON.stringify({ resize: [term.rows, term.cols] }));
        term.focus();
      };
      ws.onmessage = (ev) => {
        if (typeof ev.data === "string") {
          const msg = JSON.parse(ev.data);
          if ("exit_code" in msg) { status(`exited (${msg.exit_code}); press Enter for a new shell`); pid = null; }
          return;
        }
        if (sentAt !== null) { stats.rtts.push(performance.now() - sentAt); sentAt = null; }
        const data = new Uint8Array(ev.data);
        offset += data.length;
        term.write(data);
      };
      ws.onclose = () => {
        stats.connected = false;
        ws = null;
        if (!pid) return;
        // Reconnect only to a sandbox that still runs: a call for its processes would resume a
        // sandbox that was paused or hibernated meanwhile (auto_resume).
        setTimeout(async () => {
          if (busy) return;
          try { sb = await api("GET", base); } catch { return; }
          showState();
          if (sb.state === "running" && lastState === "running") { status("reconnecting…"); connect(); }
          else stateChanged();
        }, 1000);
      };
    } catch (e) {
      status(e.message);
    } finally {
      connecting = false;
    }
  }

  // Close the connection and wait until it is closed. A checkpoint (hibernate, fork, snapshot) must
  // not find a reader attached to the shell: CRIU refuses to dump a socket whose peer is outside.
  async function detach() {
    const open = ws;
    if (!open) return;
    ws = null;
    open.onclose = null;
    stats.connected = false;
    await new Promise((resolve) => {
      open.addEventListener("close", resolve, { once: true });
      open.close();
      setTimeout(resolve, 2000);
    });
    await new Promise((resolve) => setTimeout(resolve, 150)); // the server lets go of the guest
    status("detached");
  }

  term.onData((data) => {
    if (ws && ws.readyState === 1) {
      sentAt = performance.now();
      ws.send(enc.encode(data));
    } else if (!pid && sb.state === "running") {
      connect();
    }
  });
  term.onResize(({ rows, cols }) => { stats.size = [rows, cols]; if (ws && ws.readyState === 1) ws.send(JSON.stringify({ resize: [rows, cols] })); });
  new ResizeObserver(() => { try { fit.fit(); } catch { /* hidden */ } }).observe(el);
  return { connect, detach, status, term };
})();

// -- files --------------------------------------------------------------------------------------
const files = (() => {
  const tree = document.getElementById("tree");
  const pathEl = document.getElementById("files-path");
  const editor = document.getElementById("editor");
  const text = document.getElementById("editor-text");
  const editorPath = document.getElementById("editor-path");
  const download = document.getElementById("editor-download");
  let cwd = sb.workdir || "/";
  let open = null;
  const MAX_EDIT = 1 << 20;

  const join = (dir, name) => (dir.endsWith("/") ? dir : `${dir}/`) + name;
  const fileUrl = (path) => `${base}/files?${new URLSearchParams({ path })}`;

  async function list(path) {
    return (await api("GET", `${base}/files/list`, { query: { path, depth: 1 } })).entries
      .sort((a, b) => (a.type === "dir") === (b.type === "dir") ? a.name.localeCompare(b.name) : a.type === "dir" ? -1 : 1);
  }

  function item(entry) {
    const li = h("li", { class: `entry ${entry.type}`, dataset: { path: entry.path, type: entry.type } });
    const name = h("button", { class: "name link", title: entry.path }, entry.type === "dir" ? `▸ ${entry.name}/` : entry.name);
    const meta = h("span", { class: "muted small" }, entry.type === "dir" ? "" : bytes(entry.size));
    li.append(name, " ", meta);
    if (entry.type === "dir") {
      let children = null;
      name.addEventListener("click", async () => {
        if (children) { children.remove(); children = null; name.textContent = `▸ ${entry.name}/`; return; }
        children = h("ul", { class: "tree" });
        li.append(children);
        name.textContent = `▾ ${entry.name}/`;
        try { children.append(...(await list(entry.path)).map(item)); } catch (e) { children.append(h("li", { class: "error" }, e.message)); }
      });
      name.addEventListener("dblclick", () => load(entry.path));
    } else {
      name.addEventListener("click", () => edit(entry));
    }
    return li;
  }

  async function load(path = cwd) {
    cwd = path;
    pathEl.textContent = cwd;
    if (!["running", "paused"].includes(sb.state)) {
      tree.replaceChildren(h("li", { class: "muted" }, `the sandbox is ${sb.state}: resume it to browse its files`));
      return;
    }
    try {
      const entries = await list(cwd);
      tree.replaceChildren(...(entries.length ? entries.map(item) : [h("li", { class: "muted" }, "empty: drop files here to upload")]));
    } catch (e) {
      tree.replaceChildren(h("li", { class: "error" }, e.message));
    }
  }

  async function edit(entry) {
    open = entry.path;
    editorPath.textContent = entry.path;
    download.href = fileUrl(entry.path);
    download.setAttribute("download", entry.name);
    editor.hidden = false;
    if (entry.size > MAX_EDIT) {
      text.value = `(${bytes(entry.size)}: too large to edit here; download it)`;
      text.readOnly = true;
      return;
    }
    const r = await api("GET", `${base}/files`, { query: { path: entry.path }, raw: true });
    const buf = new Uint8Array(await r.arrayBuffer());
    const binary = buf.subarray(0, 8000).includes(0);
    text.readOnly = binary;
    text.value = binary ? "(binary file: download it)" : new TextDecoder().decode(buf);
    text.focus();
  }

  async function save() {
    if (!open || text.readOnly) return;
    try {
      await api("PUT", `${base}/files`, { query: { path: open }, body: text.value });
      toast(`saved ${open}`);
      load();
    } catch (e) { toast(`save: ${e.message}`, true); }
  }

  async function upload(fileList) {
    for (const f of fileList) {
      try {
        await api("PUT", `${base}/files`, { query: { path: join(cwd, f.name) }, body: f });
        toast(`uploaded ${f.name}`);
      } catch (e) { toast(`${f.name}: ${e.message}`, true); }
    }
    load();
  }

  document.getElementById("editor-save").addEventListener("click", save);
  document.getElementById("editor-close").addEventListener("click", () => { editor.hidden = true; open = null; });
  text.addEventListener("keydown", (ev) => { if ((ev.ctrlKey || ev.metaKey) && ev.key === "s") { ev.preventDefault(); save(); } });
  document.getElementById("files-up").addEventListener("click", () => load(cwd.replace(/\/[^/]+\/?$/, "") || "/"));
  document.getElementById("files-refresh").addEventListener("click", () => load());
  document.getElementById("upload").addEventListener("change", (ev) => upload(ev.target.files));
  const drop = document.getElementById("files");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("drop"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("drop"));
  drop.addEventListener("drop", (ev) => { ev.preventDefault(); drop.classList.remove("drop"); upload(ev.dataTransfer.files); });
  return { load };
})();

// -- processes and their output ---------------------------------------------------------------------
const processes = (() => {
  const tbody = document.querySelector("#processes tbody");
  const emptyEl = document.getElementById("processes-empty");
  const log = document.getElementById("log");
  const logText = document.getElementById("log-text");
  let reading = null; // the AbortController of the output being followed

  async function follow(p) {
    reading?.abort();
    reading = new AbortController();
    log.hidden = false;
    document.getElementById("log-title").textContent = `${p.id} · ${p.cmd ?? (p.argv ?? []).join(" ")}`;
    logText.textContent = "";
    try {
      const r = await api("GET", `${base}/processes/${p.id}/output`, { query: { offset: 0 }, raw: true, signal: reading.signal });
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let rest = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        rest += value;
        const lines = rest.split("\n");
        rest = lines.pop();
        for (const line of lines) {
          if (!line) continue;
          const ev = JSON.parse(line);
          if (ev.type === "stdout" || ev.type === "stderr") logText.append(ev.data);
          else if (ev.type === "exit") logText.append(`\n[exited with ${ev.exit_code}]\n`);
          else if (ev.type === "truncated") logText.append("\n[older output dropped]\n");
        }
        logText.scrollTop = logText.scrollHeight;
      }
    } catch (e) { if (e.name !== "AbortError") logText.append(`\n[${e.message}]`); }
  }

  async function load(fresh = false) {
    // Asking for a paused sandbox's processes would resume it: look at its state first.
    if (fresh) { try { sb = await api("GET", base); showState(); } catch { return; } }
    if (sb.state !== "running") {
      tbody.replaceChildren();
      emptyEl.hidden = false;
      emptyEl.textContent = `The sandbox is ${sb.state}: its processes show when it runs.`;
      return;
    }
    try {
      const items = (await api("GET", `${base}/processes`)).items;
      tbody.replaceChildren(...items.map((p) => h("tr", {},
        h("td", { class: "id" }, p.id),
        h("td", {}, p.pid ?? ""),
        h("td", { class: "cmd" }, (p.cmd ?? (p.argv ?? []).join(" ")).slice(0, 80)),
        h("td", {}, p.tag ?? ""),
        h("td", {}, p.running ? h("span", { class: "state state-running" }, p.pty ? "terminal" : "running") : `exit ${p.exit_code}`),
        h("td", {}, h("button", { onclick: () => follow(p) }, "output"), " ",
          p.running ? h("button", { class: "danger", onclick: async () => {
            if (!confirm(`Kill process ${p.id}?`)) return;
            try { await api("DELETE", `${base}/processes/${p.id}`); load(); } catch (e) { toast(e.message, true); }
          } }, "kill") : ""),
      )));
      emptyEl.hidden = items.length > 0;
    } catch (e) { if (e.status !== 409) toast(`processes: ${e.message}`, true); }
  }
  document.getElementById("log-close").addEventListener("click", () => { reading?.abort(); log.hidden = true; });
  return { load, stop: () => reading?.abort() };
})();

// -- network policy and ports -------------------------------------------------------------------------
function showNetwork() {
  const n = sb.network ?? {};
  const rules = (v) => (v && v.length ? v.join(", ") : "none");
  document.getElementById("network").replaceChildren(
    h("dt", {}, "egress"), h("dd", {}, n.mode ?? "none"),
    h("dt", {}, "allow"), h("dd", {}, rules(n.allow)),
    h("dt", {}, "deny"), h("dd", {}, rules(n.deny)),
    h("dt", {}, "public ports"), h("dd", {}, n.public_traffic ? "yes: anyone with the URL" : "no: a key or a signed URL"),
  );
  if (!document.getElementById("network-edit").open) { // the form shows the policy until someone edits it
    document.getElementById("net-mode").value = n.mode ?? "none";
    document.getElementById("net-allow").value = (n.allow ?? []).join(", ");
    document.getElementById("net-deny").value = (n.deny ?? []).join(", ");
  }
}
const netForm = document.getElementById("network-form");
netForm.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const d = Object.fromEntries(new FormData(netForm));
  const rules = (v) => String(v).split(",").map((x) => x.trim()).filter(Boolean);
  try {
    await api("PUT", `${base}/network`, { json: { mode: d.mode, allow: rules(d.allow), deny: rules(d.deny) } });
    sb = await api("GET", base);
    showNetwork();
    toast("egress policy applied");
  } catch (e) { toast(`network: ${e.message}`, true); }
});
document.getElementById("port-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const port = Number(document.getElementById("port").value);
  const tab = window.open("about:blank", "_blank");
  try {
    const signed = await api("POST", `${base}/urls`, { json: { port, path: "/", expires_in: 3600 } });
    if (tab) { tab.opener = null; tab.location = signed.url; } else location.assign(signed.url);
  } catch (e) { tab?.close(); toast(`port ${port}: ${e.message}`, true); }
});

// -- usage charts --------------------------------------------------------------------------------
const charts = (() => {
  const css = getComputedStyle(document.documentElement);
  const fg = css.getPropertyValue("--fg").trim() || "#888";
  const accent = css.getPropertyValue("--accent").trim() || "#0969da";
  const warn = css.getPropertyValue("--warn").trim() || "#bf8700";
  const data = { t: [], cpu: [], mem: [], disk: [], tx: [], rx: [] };
  let last = null; // the previous point: network figures are counters, the chart shows their rate
  let since = null;
  const stats = { points: 0 };
  window.coveMetrics = stats;
  const axes = [{ stroke: fg, grid: { stroke: "#8884" } }, { stroke: fg, grid: { stroke: "#8884" } }];
  // At least the last two minutes on the time axis, so one point is not stretched over years.
  const x = { time: true, range: (u, min, max) => (min == null ? [Date.now() / 1000 - 120, Date.now() / 1000] : [Math.min(min, max - 120), max + 1]) };
  const width = (id) => Math.max(300, document.getElementById(id).clientWidth - 10);
  const cpu = new uPlot({ title: "CPU %", width: width("chart-cpu"), height: 180, axes,
    scales: { x, y: { range: [0, 100] } }, series: [{}, { label: "cpu %", stroke: accent, width: 2 }] },
  [[], []], document.getElementById("chart-cpu"));
  const mem = new uPlot({ title: "Memory and disk (MiB)", width: width("chart-mem"), height: 180, axes,
    scales: { x, y: { range: (u, min, max) => [0, Math.max(1, max * 1.2)] } }, series: [{}, { label: "memory", stroke: accent, width: 2 }, { label: "disk", stroke: warn, width: 2 }] },
  [[], [], []], document.getElementById("chart-mem"));
  const net = new uPlot({ title: "Network through egress (KiB/s)", width: width("chart-net"), height: 180, axes,
    scales: { x, y: { range: (u, min, max) => [0, Math.max(1, max * 1.2)] } }, series: [{}, { label: "out", stroke: accent, width: 2 }, { label: "in", stroke: warn, width: 2 }] },
  [[], [], []], document.getElementById("chart-net"));
  const rate = (now, before, key) => {
    const dt = before ? now.timestampUnix - before.timestampUnix : 0;
    return dt > 0 ? Math.max(0, (now[key] - before[key]) / dt / 1024) : 0;
  };

  async function poll() {
    try {
      const points = await api("GET", `${base}/metrics`, { query: since ? { since } : {} });
      for (const p of points) {
        data.t.push(p.timestampUnix); data.cpu.push(p.cpuUsedPct);
        data.mem.push(p.memUsed / 1048576); data.disk.push(p.diskUsed / 1048576);
        data.tx.push(rate(p, last, "netTxBytes")); data.rx.push(rate(p, last, "netRxBytes"));
        last = p;
        since = p.timestampUnix;
      }
      for (const k of Object.keys(data)) data[k].splice(0, Math.max(0, data[k].length - 720));
      cpu.setData([data.t, data.cpu]);
      mem.setData([data.t, data.mem, data.disk]);
      net.setData([data.t, data.tx, data.rx]);
      stats.points = cpu.data[0].length; // what the chart holds (window.coveMetrics, for the tests)
    } catch (e) {
      if (e.status === 404) return;
      if (!(e instanceof ApiError)) console.error(e);
    }
    setTimeout(poll, document.hidden ? 15000 : 3000);
  }
  let sized = 0;
  new ResizeObserver(() => {
    clearTimeout(sized);
    sized = setTimeout(() => {
      cpu.setSize({ width: width("chart-cpu"), height: 180 });
      mem.setSize({ width: width("chart-mem"), height: 180 });
      net.setSize({ width: width("chart-net"), height: 180 });
    }, 100);
  }).observe(document.querySelector(".charts"));
  return { poll };
})();

showState();
showNetwork();
processes.load();
setInterval(() => { if (!document.hidden && !busy) processes.load(true); }, 5000);
if (sb.state === "running") terminal.connect();
else terminal.status(`the sandbox is ${sb.state}`);
files.load();
charts.poll();
setTimeout(pollState, 2000);
