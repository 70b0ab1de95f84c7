// The shoal dashboard: plain JavaScript over the server's own HTTP API (no build step).
// Auth: over TCP the bearer token is asked for once and kept in sessionStorage (this tab only);
// on the Unix socket no token is needed. Views: #/ sandboxes, #/sandbox/ID, #/volumes,
// #/volume/ID, #/images, #/image/ID, #/errors.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const main = $("#main");
let cleanup = [];  // what the current view must stop when another is shown

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) el.setAttribute(k, v);
  }
  for (const c of children.flat()) el.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return el;
}

function token() { return sessionStorage.getItem("shoal-token"); }

let tokenAsked = null;  // one prompt, however many requests were refused meanwhile

function askToken() {
  if (!tokenAsked) {
    tokenAsked = new Promise((resolve) => {
      $("#token-form").onsubmit = () => {
        sessionStorage.setItem("shoal-token", $("#token-input").value.trim());
        tokenAsked = null;
        resolve();
      };
    });
    $("#token-dialog").showModal();
  }
  return tokenAsked;
}

async function api(method, path, opts = {}) {
  for (;;) {
    const headers = { ...(opts.headers || {}) };
    if (token()) headers["authorization"] = "Bearer " + token();
    if (opts.json !== undefined) {
      headers["content-type"] = "application/json";
      opts.body = JSON.stringify(opts.json);
    }
    const resp = await fetch(path, { method, headers, body: opts.body, signal: opts.signal });
    if (resp.status === 401) { await askToken(); continue; }
    if (!resp.ok) {
      let msg = `HTTP ${resp.status}`;
      try { msg = (await resp.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error(msg);
    }
    if (opts.raw) return resp;
    const text = await resp.text();
    return text ? JSON.parse(text) : null;
  }
}

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i ? `${n.toFixed(1)} ${units[i]}` : `${n} B`;
}

function age(ts) {
  let s = Math.max(0, Math.floor(Date.now() / 1000 - ts));
  if (s >= 86400) return `${Math.floor(s / 86400)}d${Math.floor(s / 3600) % 24}h`;
  if (s >= 3600) return `${Math.floor(s / 3600)}h${Math.floor(s / 60) % 60}m`;
  if (s >= 60) return `${Math.floor(s / 60)}m${s % 60}s`;
  return `${s}s`;
}

function every(ms, fn) {
  let stopped = false;
  const loop = async () => {
    while (!stopped) {
      try { await fn(); } catch (e) { showError(e); }
      await new Promise((r) => setTimeout(r, ms));
    }
  };
  loop();
  cleanup.push(() => { stopped = true; });
}

function showError(e) {
  let bar = $("#view-error");
  if (!bar) { bar = h("p", { id: "view-error", class: "error" }); main.prepend(bar); }
  bar.textContent = String(e.message || e);
}

async function download(url, name) {
  const resp = await api("GET", url, { raw: true });
  const blob = await resp.blob();
  const a = h("a", { href: URL.createObjectURL(blob), download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

function joinPath(dir, name) { return (dir.endsWith("/") ? dir : dir + "/") + name; }

function parentOf(path) {
  const p = path.replace(/\/+$/, "");
  const i = p.lastIndexOf("/");
  return i <= 0 ? "/" : p.slice(0, i);
}

// --- views

async function viewSandboxes() {
  const body = h("tbody", { id: "sandbox-rows" });
  main.append(h("h2", {}, "Sandboxes"),
    h("label", {}, h("input", { type: "checkbox", id: "show-all" }), " show finished"),
    h("table", { id: "sandboxes" }, h("thead", {}, h("tr", {},
      ["ID", "Name", "App", "State", "Tags", "Image", "Runtime", "Age", "CPU", "Memory"]
        .map((c) => h("th", {}, c)))), body));
  every(2000, async () => {
    const all = $("#show-all")?.checked;
    const [rows, stats] = await Promise.all([
      api("GET", `/ops/sandboxes?include_finished=${all ? "true" : "false"}`),
      api("GET", "/stats")]);
    const byId = Object.fromEntries(stats.map((s) => [s.sandbox_id, s]));
    body.replaceChildren(...rows.reverse().map((s) => {
      const st = byId[s.sandbox_id];
      return h("tr", { class: "click", "data-id": s.sandbox_id,
                       onclick: () => { location.hash = `#/sandbox/${s.sandbox_id}`; } },
        h("td", { class: "mono" }, s.sandbox_id), h("td", {}, s.name || "-"),
        h("td", {}, s.app_name || s.app_id),
        h("td", { class: `state-${s.state}` },
          s.state === "running" ? "running" : `${s.end_reason} (${s.returncode})`),
        h("td", {}, Object.entries(s.tags).map(([k, v]) => h("span", { class: "tag" }, `${k}=${v}`))),
        h("td", { class: "mono" }, (s.image_id || "-").slice(0, 15)), h("td", {}, s.runtime),
        h("td", {}, age(s.created_at)),
        h("td", {}, st && st.cpu_percent !== null ? `${st.cpu_percent.toFixed(1)}%` : "-"),
        h("td", {}, st ? bytes(st.memory_bytes) : "-"));
    }));
    if (!rows.length) body.append(h("tr", {}, h("td", { colspan: 10, class: "muted" }, "no sandboxes")));
  });
}

async function viewSandbox(id) {
  const s = await api("GET", `/ops/sandboxes/${id}`);
  const panel = h("div", { class: "panel", id: "panel" });
  const tabs = {};
  const show = (name) => {
    for (const f of cleanup.splice(1)) f();  // keep the header's refresher (index 0)
    for (const [n, b] of Object.entries(tabs)) b.classList.toggle("active", n === name);
    panel.replaceChildren();
    ({ logs: tabLogs, terminal: tabTerminal, files: tabFiles })[name](id, panel);
  };
  for (const name of ["logs", "terminal", "files"]) {
    tabs[name] = h("button", { id: `tab-${name}`, onclick: () => show(name) },
                   name[0].toUpperCase() + name.slice(1));
  }
  const statsEl = h("dd", { id: "sandbox-stats" }, "-");
  const stateEl = h("dd", { id: "sandbox-state", class: `state-${s.state}` }, s.state);
  main.append(
    h("div", { class: "toolbar" }, h("h2", {}, `Sandbox ${s.name ? s.name + " " : ""}`,
      h("span", { class: "mono muted" }, s.sandbox_id)),
      h("button", { class: "danger", id: "stop-sandbox", onclick: async () => {
        if (confirm(`Terminate ${s.sandbox_id}?`)) await api("POST", `/sandboxes/${id}/terminate`);
      } }, "Stop")),
    h("dl", { class: "kv" },
      h("dt", {}, "state"), stateEl, h("dt", {}, "app"), h("dd", {}, s.app_name || s.app_id),
      h("dt", {}, "image"), h("dd", { class: "mono" }, s.image_id || "-"),
      h("dt", {}, "runtime"), h("dd", {}, s.runtime),
      h("dt", {}, "entrypoint"), h("dd", { class: "mono" }, s.args.join(" ") || "(none)"),
      h("dt", {}, "tags"), h("dd", {}, Object.entries(s.tags).map(([k, v]) => h("span", { class: "tag" }, `${k}=${v}`))),
      h("dt", {}, "created"), h("dd", {}, new Date(s.created_at * 1000).toLocaleString()),
      h("dt", {}, "usage"), statsEl),
    h("div", { class: "tabs" }, Object.values(tabs)), panel);
  every(2000, async () => {
    const now = await api("GET", `/ops/sandboxes/${id}`);
    stateEl.textContent = now.state === "running" ? "running" : `${now.end_reason} (${now.returncode})`;
    stateEl.className = `state-${now.state}`;
    if (now.state !== "running") return;
    const st = await api("GET", `/sandboxes/${id}/stats`);
    statsEl.textContent = `cpu ${st.cpu_percent === null ? "-" : st.cpu_percent.toFixed(1) + "%"}, ` +
      `memory ${bytes(st.memory_bytes)}, disk ${bytes(st.disk_bytes)}, ${st.pids} processes`;
  });
  show("logs");
}

function tabLogs(id, panel) {
  const pre = h("pre", { id: "logs" });
  panel.append(pre);
  const ctrl = new AbortController();
  cleanup.push(() => ctrl.abort());
  for (const stream of ["stdout", "stderr"]) {
    (async () => {
      const resp = await api("GET", `/sandboxes/${id}/logs/${stream}?follow=true`,
                             { raw: true, signal: ctrl.signal });
      const reader = resp.body.getReader();
      const dec = new TextDecoder();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        pre.append(h("span", { class: stream }, dec.decode(value, { stream: true })));
        pre.scrollTop = pre.scrollHeight;
      }
    })().catch((e) => { if (e.name !== "AbortError") showError(e); });
  }
}

function tabTerminal(id, panel) {
  const box = h("div", { id: "terminal" });
  panel.append(box);
  const term = new Terminal({ cursorBlink: true, fontSize: 13, convertEol: false });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(box);
  fit.fit();
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const q = new URLSearchParams({ rows: term.rows, cols: term.cols });
  if (token()) q.set("token", token());
  const ws = new WebSocket(`${proto}//${location.host}/sandboxes/${id}/terminal?${q}`);
  ws.binaryType = "arraybuffer";
  ws.onmessage = (ev) => {
    if (typeof ev.data === "string") {
      const m = JSON.parse(ev.data);
      term.write(m.type === "exit" ? `\r\n[exited with ${m.returncode}]\r\n` : `\r\n[${m.message}]\r\n`);
    } else {
      term.write(new Uint8Array(ev.data));
    }
  };
  ws.onclose = (ev) => { if (ev.code === 4401) term.write("\r\n[the token was refused]\r\n"); };
  term.onData((data) => { if (ws.readyState === 1) ws.send(JSON.stringify({ type: "input", data })); });
  term.onResize(({ rows, cols }) => {
    if (ws.readyState === 1) ws.send(JSON.stringify({ type: "resize", rows, cols }));
  });
  const onWinResize = () => fit.fit();
  window.addEventListener("resize", onWinResize);
  window.shoalTerminal = term;  // for tests and the console
  term.focus();
  cleanup.push(() => { ws.close(); term.dispose(); window.removeEventListener("resize", onWinResize); });
}

function fileBrowser(panel, { list, read, write, remove, start = "/" }) {
  let cwd = start;
  const rows = h("tbody", { id: "file-rows" });
  const where = h("span", { id: "cwd", class: "mono" });
  const upload = h("input", { type: "file", id: "upload", multiple: true });
  upload.onchange = async () => {
    for (const f of upload.files) await write(joinPath(cwd, f.name), f);
    upload.value = "";
    await render();
  };
  panel.append(h("div", { class: "toolbar" },
    h("button", { class: "small", id: "up", onclick: () => { cwd = parentOf(cwd); render(); } }, "Up"),
    where, h("span", { class: "muted" }, "upload:"), upload),
    h("table", { id: "files" }, h("thead", {}, h("tr", {},
      ["Name", "Type", "Size", "Modified", ""].map((c) => h("th", {}, c)))), rows));
  async function render() {
    where.textContent = cwd;
    const entries = await list(cwd);
    rows.replaceChildren(...entries.map((e) => h("tr", { class: "click", "data-name": e.name,
      onclick: async (ev) => {
        if (ev.target.tagName === "BUTTON") return;
        if (e.dir) { cwd = joinPath(cwd, e.name); await render(); } else await read(joinPath(cwd, e.name), e.name);
      } },
      h("td", { class: "mono" }, e.name + (e.dir ? "/" : "")), h("td", {}, e.type),
      h("td", {}, e.dir ? "" : bytes(e.size)),
      h("td", {}, e.mtime ? new Date(e.mtime * 1000).toLocaleString() : ""),
      h("td", {}, remove ? h("button", { class: "small", onclick: async () => {
        if (confirm(`Delete ${joinPath(cwd, e.name)}?`)) {
          await remove(joinPath(cwd, e.name), e.dir);
          await render();
        }
      } }, "Delete") : ""))));
  }
  render().catch(showError);
}

function tabFiles(id, panel) {
  const enc = encodeURIComponent;
  fileBrowser(panel, {
    list: async (path) => (await api("GET", `/sandboxes/${id}/fs/list?path=${enc(path)}`)).map((e) => ({
      name: e.name, dir: e.type === "DIRECTORY", type: e.type.toLowerCase(), size: e.size,
      mtime: e.modified_time })),
    read: (path, name) => download(`/sandboxes/${id}/fs/file?path=${enc(path)}`, name),
    write: (path, file) => api("PUT", `/sandboxes/${id}/fs/file?path=${enc(path)}`, { body: file }),
    remove: (path, dir) => api("DELETE", `/sandboxes/${id}/fs/file?path=${enc(path)}&recursive=${dir}`),
  });
}

async function viewVolumes() {
  const rows = await api("GET", "/volumes");
  main.append(h("h2", {}, "Volumes"), h("table", { id: "volumes" },
    h("thead", {}, h("tr", {}, ["ID", "Name", "Created", ""].map((c) => h("th", {}, c)))),
    h("tbody", {}, rows.map((v) => h("tr", { class: "click", "data-name": v.name || "",
      onclick: (ev) => { if (ev.target.tagName !== "BUTTON") location.hash = `#/volume/${v.volume_id}`; } },
      h("td", { class: "mono" }, v.volume_id), h("td", {}, v.name || "(ephemeral)"),
      h("td", {}, new Date(v.created_at * 1000).toLocaleString()),
      h("td", {}, h("button", { class: "small", onclick: async () => {
        if (confirm(`Delete volume ${v.name || v.volume_id} and everything in it?`)) {
          await api("DELETE", `/volumes/${v.volume_id}`);
          route();
        }
      } }, "Delete")))))));
}

async function viewVolume(id) {
  const v = await api("GET", `/volumes/${id}`);
  const panel = h("div", { class: "panel" });
  main.append(h("h2", {}, `Volume ${v.name || v.volume_id}`), panel);
  const enc = encodeURIComponent;
  fileBrowser(panel, {
    list: async (path) => (await api("GET", `/volumes/${id}/listdir?path=${enc(path)}`)).map((e) => ({
      name: e.path.split("/").pop(), dir: e.type === 2, type: e.type === 2 ? "directory" : "file",
      size: e.size, mtime: e.mtime })),
    read: (path, name) => download(`/volumes/${id}/file?path=${enc(path)}`, name),
    write: (path, file) => api("PUT", `/volumes/${id}/file?path=${enc(path)}`, { body: file }),
    remove: (path, dir) => api("DELETE", `/volumes/${id}/file?path=${enc(path)}&recursive=${dir}`),
  });
}

async function viewImages() {
  const rows = await api("GET", "/images");
  rows.sort((a, b) => b.created_at - a.created_at);
  main.append(h("h2", {}, "Images"), h("table", { id: "images" },
    h("thead", {}, h("tr", {}, ["ID", "Layers", "Created", "Description"].map((c) => h("th", {}, c)))),
    h("tbody", {}, rows.map((i) => h("tr", { class: "click", onclick: () => { location.hash = `#/image/${i.image_id}`; } },
      h("td", { class: "mono" }, i.image_id), h("td", {}, String(i.layers)),
      h("td", {}, new Date(i.created_at * 1000).toLocaleString()), h("td", {}, i.description))))));
}

async function viewImage(id) {
  const i = await api("GET", `/ops/images/${id}`);
  main.append(h("h2", {}, `Image ${i.image_id}`), h("p", {}, i.description, " — ", bytes(i.size)),
    h("table", { id: "layers" }, h("thead", {}, h("tr", {}, h("th", {}, "Layer (top first)"), h("th", {}, "Size"))),
      h("tbody", {}, i.layers.map((l) => h("tr", {}, h("td", { class: "mono" }, l.layer_id),
        h("td", {}, bytes(l.size)))))));
}

async function viewErrors() {
  const body = h("tbody", {});
  main.append(h("h2", {}, "Recent errors and warnings"), h("table", { id: "errors" },
    h("thead", {}, h("tr", {}, ["Time", "Level", "Where", "Message", "Request"].map((c) => h("th", {}, c)))), body));
  every(3000, async () => {
    const rows = await api("GET", "/errors");
    body.replaceChildren(...rows.map((e) => h("tr", {},
      h("td", {}, new Date(e.time * 1000).toLocaleTimeString()), h("td", {}, e.level),
      h("td", {}, e.logger), h("td", {}, e.message), h("td", { class: "mono" }, e.request_id || ""))));
    if (!rows.length) body.append(h("tr", {}, h("td", { colspan: 5, class: "muted" }, "none")));
  });
}

async function route() {
  for (const f of cleanup.splice(0)) f();
  main.replaceChildren();
  const [, view, id] = location.hash.replace(/^#/, "").split("/");
  const active = { sandbox: "sandboxes", volume: "volumes", image: "images" }[view] || view || "sandboxes";
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === active);
  const views = { "": viewSandboxes, sandbox: viewSandbox, volumes: viewVolumes, volume: viewVolume,
                  images: viewImages, image: viewImage, errors: viewErrors };
  try { await (views[view || ""] || viewSandboxes)(id); } catch (e) { showError(e); }
}

async function headerStatus() {
  for (;;) {
    try {
      const s = await api("GET", "/status");
      $("#server-status").textContent =
        `shoal ${s.version} · up ${age(s.started_at)} · ${s.sandboxes_running} running · pool ${s.pool_size} · ${s.runtimes.join(", ")}`;
    } catch (e) { $("#server-status").textContent = `server: ${e.message}`; }
    await new Promise((r) => setTimeout(r, 5000));
  }
}

window.addEventListener("hashchange", route);
route();
headerStatus();
