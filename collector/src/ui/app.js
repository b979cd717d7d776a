// Fathom collector UI: vanilla JS, three views (Profiles, Traces, Metrics),
// each with its own selectors, all state in the URL (?view=…&p.…/t.…/m.…)
// so a view can be linked. Profiles use the Pyroscope querier (connect
// JSON: ProfileTypes, LabelNames, LabelValues, SelectSeries,
// SelectMergeStacktraces, SelectMergeSpanProfile), traces and metrics /ui/api/*.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const S = {}; // URL state
for (const [k, v] of params) S[k] = v;
S.view = S.view || "profiles";

function saveUrl() {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(S)) if (v !== "" && v !== undefined && v !== null) p.set(k, v);
  history.replaceState(null, "", "?" + p.toString());
}

function setStatus(msg, isError) {
  const s = $("status");
  s.textContent = msg || "";
  s.className = isError ? "error" : "";
}

async function getJson(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error((await r.text()).trim() || r.statusText);
  return r;
}

async function querier(method, body) {
  const r = await fetch("/querier.v1.QuerierService/" + method, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const j = await r.json();
  if (!r.ok) throw new Error(j.message || r.statusText);
  return j;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}
const svgEl = (tag, attrs, ...children) => {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
};

// ---- units ----

function trimNum(v, digits) {
  return Number(v.toFixed(digits)).toString();
}
function fmtInt(v) { return Math.round(v).toLocaleString("en-US"); }

/// A duration in nanoseconds, human: 850 ns, 12.3 µs, 4.56 ms, 1.23 s, 2m 5s, 1h 2m.
function fmtNs(ns) {
  const a = Math.abs(ns);
  if (a < 1e3) return trimNum(ns, 0) + " ns";
  if (a < 1e6) return trimNum(ns / 1e3, a < 1e4 ? 2 : 1) + " µs";
  if (a < 1e9) return trimNum(ns / 1e6, a < 1e7 ? 2 : 1) + " ms";
  if (a < 60e9) return trimNum(ns / 1e9, 2) + " s";
  const s = Math.round(ns / 1e9);
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}
function fmtMs(ms) { return fmtNs(ms * 1e6); }
function fmtBytes(b) {
  const a = Math.abs(b);
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = b;
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i === 0 ? trimNum(v, 0) : trimNum(v, a >= 10 * 1024 ** i ? 1 : 2)) + " " + units[i];
}
function fmtShort(v) {
  const a = Math.abs(v);
  if (a >= 1e9) return trimNum(v / 1e9, 2) + "G";
  if (a >= 1e6) return trimNum(v / 1e6, 2) + "M";
  if (a >= 1e4) return trimNum(v / 1e3, 1) + "k";
  return Number.isInteger(v) ? fmtInt(v) : trimNum(v, a < 0.01 ? 5 : 3);
}
/// A value of a profile's sample unit.
function fmtUnit(v, unit) {
  if (unit === "nanoseconds") return fmtNs(v);
  if (unit === "microseconds") return fmtNs(v * 1e3);
  if (unit === "milliseconds") return fmtNs(v * 1e6);
  if (unit === "seconds") return fmtNs(v * 1e9);
  if (unit === "bytes") return fmtBytes(v);
  if (unit === "count" || unit === "samples" || !unit) return fmtShort(v);
  return fmtShort(v) + " " + unit;
}
/// A metric value of the unit its name carries.
function fmtMetric(v, unit) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  switch (unit) {
    case "s": return fmtNs(v * 1e9);
    case "ms": return fmtNs(v * 1e6);
    case "us": return fmtNs(v * 1e3);
    case "ns": return fmtNs(v);
    case "bytes": return fmtBytes(v);
    case "ratio": return trimNum(v * 100, 2) + "%";
    case "percent": return trimNum(v, 2) + "%";
    default: return fmtShort(v);
  }
}
function pct(v, total) { return total > 0 ? trimNum((100 * v) / total, 2) + "%" : "–"; }

function fmtTime(ms) {
  const d = new Date(ms);
  return d.toLocaleDateString("en-CA") + " " + d.toLocaleTimeString("en-GB", { hour12: false });
}
function fmtClock(ms) { return new Date(ms).toLocaleTimeString("en-GB", { hour12: false }); }
/// datetime-local value <-> unix ms (local time).
function toLocalInput(ms) {
  if (!ms) return "";
  const d = new Date(ms - new Date(ms).getTimezoneOffset() * 60000);
  return d.toISOString().slice(0, 19);
}
function fromLocalInput(v) { return v ? new Date(v).getTime() : 0; }

const RANGES = [["15m", "last 15 min"], ["1h", "last hour"], ["6h", "last 6 hours"], ["24h", "last 24 hours"],
  ["7d", "last 7 days"], ["all", "all stored"], ["custom", "custom (from/until)"]];
const RANGE_MS = { "15m": 9e5, "1h": 36e5, "6h": 216e5, "24h": 864e5, "7d": 6048e5 };
for (const sel of document.querySelectorAll("select.range")) {
  sel.replaceChildren(...RANGES.filter(([v]) => v !== "custom" || sel.id === "p-range").map(([v, t]) => el("option", { value: v }, t)));
}

function fillSelect(sel, values, current, empty) {
  const opts = values.map((v) => (Array.isArray(v) ? el("option", { value: v[0] }, v[1]) : el("option", { value: v }, v)));
  if (empty !== undefined) opts.unshift(el("option", { value: "" }, empty));
  sel.replaceChildren(...opts);
  const vals = values.map((v) => (Array.isArray(v) ? v[0] : v));
  sel.value = vals.includes(current) || (empty !== undefined && current === "") ? current : (empty !== undefined ? "" : vals[0] || "");
  return sel.value;
}

// ---- status / onboarding ----

let STATUS = null;

async function loadStatus() {
  STATUS = await (await getJson("/ui/api/status")).json();
  return STATUS;
}

function onboarding(what) {
  const box = $("onboarding");
  const s = STATUS;
  const empty = s && {
    profiles: s.profile_series === 0, traces: s.spans === 0, metrics: s.metric_series === 0,
  }[what];
  if (!s || !empty) { box.hidden = true; return; }
  const host = location.hostname;
  const ep = s.endpoints.map((e) => el("li", {}, el("code", {}, e.address.replace(/^0\.0\.0\.0|^\[::\]/, host)), " — ", e.what));
  const http = location.origin;
  const examples = {
    profiles: `# Any Pyroscope SDK: server address ${http}\n# e.g. pyroscope-io (Python): pyroscope.configure(application_name="my-app", server_address="${http}")\n# or push a pprof file:\ncurl --data-binary @cpu.pb.gz "${http}/ingest?name=my-app&format=pprof"\n# or run fathom-agent with --collector-url ${http}`,
    traces: `# Any OpenTelemetry SDK:\nexport OTEL_EXPORTER_OTLP_ENDPOINT=http://${host}:${(s.endpoints.find((e) => e.what.startsWith("OTLP HTTP")) || {}).address?.split(":").pop() || "4318"}\n# (gRPC: port ${(s.endpoints.find((e) => e.what.startsWith("OTLP gRPC")) || {}).address?.split(":").pop() || "4317"}), or fathom-agent --collector-url ${http}`,
    metrics: `# OTLP metrics from any OpenTelemetry SDK or collector:\nexport OTEL_EXPORTER_OTLP_METRICS_ENDPOINT=${http}/v1/metrics\n# History is kept in the store for its retention (${s.retention}).`,
  }[what];
  box.replaceChildren(
    el("h2", {}, `No ${what} stored yet — where to send data`),
    el("ul", {}, ...ep),
    el("pre", {}, examples),
    el("p", { class: "muted" }, `Store: ${s.store_path}, retention ${s.retention}.`));
  box.hidden = false;
}

// ---- views ----

const VIEWS = ["profiles", "traces", "metrics"];
const loaded = {};

async function showView(v) {
  if (!VIEWS.includes(v)) v = "profiles";
  S.view = v;
  for (const a of document.querySelectorAll("#tabs a")) a.classList.toggle("active", a.dataset.view === v);
  for (const name of VIEWS) $("view-" + name).hidden = name !== v;
  saveUrl();
  document.body.dataset.loaded = "false";
  setStatus("loading…");
  try {
    await loadStatus();
    onboarding(v);
    if (v === "profiles") await profiles.init();
    if (v === "traces") await traces.init();
    if (v === "metrics") await metrics.load();
    if ($("status").textContent === "loading…") setStatus("");
  } catch (e) {
    setStatus(e.message, true);
  }
  document.body.dataset.loaded = "true";
}

for (const a of document.querySelectorAll("#tabs a")) {
  a.addEventListener("click", (e) => { e.preventDefault(); showView(a.dataset.view); });
}

function applyTheme() {
  const t = S.theme || (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light");
  document.documentElement.dataset.theme = t;
}
$("theme").addEventListener("click", () => {
  S.theme = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
  applyTheme();
  saveUrl();
});
applyTheme();

// ---- flame graph ----

/// Pyroscope's flame graph (levels of [x delta, total, self, name]) as a
/// tree of {name, total, self, x, depth, children, parent}.
function treeFromLevels(fg) {
  const names = fg.names || [];
  const levels = (fg.levels || []).map((l) => (l.values || []).map(Number));
  let prev = [];
  let root = null;
  for (let d = 0; d < levels.length; d++) {
    const v = levels[d];
    const row = [];
    let end = 0;
    let pi = 0;
    for (let i = 0; i + 3 < v.length; i += 4) {
      const x = end + v[i];
      const n = { name: names[v[i + 3]] ?? "?", total: v[i + 1], self: v[i + 2], x, depth: d, children: [], parent: null };
      end = x + n.total;
      while (pi < prev.length && prev[pi].x + prev[pi].total <= x) pi++;
      if (d > 0 && pi < prev.length) { n.parent = prev[pi]; prev[pi].children.push(n); }
      if (d === 0 && !root) root = n;
      row.push(n);
    }
    prev = row;
  }
  return root;
}

/// Per function: self and total (counted once per stack), from a tree.
function functionTable(root) {
  const m = new Map();
  const walk = (n, onPath) => {
    let r = m.get(n.name);
    if (!r) m.set(n.name, (r = { name: n.name, self: 0, total: 0 }));
    r.self += n.self;
    const first = !onPath.has(n.name);
    if (first) { r.total += n.total; onPath.add(n.name); }
    for (const c of n.children) walk(c, onPath);
    if (first) onPath.delete(n.name);
  };
  if (root) for (const c of root.children) walk(c, new Set());
  return [...m.values()];
}

function hashHue(name) {
  let h = 0;
  for (let i = 0; i < name.length; i++) h = (h * 31 + name.charCodeAt(i)) >>> 0;
  return h;
}
function nodeColor(name) {
  const h = hashHue(name.replace(/\(.*$/, ""));
  return `hsl(${10 + (h % 40)}, ${70 + (h >> 8) % 20}%, ${58 + (h >> 16) % 14}%)`;
}
function diffColor(a, b) {
  // Share in A vs B: red grew, green shrank.
  const d = b - a;
  const k = Math.min(1, Math.abs(d) / 0.2);
  if (Math.abs(d) < 0.001) return "hsl(220, 10%, 72%)";
  return d > 0 ? `hsl(0, ${40 + 50 * k}%, ${78 - 22 * k}%)` : `hsl(130, ${40 + 40 * k}%, ${76 - 22 * k}%)`;
}

/// A flame graph drawn in the element `boxId`: `topDown()` says which way
/// (root at the top or at the bottom); `onSelect(node)`, when given, is what
/// a click on a frame does instead of zooming.
class FlameGraph {
  constructor(boxId, topDown, onSelect) {
    this.boxId = boxId;
    this.topDown = topDown;
    this.onSelect = onSelect || null;
    this.root = null; this.focus = null; this.unit = ""; this.total = 0; this.diff = null; this.emptyText = null;
  }

  set(root, unit, diff) {
    this.root = root;
    this.focus = root;
    this.unit = unit;
    this.total = root ? root.total : 0;
    this.diff = diff || null;
    this.render();
  }

  render() {
    const box = $(this.boxId);
    if (!this.root || this.root.total <= 0) {
      box.replaceChildren(el("p", { class: "empty" }, this.emptyText || "No samples for this selection."));
      box.style.height = "";
      box.dataset.state = "empty";
      return;
    }
    const W = box.clientWidth || 800;
    const F = this.focus;
    const topDown = this.topDown();
    let re = null;
    const q = $("p-search").value.trim();
    if (q) { try { re = new RegExp(q, "i"); } catch { re = null; } }
    const nodes = [];
    for (let a = F.parent; a; a = a.parent) nodes.push([a, 0, W, true]);
    const walk = (n) => {
      const w = (n.total / F.total) * W;
      if (w < 0.6) return;
      nodes.push([n, ((n.x - F.x) / F.total) * W, w, false]);
      for (const c of n.children) walk(c);
    };
    walk(F);
    const maxDepth = nodes.reduce((m, [n]) => Math.max(m, n.depth), 0);
    const H = 18;
    const frag = document.createDocumentFragment();
    for (const [n, left, w, anc] of nodes) {
      const top = topDown ? n.depth * H : (maxDepth - n.depth) * H;
      const d = el("div", {
        class: "fg-node" + (anc ? " ancestor" : "") + (re ? (re.test(n.name) ? " match" : " faded") : ""),
        style: `left:${left}px;width:${w}px;top:${top}px;background:${this.diff ? diffColor(n.shareA || 0, n.shareB || 0) : nodeColor(n.name)}`,
        "data-name": n.name,
      }, w > 28 ? n.name : "");
      d.addEventListener("click", () => {
        if (this.onSelect) { this.onSelect(n); return; }
        this.focus = n === this.focus ? (n.parent || n) : n;
        this.render();
      });
      d.addEventListener("mousemove", (e) => this.tip(e, n));
      d.addEventListener("mouseleave", () => { $("fg-tip").hidden = true; });
      frag.append(d);
    }
    box.replaceChildren(frag);
    box.style.height = (maxDepth + 1) * H + 2 + "px";
    box.dataset.state = "ok";
    box.dataset.focus = F.name;
  }

  describe(n) {
    if (this.diff) {
      return `${n.name}\nA: ${fmtUnit(n.a || 0, this.unit)} (${pct(n.a || 0, this.diff.totalA)})\n` +
        `B: ${fmtUnit(n.b || 0, this.unit)} (${pct(n.b || 0, this.diff.totalB)})`;
    }
    return `${n.name}\nTotal: ${fmtUnit(n.total, this.unit)} (${pct(n.total, this.total)})\n` +
      `Self: ${fmtUnit(n.self, this.unit)} (${pct(n.self, this.total)})`;
  }

  tip(e, n) {
    const t = $("fg-tip");
    t.textContent = this.describe(n);
    t.hidden = false;
    const x = Math.min(e.clientX + 14, innerWidth - t.offsetWidth - 8);
    t.style.left = x + "px";
    t.style.top = e.clientY + 16 + "px";
  }
}

const flame = new FlameGraph("flame", () => $("p-topdown").checked);

// ---- sandwich ----

/// The outermost frames named `name` of a tree (an occurrence inside
/// another is counted in it, as the table's total counts a function once
/// per stack).
function outermost(root, name) {
  const out = [];
  const walk = (n) => {
    if (n.name === name && n !== root) { out.push(n); return; }
    for (const c of n.children) walk(c);
  };
  if (root) walk(root);
  return out;
}

/// Lays out a tree built by name: children by name, x offsets, depths.
function layoutTree(n, x, depth, parent) {
  n.x = x; n.depth = depth; n.parent = parent;
  n.children = [...n.kids.values()].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  let cx = x;
  for (const c of n.children) { layoutTree(c, cx, depth + 1, n); cx += c.total; }
  return n;
}
const treeNode = (name) => ({ name, total: 0, self: 0, kids: new Map() });
function childOf(n, name) {
  let c = n.kids.get(name);
  if (!c) n.kids.set(name, (c = treeNode(name)));
  return c;
}

/// Pyroscope's sandwich of `name` in `root`: its callees (every outermost
/// call of it merged: the function at the root) and its callers (the
/// stacks that lead to it, inverted: the function at the root, its
/// callers, their callers…). Both totals are the function's total.
function sandwichTrees(root, name) {
  const callees = treeNode(name);
  const callers = treeNode(name);
  const merge = (into, n) => {
    into.total += n.total; into.self += n.self;
    for (const c of n.children) merge(childOf(into, c.name), c);
  };
  for (const n of outermost(root, name)) {
    merge(callees, n);
    callers.total += n.total;
    let at = callers;
    for (let a = n.parent; a && a !== root; a = a.parent) {
      at = childOf(at, a.name);
      at.total += n.total;
    }
    at.self += n.total;
  }
  return { callers: layoutTree(callers, 0, 0, null), callees: layoutTree(callees, 0, 0, null) };
}

/// The sandwich view: callers above the function, callees below it, of the
/// function chosen in the table or by a click in either graph.
const sandwich = {
  callers: new FlameGraph("sw-callers", () => false, (n) => sandwich.select(n.name)),
  callees: new FlameGraph("sw-callees", () => true, (n) => sandwich.select(n.name)),

  select(name) {
    S["p.fn"] = name;
    saveUrl();
    this.render();
  },

  render() {
    const box = $("p-sandwich");
    const on = (S["p.mode"] || "both") === "sandwich";
    box.hidden = !on;
    if (!on) return;
    const name = S["p.fn"] || "";
    const root = flame.diff ? null : flame.root;
    const has = name && root && outermost(root, name).length > 0;
    $("sw-title").textContent = flame.diff ? "The sandwich view shows one profile: leave Compare" : !root ? "" : has ? `${name}: ${fmtUnit(outermost(root, name).reduce((a, n) => a + n.total, 0), flame.unit)}`
      : name ? `${name} is not in this profile: choose a function in the table` : "Choose a function in the table (or click a frame here)";
    box.dataset.fn = has ? name : "";
    const t = has ? sandwichTrees(root, name) : { callers: null, callees: null };
    this.callers.emptyText = this.callees.emptyText = "No function chosen.";
    this.callers.set(t.callers, flame.unit);
    this.callees.set(t.callees, flame.unit);
  },
};

/// A diff tree of two trees (by stack path): {name, a, b, total, self,
/// shareA, shareB}; widths by the sum of both shares.
function diffTree(ra, rb) {
  const ta = ra ? ra.total : 0;
  const tb = rb ? rb.total : 0;
  const SCALE = 1e6;
  const merge = (na, nb, name, depth, x, parent) => {
    const a = na ? na.total : 0;
    const b = nb ? nb.total : 0;
    const shareA = ta ? a / ta : 0;
    const shareB = tb ? b / tb : 0;
    const n = { name, a, b, shareA, shareB, depth, x, parent, children: [], total: Math.round(((shareA + shareB) / 2) * SCALE), self: 0 };
    const kids = new Map();
    for (const c of na ? na.children : []) kids.set(c.name, [c, null]);
    for (const c of nb ? nb.children : []) kids.set(c.name, [(kids.get(c.name) || [null])[0], c]);
    let cx = x;
    for (const [k, [ca, cb]] of [...kids.entries()].sort()) {
      const c = merge(ca, cb, k, depth + 1, cx, n);
      cx += c.total;
      n.children.push(c);
    }
    return n;
  };
  return merge(ra, rb, "total", 0, 0, null);
}

// ---- timeline ----

/// Colours of grouped timeline series (Pyroscope-like, distinct in light and dark).
const GROUP_COLORS = ["#3b82f6", "#f97316", "#10b981", "#e11d48", "#8b5cf6", "#eab308", "#06b6d4", "#ec4899", "#84cc16", "#64748b", "#a16207"];

/// `groups`: [{pts: [[t, v]…], color}] stacked per step (one group: the
/// accent colour).
function drawTimeline(box, groups, start, end, brushes, onBrush) {
  const W = box.clientWidth || 800;
  const H = box.clientHeight || 110;
  const pad = { l: 56, r: 8, t: 6, b: 16 };
  const stack = new Map();
  for (const g of groups) for (const [t, v] of g.pts) stack.set(t, (stack.get(t) || 0) + v);
  const pts = [...stack.entries()].sort((a, b) => a[0] - b[0]);
  const maxV = Math.max(1, ...pts.map((p) => p[1]));
  const X = (t) => pad.l + ((t - start) / Math.max(end - start, 1)) * (W - pad.l - pad.r);
  const Y = (v) => H - pad.b - (v / maxV) * (H - pad.t - pad.b);
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}` });
  for (let i = 0; i <= 4; i++) {
    const t = start + ((end - start) * i) / 4;
    svg.append(svgEl("line", { class: "grid", x1: X(t), x2: X(t), y1: pad.t, y2: H - pad.b }));
    svg.append(svgEl("text", { class: "axis", x: X(t) + 2, y: H - 4 }, fmtClock(t)));
  }
  svg.append(svgEl("text", { class: "axis", x: 2, y: pad.t + 9 }, fmtUnit(maxV, box.dataset.unit)));
  // One bar per step (a line would not show a single window).
  const stepMs = Number(box.dataset.step) || 1000;
  const bw = Math.max(2, (stepMs / Math.max(end - start, 1)) * (W - pad.l - pad.r) - 1);
  const base = new Map();
  for (const g of groups) {
    for (const [t, v] of g.pts) {
      const below = base.get(t) || 0;
      base.set(t, below + v);
      const attrs = { class: "bar", x: Math.min(X(t), W - pad.r - bw), width: bw, y: Y(below + v), height: Math.max(1, Y(below) - Y(below + v)) };
      if (g.color) { attrs.style = `fill:${g.color}`; attrs["data-group"] = g.label; }
      svg.append(svgEl("rect", attrs,
        svgEl("title", {}, `${fmtTime(t)}${g.color ? " · " + g.label : ""}: ${fmtUnit(v, box.dataset.unit)}`)));
    }
  }
  for (const [cls, a, b] of brushes) {
    if (a && b && b > a) svg.append(svgEl("rect", { class: cls, x: X(Math.max(a, start)), width: Math.max(2, X(Math.min(b, end)) - X(Math.max(a, start))), y: pad.t, height: H - pad.t - pad.b }));
  }
  const sel = svgEl("rect", { class: "brush", y: pad.t, height: H - pad.t - pad.b, width: 0, x: 0 });
  svg.append(sel);
  const T = (clientX) => {
    const r = svg.getBoundingClientRect();
    const x = ((clientX - r.left) / r.width) * W;
    return start + ((Math.min(Math.max(x, pad.l), W - pad.r) - pad.l) / (W - pad.l - pad.r)) * (end - start);
  };
  let from = null;
  svg.addEventListener("mousedown", (e) => { from = T(e.clientX); e.preventDefault(); });
  svg.addEventListener("mousemove", (e) => {
    if (from === null) return;
    const to = T(e.clientX);
    sel.setAttribute("x", X(Math.min(from, to)));
    sel.setAttribute("width", Math.abs(X(to) - X(from)));
  });
  const done = (e) => {
    if (from === null) return;
    const to = T(e.clientX);
    const [a, b] = [Math.min(from, to), Math.max(from, to)];
    from = null;
    if (X(b) - X(a) > 3) onBrush(Math.floor(a), Math.ceil(b));
  };
  svg.addEventListener("mouseup", done);
  svg.addEventListener("mouseleave", done);
  box.replaceChildren(svg);
  box.dataset.points = String(pts.length);
}

// ---- profiles view ----

/// A selector's matchers as [name, op, value] (simple parser for chips).
function parseMatchers(sel) {
  const out = [];
  const re = /([A-Za-z_][\w.]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"/g;
  let m;
  while ((m = re.exec(sel || ""))) out.push([m[1], m[2], m[3]]);
  return out;
}
function buildSelector(ms) {
  return "{" + ms.map(([n, op, v]) => `${n}${op}"${v.replace(/\\/g, "\\\\").replace(/"/g, '\\"')}"`).join(",") + "}";
}

const profiles = {
  types: [],
  seriesInfo: [],

  range() {
    const r = S["p.range"] || "1h";
    if (r === "custom") return [Number(S["p.from"]) || 0, Number(S["p.until"]) || Date.now()];
    if (r === "all") {
      const first = Math.min(...this.seriesInfo.map((s) => s.first_ms), Date.now() - 36e5);
      const last = Math.max(...this.seriesInfo.map((s) => s.last_ms), first + 1000);
      return [first - 1000, Math.max(last + 1000, Date.now())];
    }
    return [Date.now() - (RANGE_MS[r] || 36e5), Date.now()];
  },

  typeInfo() { return this.types.find((t) => t.ID === S["p.type"]); },

  async init() {
    if (!this.wired) this.wire();
    const [resp, series] = await Promise.all([
      querier("ProfileTypes", { start: 0, end: 0 }),
      getJson("/ui/api/series").then((r) => r.json()),
    ]);
    this.types = resp.profileTypes || [];
    this.seriesInfo = series;
    this.spanBanner();
    if (!this.types.length) {
      $("p-type").replaceChildren(el("option", { value: "" }, "(no profiles stored)"));
      flame.set(null, "");
      $("p-timeline").replaceChildren(el("p", { class: "empty" }, "No profiles stored."));
      return;
    }
    // Default: a CPU type when there is one.
    const def = (this.types.find((t) => t.sampleType === "cpu") || this.types[0]).ID;
    S["p.type"] = fillSelect($("p-type"), this.types.map((t) => [t.ID, `${t.name} · ${t.sampleType} (${t.sampleUnit})`]), S["p.type"] || def);
    if (S["p.q"] === undefined) {
      const svc = series.find((s) => s.profile_name === this.typeInfo()?.name);
      S["p.q"] = svc ? buildSelector([["service_name", "=", svc.service]]) : "{}";
    }
    $("p-query").value = S["p.q"];
    $("p-range").value = S["p.range"] || "1h";
    await this.labelNames();
    await this.load();
  },

  async labelNames() {
    const r = await querier("LabelNames", { matchers: [`{__profile_type__="${S["p.type"]}"}`], start: 0, end: 0 });
    const names = (r.names || []).filter((n) => !n.startsWith("__"));
    fillSelect($("p-label-name"), names, $("p-label-name").value || "service_name", "(label)");
    S["p.group"] = fillSelect($("p-group"), names, S["p.group"] || "", "(none)");
    await this.labelValues();
  },

  async labelValues() {
    const name = $("p-label-name").value;
    if (!name) { $("p-label-value").replaceChildren(el("option", { value: "" }, "(value)")); return; }
    const r = await querier("LabelValues", { name, matchers: [`{__profile_type__="${S["p.type"]}"}`], start: 0, end: 0 });
    fillSelect($("p-label-value"), r.names || [], "", "(value)");
  },

  chips() {
    const ms = parseMatchers(S["p.q"]);
    $("p-chips").replaceChildren(...ms.map((m, i) => el("span", { class: "chip", "data-label": m[0] },
      `${m[0]}${m[1]}"${m[2]}"`,
      el("button", { type: "button", title: "remove", onclick: () => {
        ms.splice(i, 1);
        S["p.q"] = buildSelector(ms);
        $("p-query").value = S["p.q"];
        this.load();
      } }, "×"))));
  },

  profileParams(from, until) {
    const t = this.typeInfo();
    const p = new URLSearchParams({ series: S["p.q"] || "{}", name: t.name, type: t.sampleType, from: String(Math.max(from, 0)), until: String(until) });
    return p;
  },

  /// Span ids the view is restricted to ("Profile of this span/trace"), or [].
  spans() { return (S["p.spans"] || "").split(",").map((x) => x.trim()).filter(Boolean); },

  /// The banner of the span mode: what is shown, back to the trace, or all samples.
  spanBanner() {
    const ids = this.spans();
    const b = $("p-span");
    if (!ids.length) { b.hidden = true; return; }
    b.replaceChildren(
      el("b", {}, "Profile of " + (S["p.what"] || "span " + ids.join(", "))),
      el("span", { class: "muted" }, ` — only samples labelled span_id=${ids.length > 3 ? ids.slice(0, 3).join(", ") + ` … (${ids.length} spans)` : ids.join(", ")}`),
      S["p.trace"] ? el("a", { id: "p-span-back", href: "?" + new URLSearchParams({ view: "traces", trace: S["p.trace"], ...(S.theme ? { theme: S.theme } : {}) }) }, "Back to the trace") : "",
      el("button", { type: "button", id: "p-span-clear", onclick: () => {
        for (const k of ["p.spans", "p.what", "p.trace"]) delete S[k];
        this.load().catch((e) => setStatus(e.message, true));
      } }, "Show all samples"));
    b.hidden = false;
  },

  async merge(from, until, selector) {
    const spans = this.spans();
    if (spans.length) {
      const r = await querier("SelectMergeSpanProfile", {
        profileTypeID: S["p.type"], labelSelector: S["p.q"] || "{}", spanSelector: spans, start: from, end: until, maxNodes: 8192,
      });
      return r.flamegraph ? treeFromLevels(r.flamegraph) : null;
    }
    const r = await querier("SelectMergeStacktraces", {
      profileTypeID: S["p.type"], labelSelector: selector || S["p.q"] || "{}", start: from, end: until, maxNodes: 8192,
    });
    return r.flamegraph ? treeFromLevels(r.flamegraph) : null;
  },

  async load() {
    saveUrl();
    this.chips();
    this.spanBanner();
    const t = this.typeInfo();
    if (!t) return;
    const spans = this.spans();
    // A span's samples have no timeline of their own, and no diff.
    $("p-timeline").hidden = spans.length > 0;
    $("p-diff").disabled = spans.length > 0;
    if (spans.length) $("p-diff").checked = false;
    else flame.emptyText = null;
    const unit = t.sampleUnit;
    const [start, end] = this.range();
    $("p-from").value = toLocalInput(start);
    $("p-until").value = toLocalInput(end);
    const step = Math.max(1, Math.round((end - start) / 1000 / 120));
    // The timeline: the selection summed, or one stacked series per value
    // of the group-by label (the 10 largest), as Pyroscope's group by.
    const group = S["p.group"] || "";
    const ts = await querier("SelectSeries", {
      profileTypeID: S["p.type"], labelSelector: S["p.q"] || "{}", start, end, step,
      groupBy: group ? [group] : [], ...(group ? { limit: 10 } : {}),
    });
    let groups;
    if (group) {
      groups = (ts.series || []).map((s, i) => {
        const lv = (s.labels || []).find((l) => l.name === group);
        const pts = (s.points || []).map((p) => [Number(p.timestamp), Number(p.value)]);
        return { value: lv ? lv.value : null, label: lv ? lv.value : `(no ${group})`, pts, total: pts.reduce((a, p) => a + p[1], 0) };
      });
      groups.sort((a, b) => b.total - a.total);
      groups.forEach((g, i) => { g.color = GROUP_COLORS[i % GROUP_COLORS.length]; });
    } else {
      const sum = new Map();
      for (const s of ts.series || []) for (const p of s.points || []) {
        const k = Number(p.timestamp);
        sum.set(k, (sum.get(k) || 0) + Number(p.value));
      }
      groups = [{ pts: [...sum.entries()] }];
    }
    this.legend(group, groups, unit);
    const box = $("p-timeline");
    box.dataset.unit = unit;
    box.dataset.step = String(step * 1000);
    const diff = $("p-diff").checked;
    $("p-diff-controls").hidden = !diff;
    const brushes = diff ? [["brush", fromLocalInput($("p-a-from").value), fromLocalInput($("p-a-until").value)],
      ["brush-b", fromLocalInput($("p-b-from").value), fromLocalInput($("p-b-until").value)]] : [];
    drawTimeline(box, groups, start, end, brushes, (a, b) => {
      if ($("p-diff").checked) {
        const which = document.querySelector('input[name="p-brush"]:checked').value;
        $(`p-${which}-from`).value = toLocalInput(a);
        $(`p-${which}-until`).value = toLocalInput(b);
      } else {
        S["p.range"] = "custom"; S["p.from"] = String(a); S["p.until"] = String(b);
        $("p-range").value = "custom";
      }
      this.load().catch((e) => setStatus(e.message, true));
    });
    const dl = $("p-download");
    if (diff) {
      if (!$("p-a-from").value) {
        const mid = Math.round((start + end) / 2);
        $("p-a-from").value = toLocalInput(start); $("p-a-until").value = toLocalInput(mid);
        $("p-b-from").value = toLocalInput(mid); $("p-b-until").value = toLocalInput(end);
        return this.load();
      }
      // Two ranges, two label sets, or both: each side its own selector.
      const selA = S["p.aq"] || S["p.q"] || "{}";
      const selB = S["p.bq"] || S["p.q"] || "{}";
      $("p-a-q").value = S["p.aq"] || "";
      $("p-b-q").value = S["p.bq"] || "";
      const [ra, rb] = await Promise.all([
        this.merge(fromLocalInput($("p-a-from").value), fromLocalInput($("p-a-until").value), selA),
        this.merge(fromLocalInput($("p-b-from").value), fromLocalInput($("p-b-until").value), selB),
      ]);
      const d = diffTree(ra, rb);
      flame.set(d, unit, { totalA: ra ? ra.total : 0, totalB: rb ? rb.total : 0 });
      sandwich.render();
      const side = (sel) => (selA !== selB ? ` ${sel}` : "");
      $("p-total").textContent = `A${side(selA)}: ${fmtUnit(ra ? ra.total : 0, unit)} · B${side(selB)}: ${fmtUnit(rb ? rb.total : 0, unit)} (red: larger share in B)`;
      this.table(null);
      dl.classList.add("disabled");
      dl.removeAttribute("href");
      return;
    }
    const root = await this.merge(start, end);
    // An honest empty state for a span: why it may have no samples.
    flame.emptyText = spans.length
      ? `No ${t.sampleType} samples carry span_id ${spans.join(", ")} between ${fmtTime(start)} and ${fmtTime(end)}. ` +
        "Samples are labelled with a span only while a profiled thread runs that span's work: the span may be shorter " +
        "than the sampling interval (about 10 ms at 99 Hz), may have waited rather than run on a CPU, or its process " +
        "is not profiled (or not profiled with span labels)."
      : null;
    flame.set(root, unit);
    this.table(root);
    sandwich.render();
    const total = root ? root.total : 0;
    $("p-total").textContent = total ? `Total ${fmtUnit(total, unit)} of ${t.sampleType}${spans.length ? (spans.length > 1 ? " in these spans" : " in this span") : ""}` : "";
    $("p-total").dataset.total = String(total);
    if (total > 0) {
      const params = this.profileParams(start, end);
      if (spans.length) params.set("span_id", spans.join(","));
      dl.href = "/ui/api/profile?" + params.toString();
      dl.setAttribute("download", "profile.pb.gz");
      dl.classList.remove("disabled");
      dl.removeAttribute("aria-disabled");
    } else {
      dl.removeAttribute("href");
      dl.classList.add("disabled");
      dl.setAttribute("aria-disabled", "true");
    }
    setStatus(total ? "" : spans.length ? "No samples carry this span." : "No samples of this type in the range for this selector.");
  },

  /// The group-by legend: each value's colour and total; a click selects it
  /// (adds the label to the selector).
  legend(group, groups, unit) {
    const box = $("p-legend");
    box.dataset.groups = group ? String(groups.length) : "";
    if (!group || this.spans().length) { box.hidden = true; box.replaceChildren(); return; }
    box.replaceChildren(el("span", { class: "muted" }, `by ${group}${groups.length >= 10 ? " (10 largest)" : ""}:`),
      ...groups.map((g) => el("button", {
        type: "button", class: "legend-item", "data-value": g.label, title: g.value === null ? "" : `select ${group}="${g.value}"`,
        onclick: () => {
          if (g.value === null) return;
          const ms = parseMatchers(S["p.q"]).filter((m) => m[0] !== group);
          ms.push([group, "=", g.value]);
          S["p.q"] = buildSelector(ms);
          $("p-query").value = S["p.q"];
          this.load().catch((e) => setStatus(e.message, true));
        },
      }, el("span", { class: "swatch", style: `background:${g.color}` }), `${g.label} `, el("span", { class: "muted" }, fmtUnit(g.total, unit)))));
    box.hidden = false;
  },

  table(root) {
    const tb = $("p-table").tBodies[0];
    if (!root) { tb.replaceChildren(); return; }
    const unit = this.typeInfo().sampleUnit;
    const rows = functionTable(root);
    const key = S["p.sort"] || "self";
    rows.sort((a, b) => (key === "name" ? a.name.localeCompare(b.name) : b[key] - a[key]));
    tb.replaceChildren(...rows.slice(0, 500).map((f) => el("tr", { "data-name": f.name, onclick: () => {
      $("p-search").value = "^" + f.name.replace(/[.*+?^${}()|[\]\\]/g, "\\$&") + "$";
      flame.render();
      sandwich.select(f.name);
    } },
      el("td", { class: "name" }, f.name),
      el("td", { class: "num" }, fmtUnit(f.self, unit)),
      el("td", { class: "num" }, pct(f.self, root.total)),
      el("td", { class: "num" }, fmtUnit(f.total, unit)),
      el("td", { class: "num" }, pct(f.total, root.total)))));
  },

  mode() {
    const m = S["p.mode"] || "both";
    $("p-body").className = "pbody" + (m === "flame" ? " flame-only" : m === "table" ? " table-only" : m === "sandwich" ? " sandwich" : "");
    for (const b of document.querySelectorAll("#p-mode button")) b.classList.toggle("on", b.dataset.mode === m);
  },

  wire() {
    this.wired = true;
    const reload = () => this.load().catch((e) => setStatus(e.message, true));
    $("p-type").addEventListener("change", async (e) => { S["p.type"] = e.target.value; await this.labelNames(); reload(); });
    $("p-label-name").addEventListener("change", () => this.labelValues());
    $("p-group").addEventListener("change", (e) => { S["p.group"] = e.target.value; reload(); });
    $("p-label-value").addEventListener("change", (e) => {
      const name = $("p-label-name").value;
      if (!name || !e.target.value) return;
      const ms = parseMatchers(S["p.q"]).filter((m) => m[0] !== name);
      ms.push([name, "=", e.target.value]);
      S["p.q"] = buildSelector(ms);
      $("p-query").value = S["p.q"];
      reload();
    });
    $("p-query").addEventListener("keydown", (e) => { if (e.key === "Enter") { S["p.q"] = $("p-query").value.trim() || "{}"; reload(); } });
    $("p-apply").addEventListener("click", () => {
      S["p.q"] = $("p-query").value.trim() || "{}";
      const a = fromLocalInput($("p-from").value);
      const b = fromLocalInput($("p-until").value);
      const [s0, e0] = this.range();
      if (S["p.range"] === "custom" || a !== s0 || b !== e0) {
        if (a && b && a < b) { S["p.range"] = "custom"; S["p.from"] = String(a); S["p.until"] = String(b); $("p-range").value = "custom"; }
      }
      reload();
    });
    $("p-range").addEventListener("change", (e) => { S["p.range"] = e.target.value; delete S["p.from"]; delete S["p.until"]; reload(); });
    $("p-diff").addEventListener("change", reload);
    for (const id of ["p-a-from", "p-a-until", "p-b-from", "p-b-until"]) $(id).addEventListener("change", reload);
    for (const [id, key] of [["p-a-q", "p.aq"], ["p-b-q", "p.bq"]]) {
      const set = () => { S[key] = $(id).value.trim(); reload(); };
      $(id).addEventListener("change", set);
      $(id).addEventListener("keydown", (e) => { if (e.key === "Enter") set(); });
    }
    $("p-ab-whole").addEventListener("click", () => {
      const [a, b] = this.range();
      for (const w of ["a", "b"]) { $(`p-${w}-from`).value = toLocalInput(a); $(`p-${w}-until`).value = toLocalInput(b); }
      reload();
    });
    $("p-topdown").checked = S["p.dir"] !== "up";
    $("p-topdown").addEventListener("change", (e) => { S["p.dir"] = e.target.checked ? "" : "up"; saveUrl(); flame.render(); });
    $("p-search").value = S["p.search"] || "";
    $("p-search").addEventListener("input", (e) => { S["p.search"] = e.target.value; saveUrl(); flame.render(); });
    $("p-reset").addEventListener("click", () => { flame.focus = flame.root; flame.render(); });
    for (const b of document.querySelectorAll("#p-mode button")) b.addEventListener("click", () => { S["p.mode"] = b.dataset.mode; saveUrl(); this.mode(); flame.render(); sandwich.render(); });
    for (const th of document.querySelectorAll("#p-table th[data-sort]")) th.addEventListener("click", () => { S["p.sort"] = th.dataset.sort; saveUrl(); this.load(); });
    this.mode();
    addEventListener("resize", () => { flame.render(); sandwich.render(); });
  },
};

// ---- traces view ----

/// Jaeger-style tags: `k=v k2="v w"` (logfmt) → JSON object.
function parseTags(s) {
  const out = {};
  const re = /([^\s=]+)=(?:"((?:[^"\\]|\\.)*)"|(\S*))/g;
  let m;
  let rest = s;
  while ((m = re.exec(s))) { out[m[1]] = m[2] !== undefined ? m[2] : m[3]; rest = rest.replace(m[0], ""); }
  if (rest.trim()) throw new Error(`tags: cannot read ${JSON.stringify(rest.trim())} (write key=value, space separated)`);
  return out;
}

const traces = {
  async init() {
    if (!this.wired) this.wire();
    const services = STATUS.trace_services;
    S["t.service"] = fillSelect($("t-service"), services, S["t.service"] ?? (services[0] || ""), "(all services)");
    await this.operations();
    $("t-tags").value = S["t.tags"] || "";
    $("t-min").value = S["t.min"] || "";
    $("t-max").value = S["t.max"] || "";
    $("t-errors").checked = S["t.errors"] === "true";
    $("t-range").value = S["t.range"] || "1h";
    $("t-limit").value = S["t.limit"] || "20";
    $("t-sort").value = S["t.sort"] || "newest";
    await this.search();
    if (S.trace) await this.open(S.trace);
  },

  async operations() {
    const svc = $("t-service").value;
    let ops = [];
    if (svc) {
      const r = await (await getJson("/api/services/" + encodeURIComponent(svc) + "/operations")).json();
      ops = [...new Set((r.data || []).map((o) => (typeof o === "string" ? o : o.name)))].sort();
    }
    S["t.op"] = fillSelect($("t-operation"), ops, S["t.op"] || "", "(all operations)");
  },

  form() {
    S["t.service"] = $("t-service").value;
    S["t.op"] = $("t-operation").value;
    S["t.tags"] = $("t-tags").value.trim();
    S["t.min"] = $("t-min").value.trim();
    S["t.max"] = $("t-max").value.trim();
    S["t.errors"] = $("t-errors").checked ? "true" : "";
    S["t.range"] = $("t-range").value;
    S["t.limit"] = $("t-limit").value;
    S["t.sort"] = $("t-sort").value;
  },

  async search() {
    const limit = Number(S["t.limit"] || 20);
    const page = Number(S["t.page"] || 0);
    const p = new URLSearchParams({ limit: String(limit), offset: String(page * limit) });
    if (S["t.service"]) p.set("service", S["t.service"]);
    if (S["t.op"]) p.set("operation", S["t.op"]);
    if (S["t.tags"]) p.set("tags", JSON.stringify(parseTags(S["t.tags"])));
    if (S["t.min"]) p.set("minDuration", S["t.min"]);
    if (S["t.max"]) p.set("maxDuration", S["t.max"]);
    if (S["t.errors"]) p.set("error", "true");
    if (S["t.range"] && S["t.range"] !== "all") p.set("range", S["t.range"]);
    if (S["t.sort"] && S["t.sort"] !== "newest") p.set("sort", S["t.sort"]);
    saveUrl();
    const r = await getJson("/ui/api/traces?" + p.toString());
    const total = Number(r.headers.get("x-total-count") || 0);
    const exact = r.headers.get("x-total-count-exact") !== "false";
    const list = await r.json();
    $("t-count").textContent = `${total.toLocaleString("en-US")}${exact ? "" : "+"} trace${total === 1 ? "" : "s"}`;
    $("t-count").dataset.total = String(total);
    const pages = Math.max(1, Math.ceil(total / limit));
    $("t-page").textContent = `page ${page + 1} of ${pages}`;
    $("t-prev").disabled = page === 0;
    $("t-next").disabled = page + 1 >= pages;
    const tbody = $("t-results").tBodies[0];
    tbody.replaceChildren(...list.map((t) => {
      const tr = el("tr", { "data-trace": t.trace_id, onclick: () => this.open(t.trace_id) },
        el("td", {}, fmtTime(t.start_unix_ms)),
        el("td", {}, `${t.service}: ${t.root_name}`),
        el("td", {}, t.services.join(", ")),
        el("td", { class: "num" }, fmtMs(t.duration_ms)),
        el("td", { class: "num" }, t.span_count));
      if (t.error) tr.classList.add("error");
      if (t.trace_id === S.trace) tr.classList.add("selected");
      return tr;
    }));
    if (!list.length) tbody.append(el("tr", {}, el("td", { colspan: "5", class: "muted" }, "No traces match.")));
  },

  async open(id) {
    id = id.trim().toLowerCase();
    S.trace = id;
    saveUrl();
    for (const r of document.querySelectorAll("#t-results tr")) r.classList.toggle("selected", r.dataset.trace === id);
    const wf = $("waterfall");
    $("span-detail").hidden = true;
    let t;
    try {
      t = await (await getJson("/ui/api/traces/" + encodeURIComponent(id))).json();
    } catch (e) {
      wf.replaceChildren(el("p", { class: "empty" }, e.message));
      wf.dataset.state = "error";
      $("trace-title").textContent = "";
      $("trace-profile").hidden = true;
      return;
    }
    this.trace = t;
    this.prof = null;
    this.selected = null;
    this.collapsed = new Set();
    this.render();
    await this.loadProfiles(t);
  },

  /// Which spans of the trace have profile samples (span_id sample labels),
  /// per profile type: marks them in the waterfall and links their flame
  /// graphs.
  async loadProfiles(t) {
    let r;
    try {
      r = await (await getJson("/ui/api/traces/" + encodeURIComponent(t.summary.trace_id) + "/profiles")).json();
    } catch (e) {
      setStatus("profile samples of this trace: " + e.message, true);
      return;
    }
    if (this.trace !== t) return;
    // CPU first (what a span's profile means in Pyroscope and Grafana; an
    // off-CPU type's blocked time may be larger), else the largest type.
    this.prof = { from: r.from_ms, until: r.until_ms, type: r.types.find((x) => x.sample_type === "cpu") || r.types[0] || null };
    this.render();
    const sel = this.selected && document.querySelector(`#waterfall .wf-row[data-span="${this.selected}"]`);
    const span = this.selected && t.spans.find((s) => s.span_id === this.selected);
    if (sel && span) this.detail(span, sel);
    $("waterfall").dataset.profiles = r.types.length ? "yes" : "no";
  },

  /// The profile id a span names (`pyroscope.profile.id`, a span id), if any.
  profileId(s) {
    const a = s.attributes.find(([k]) => k === "pyroscope.profile.id");
    return a && /^[0-9a-fA-F]{16}$/.test(a[1]) ? a[1].toLowerCase() : null;
  },

  /// The span's samples' total in the trace's main profile type (0: none).
  spanTotal(s) {
    const spans = this.prof && this.prof.type ? this.prof.type.spans : {};
    const id = this.profileId(s);
    return (spans[s.span_id] || 0) + (id && id !== s.span_id ? spans[id] || 0 : 0);
  },

  /// A Profiles view link: the flame graph of the samples labelled with
  /// `ids` over the trace's range.
  profileHref(ids, what) {
    const t = this.trace;
    const from = this.prof ? this.prof.from : Math.floor(t.summary.start_unix_nano / 1e6) - 15000;
    const until = this.prof ? this.prof.until : Math.ceil(t.summary.end_unix_nano / 1e6) + 15000;
    const p = new URLSearchParams({ view: "profiles", "p.spans": ids.join(","), "p.what": what, "p.trace": t.summary.trace_id,
      "p.q": "{}", "p.range": "custom", "p.from": String(from), "p.until": String(until) });
    if (this.prof && this.prof.type) p.set("p.type", this.prof.type.type_id);
    if (S.theme) p.set("theme", S.theme);
    return "?" + p.toString();
  },

  render() {
    const t = this.trace;
    const wf = $("waterfall");
    const total = Math.max(t.summary.end_unix_nano - t.summary.start_unix_nano, 1) / 1e6;
    $("trace-title").textContent = `${t.summary.root_name} · ${t.summary.trace_id} · ${fmtMs(total)} · ${t.spans.length} spans`;
    // Profile of this trace: every span id with samples, and those named by pyroscope.profile.id.
    const ty = this.prof && this.prof.type;
    const profIds = new Set(Object.keys(ty ? ty.spans : {}).filter((k) => k));
    for (const s of t.spans) { const id = this.profileId(s); if (id) profIds.add(id); }
    const tl = $("trace-profile");
    if (profIds.size) {
      tl.href = this.profileHref([...profIds].sort(), `trace ${t.summary.trace_id} (${t.summary.root_name})`);
      // The samples of its spans (those labelled with the trace only are no span's).
      const spansTotal = ty ? Object.entries(ty.spans).reduce((a, [k, v]) => a + (k ? v : 0), 0) : 0;
      tl.textContent = "Profile of this trace" + (spansTotal ? ` (${fmtUnit(spansTotal, ty.unit)} ${ty.sample_type})` : "");
      tl.hidden = false;
    } else tl.hidden = true;
    const ids = new Set(t.spans.map((s) => s.span_id));
    const children = new Map();
    const roots = [];
    for (const s of t.spans) {
      if (s.parent_span_id && ids.has(s.parent_span_id)) {
        if (!children.has(s.parent_span_id)) children.set(s.parent_span_id, []);
        children.get(s.parent_span_id).push(s);
      } else roots.push(s);
    }
    const rows = [];
    // The ruler: 5 ticks over the trace's duration.
    const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) => el("span", { class: "wf-tick", style: `left:${f * 100}%` }, fmtMs(f * total)));
    rows.push(el("div", { class: "wf-ruler" }, el("div", { class: "wf-label" }, "Service · operation"), el("div", { class: "wf-ticks" }, ...ticks)));
    const walk = (s, depth) => {
      const kids = children.get(s.span_id) || [];
      const closed = this.collapsed.has(s.span_id);
      const left = (100 * s.offset_ms) / total;
      const width = Math.max((100 * s.duration_ms) / total, 0.15);
      // The duration after the bar, or before it when the bar ends near the right edge.
      const after = left + width < 80;
      const time = after
        ? el("span", { class: "wf-time", style: `left:${left + width}%` }, fmtMs(s.duration_ms))
        : el("span", { class: "wf-time", style: `right:${100 - left}%` }, fmtMs(s.duration_ms));
      const events = s.events.map((e) => el("span", { class: "wf-event", title: e.name, style: `left:${(100 * (s.offset_ms + e.offset_ms)) / total}%` }));
      const spanTotal = this.spanTotal(s);
      const mark = spanTotal > 0 ? el("span", { class: "wf-prof", title: `profile: ${fmtUnit(spanTotal, ty.unit)} of ${ty.sample_type} samples in this span` }) : "";
      const caret = el("span", { class: "wf-caret" }, kids.length ? (closed ? "▸" : "▾") : "");
      if (kids.length) caret.addEventListener("click", (e) => { e.stopPropagation(); this.toggle(s.span_id); });
      const row = el("div", { class: "wf-row" + (s.span_id === this.selected ? " selected" : ""), "data-span": s.span_id, "data-profile": spanTotal > 0 ? String(spanTotal) : null, title: `${s.name} (${s.kind}, ${s.status}) ${fmtMs(s.duration_ms)} at +${fmtMs(s.offset_ms)}` },
        el("div", { class: "wf-label", style: `padding-left:${4 + depth * 14}px` },
          caret, mark, el("span", { class: "svc" }, s.service + " "), s.name, kids.length && closed ? el("span", { class: "svc" }, ` (+${this.count(s.span_id, children)})`) : ""),
        el("div", { class: "wf-track" },
          el("div", { class: "wf-bar" + (s.status === "error" ? " error" : ""), style: `left:${left}%;width:${width}%` }),
          ...events, time));
      row.addEventListener("click", () => this.detail(s, row));
      rows.push(row);
      if (!closed) for (const c of kids) walk(c, depth + 1);
    };
    for (const r of roots) walk(r, 0);
    wf.replaceChildren(...rows);
    wf.dataset.state = "ok";
    this.children = children;
  },

  count(id, children) {
    let n = 0;
    for (const c of children.get(id) || []) n += 1 + this.count(c.span_id, children);
    return n;
  },

  toggle(id) {
    if (this.collapsed.has(id)) this.collapsed.delete(id);
    else this.collapsed.add(id);
    this.render();
  },

  detail(s, row) {
    for (const r of document.querySelectorAll(".wf-row.selected")) r.classList.remove("selected");
    row.classList.add("selected");
    this.selected = s.span_id;
    // Profile of this span: when it names a profile (pyroscope.profile.id)
    // or samples carry its id.
    const ty = this.prof && this.prof.type;
    const spanTotal = this.spanTotal(s);
    const pid = this.profileId(s);
    const ids = [...new Set([s.span_id, pid].filter((x) => x && (x === pid || (ty && ty.spans[x]))))];
    const profLink = ids.length
      ? el("p", { class: "span-profile" }, el("a", { id: "span-profile", href: this.profileHref(ids, `span ${s.service}: ${s.name} (${ids.join(", ")})`) },
        "Profile of this span"), " ", el("span", { class: "muted" }, spanTotal > 0 ? `${fmtUnit(spanTotal, ty.unit)} of ${ty.sample_type} samples` : (this.prof ? "no samples found yet" : "")))
      : "";
    const kv = (rows) => el("table", {}, el("tbody", {}, ...rows.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v)))));
    const d = $("span-detail");
    d.replaceChildren(
      el("h3", {}, `${s.service}: ${s.name}`),
      profLink,
      kv([["kind", s.kind], ["status", s.status + (s.status_message ? ": " + s.status_message : "")],
        ["start", fmtTime(s.start_unix_nano / 1e6)], ["duration", fmtMs(s.duration_ms)], ["offset", "+" + fmtMs(s.offset_ms)],
        ["span id", s.span_id], ["parent", s.parent_span_id || "(root)"], ["scope", s.scope]]),
      el("h3", {}, "Attributes"), kv(s.attributes),
      ...(s.events.length ? [el("h3", {}, `Events (${s.events.length})`), ...s.events.map((e) => el("div", { class: "event" },
        el("b", {}, `+${fmtMs(e.offset_ms)} ${e.name}`), kv(e.attributes)))] : []),
      el("h3", {}, "Resource"), kv(s.resource));
    d.hidden = false;
  },

  wire() {
    this.wired = true;
    const run = (resetPage) => {
      this.form();
      if (resetPage) S["t.page"] = "";
      this.search().catch((e) => setStatus(e.message, true));
    };
    $("t-service").addEventListener("change", async () => { S["t.op"] = ""; S["t.service"] = $("t-service").value; await this.operations(); run(true); });
    $("t-find").addEventListener("click", () => { setStatus(""); run(true); });
    for (const id of ["t-tags", "t-min", "t-max"]) $(id).addEventListener("keydown", (e) => { if (e.key === "Enter") run(true); });
    for (const id of ["t-sort", "t-limit", "t-operation", "t-errors", "t-range"]) $(id).addEventListener("change", () => run(true));
    $("t-prev").addEventListener("click", () => { S["t.page"] = String(Math.max(0, Number(S["t.page"] || 0) - 1)); run(false); });
    $("t-next").addEventListener("click", () => { S["t.page"] = String(Number(S["t.page"] || 0) + 1); run(false); });
    const openId = () => { const v = $("t-id").value.trim(); if (v) this.open(v); };
    $("t-open").addEventListener("click", openId);
    $("t-id").addEventListener("keydown", (e) => { if (e.key === "Enter") openId(); });
    $("wf-expand").addEventListener("click", () => { if (this.trace) { this.collapsed.clear(); this.render(); } });
    $("wf-collapse").addEventListener("click", () => {
      if (!this.trace) return;
      for (const id of this.children.keys()) this.collapsed.add(id);
      this.render();
    });
  },
};

// ---- metrics view ----

/// A metric's chart over the view's range [from, until] (unix ms), so a
/// series that stopped or started within it shows where: the time axis is
/// the range's, not the points'.
function chart(points, series, unit, from, until) {
  const W = 400;
  const H = 90;
  const pad = { l: 58, r: 4, t: 4, b: 14 };
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
  const all = series.flatMap(([, pts]) => pts.map((p) => p[1])).filter((v) => Number.isFinite(v));
  if (!points.length || !all.length) return svg;
  const t0 = Math.min(from, points[0].t);
  const t1 = Math.max(until, points[points.length - 1].t, t0 + 1);
  svg.dataset.from = String(t0);
  svg.dataset.until = String(t1);
  // The plot area (what the time axis spans).
  svg.append(svgEl("rect", { class: "plot", x: pad.l, y: pad.t, width: W - pad.l - pad.r, height: H - pad.t - pad.b }));
  const lo = Math.min(0, ...all);
  const hi = Math.max(...all, lo + 1e-12);
  const X = (t) => pad.l + ((t - t0) / (t1 - t0)) * (W - pad.l - pad.r);
  const Y = (v) => H - pad.b - ((v - lo) / (hi - lo)) * (H - pad.t - pad.b);
  svg.append(svgEl("text", { class: "axis", x: 2, y: pad.t + 8 }, fmtMetric(hi, unit)));
  svg.append(svgEl("text", { class: "axis", x: 2, y: H - pad.b }, fmtMetric(lo, unit)));
  svg.append(svgEl("text", { class: "axis", x: pad.l, y: H - 2 }, fmtClock(t0)));
  svg.append(svgEl("text", { class: "axis", x: W - pad.r, y: H - 2, "text-anchor": "end" }, fmtClock(t1)));
  for (const [cls, pts] of series) {
    const ok = pts.filter((p) => Number.isFinite(p[1]));
    if (!ok.length) continue;
    const d = ok.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
    svg.append(svgEl("path", { class: cls, d: ok.length === 1 ? d + `h2` : d }));
  }
  return svg;
}

const metrics = {
  async load() {
    if (!this.wired) this.wire();
    const services = STATUS.metric_services;
    S["m.service"] = fillSelect($("m-service"), services, S["m.service"] || "", "(all services)");
    $("m-name").value = S["m.name"] || "";
    $("m-range").value = S["m.range"] || "1h";
    const p = new URLSearchParams();
    if (S["m.service"]) p.set("service", S["m.service"]);
    if (S["m.name"]) p.set("name", S["m.name"]);
    // The range as absolute times: the charts' time axis is exactly what was asked.
    const r = S["m.range"] || "1h";
    const until = Date.now();
    if (r !== "all") {
      p.set("from", String(until - (RANGE_MS[r] || 36e5)));
      p.set("until", String(until));
    }
    saveUrl();
    const rows = await (await getJson("/ui/api/metrics?" + p.toString())).json();
    // "all": from the oldest point shown.
    const from = r !== "all" ? until - (RANGE_MS[r] || 36e5)
      : Math.min(until, ...rows.flatMap((m) => (m.points.length ? [m.points[0].t] : [])));
    const list0 = $("m-list");
    list0.dataset.from = String(from);
    list0.dataset.until = String(until);
    $("m-count").textContent = `${rows.length} series`;
    $("m-count").dataset.count = String(rows.length);
    const list = $("m-list");
    if (!rows.length) { list.replaceChildren(el("p", { class: "empty" }, "No metrics match.")); return; }
    list.replaceChildren(...rows.map((m) => {
      const pts = m.points;
      let series;
      let value;
      let what;
      if (m.kind === "histogram") {
        series = [["line", pts.map((p) => [p.t, p.p50 ?? NaN])], ["line2", pts.map((p) => [p.t, p.p99 ?? NaN])]];
        value = `p50 ${fmtMetric(m.p50, m.unit)} · p99 ${fmtMetric(m.p99, m.unit)}`;
        what = `histogram · ${m.count ?? "–"} observations · p50 (blue) / p99 (orange) per interval`;
      } else if (m.kind === "counter") {
        // Per-second rate between points (resets read as a restart).
        const rate = [];
        for (let i = 1; i < pts.length; i++) {
          const dv = pts[i].v - pts[i - 1].v;
          const dt = (pts[i].t - pts[i - 1].t) / 1000;
          if (dt > 0) rate.push([pts[i].t, (dv >= 0 ? dv : pts[i].v) / dt]);
        }
        series = [["line", rate]];
        value = fmtMetric(m.value, m.unit);
        what = `counter · rate per second${m.unit ? " (" + m.unit + "/s)" : ""}`;
      } else {
        series = [["line", pts.map((p) => [p.t, p.v])]];
        value = fmtMetric(m.value, m.unit);
        what = "gauge";
      }
      return el("div", { class: "panel metric", "data-metric": m.name, title: m.help },
        el("div", { class: "mname" }, m.name),
        el("div", { class: "mlabels" }, m.labels.map(([k, v]) => `${k}="${v}"`).join(", ")),
        el("div", { class: "mvalue" }, value, m.current ? "" : el("span", { class: "stale" }, ` (last update ${fmtTime(m.last_ms)})`)),
        el("div", { class: "muted" }, `${what} · ${pts.length} point${pts.length === 1 ? "" : "s"}`),
        chart(pts, series, m.unit, from, until));
    }));
  },

  wire() {
    this.wired = true;
    const run = () => {
      S["m.service"] = $("m-service").value;
      S["m.name"] = $("m-name").value.trim();
      S["m.range"] = $("m-range").value;
      this.load().catch((e) => setStatus(e.message, true));
    };
    $("m-apply").addEventListener("click", run);
    $("m-service").addEventListener("change", run);
    $("m-range").addEventListener("change", run);
    $("m-name").addEventListener("keydown", (e) => { if (e.key === "Enter") run(); });
  },
};

showView(S.view);
