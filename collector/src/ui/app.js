// Fathom collector UI: vanilla JS over /ui/api/*. State lives in the URL
// (?service=&series=|name=&type=&range=&trace=) so a view can be linked.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const state = {
  service: params.get("service") || "",
  series: params.get("series") || "",
  name: params.get("name") || "",
  type: params.get("type") || "",
  range: params.get("range") || "all",
  trace: params.get("trace") || "",
};

function setStatus(msg, isError) {
  const s = $("status");
  s.textContent = msg || "";
  s.className = isError ? "error" : "";
}

function saveUrl() {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(state)) if (v) p.set(k, v);
  history.replaceState(null, "", "?" + p.toString());
}

async function getJson(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error((await r.text()).trim() || r.statusText);
  return r.json();
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function fmtNum(v) {
  if (v === null || v === undefined) return "";
  if (Number.isInteger(v)) return v.toLocaleString("en-US");
  const a = Math.abs(v);
  return a !== 0 && (a < 0.001 || a >= 1e9) ? v.toExponential(3) : v.toPrecision(4).replace(/\.?0+$/, "");
}

function fmtMs(ms) {
  if (ms < 1) return (ms * 1000).toFixed(0) + " µs";
  if (ms < 1000) return ms.toFixed(ms < 10 ? 2 : 1) + " ms";
  return (ms / 1000).toFixed(2) + " s";
}

function fmtTime(ms) {
  const d = new Date(ms);
  return d.toLocaleDateString("en-CA") + " " + d.toLocaleTimeString("en-GB", { hour12: false }) +
    "." + String(Math.floor(ms % 1000)).padStart(3, "0");
}

/// Records where a section is drawn (for tests and debugging).
function markRect(e) {
  const r = e.getBoundingClientRect();
  e.dataset.rect = [r.left, r.top, r.width, r.height].map(Math.round).join(",");
}

// ---- profiles ----

let seriesList = [];

function profileParams() {
  const p = new URLSearchParams();
  if (state.series) p.set("series", state.series);
  else {
    p.set("service", state.service);
    if (state.name) p.set("name", state.name);
  }
  if (state.type) p.set("type", state.type);
  if (state.range && state.range !== "all") p.set("range", state.range);
  return p;
}

async function loadServices() {
  const services = await getJson("/ui/api/services");
  const sel = $("service");
  sel.replaceChildren(...services.map((s) => el("option", { value: s.name }, s.name)));
  if (!services.length) {
    sel.append(el("option", { value: "" }, "(nothing stored yet)"));
    state.service = "";
  } else if (!services.some((s) => s.name === state.service)) {
    const withProfiles = services.find((s) => s.profile_series > 0);
    state.service = (withProfiles || services[0]).name;
  }
  sel.value = state.service;
}

async function loadSeries() {
  seriesList = state.service ? await getJson("/ui/api/series?service=" + encodeURIComponent(state.service)) : [];
  const sel = $("series");
  const opts = [];
  const names = [...new Set(seriesList.map((s) => s.profile_name))];
  for (const n of names) opts.push(el("option", { value: "name:" + n }, `${n} — all series`));
  for (const s of seriesList) opts.push(el("option", { value: "series:" + s.selector }, s.selector));
  if (!opts.length) opts.push(el("option", { value: "" }, "(no profiles)"));
  sel.replaceChildren(...opts);
  if (state.series && seriesList.some((s) => s.selector === state.series)) sel.value = "series:" + state.series;
  else {
    state.series = "";
    if (!names.includes(state.name)) state.name = names[0] || "";
    sel.value = state.name ? "name:" + state.name : "";
  }
  // Value types of the chosen series (or the first of the profile name).
  const chosen = seriesList.find((s) => (state.series ? s.selector === state.series : s.profile_name === state.name));
  const types = chosen ? chosen.sample_types.split(",").map((t) => t.split("/")[0]) : [];
  $("type").replaceChildren(...types.map((t) => el("option", { value: t }, t)));
  if (!types.includes(state.type)) state.type = types.length ? types[types.length - 1] : "";
  $("type").value = state.type;
}

async function loadProfile() {
  const flame = $("flame");
  const tbody = $("top").tBodies[0];
  if (!state.service && !state.series) {
    flame.replaceChildren(el("p", { class: "empty" }, "No profiles stored."));
    tbody.replaceChildren();
    return;
  }
  const p = profileParams();
  $("download").href = "/ui/api/profile?" + p.toString();
  let top;
  try {
    top = await getJson("/ui/api/top?limit=40&" + p.toString());
  } catch (e) {
    flame.replaceChildren(el("p", { class: "empty" }, "No flame graph: " + e.message));
    tbody.replaceChildren();
    flame.dataset.state = "empty";
    return;
  }
  const width = Math.max(400, Math.floor(flame.clientWidth));
  const frame = el("iframe", { title: "flame graph", src: `/ui/api/flamegraph.svg?width=${width}&` + p.toString() });
  frame.addEventListener("load", () => {
    const svg = frame.contentDocument && frame.contentDocument.documentElement;
    const h = svg && parseInt(svg.getAttribute("height"), 10);
    if (h > 0) frame.style.height = Math.min(h, 600) + "px";
    flame.dataset.state = "ok";
    markRect(flame);
  });
  flame.replaceChildren(frame);
  const total = top.total || 1;
  tbody.replaceChildren(...top.functions.map((f) => el("tr", {},
    el("td", { class: "num" }, fmtNum(f.flat)),
    el("td", { class: "num" }, (100 * f.flat / total).toFixed(1) + "%"),
    el("td", { class: "num" }, fmtNum(f.cum)),
    el("td", { class: "num" }, (100 * f.cum / total).toFixed(1) + "%"),
    el("td", { class: "name" }, f.name))));
  setStatus(`${top.windows} profile window(s) of ${top.series.length} series, total ${fmtNum(top.total)} ${top.unit}`);
}

// ---- traces ----

async function loadTraces() {
  const p = new URLSearchParams({ limit: "100" });
  if (state.service) p.set("service", state.service);
  if (state.range && state.range !== "all") p.set("range", state.range);
  const traces = await getJson("/ui/api/traces?" + p.toString());
  const tbody = $("traces").tBodies[0];
  tbody.replaceChildren(...traces.map((t) => {
    const tr = el("tr", { "data-trace": t.trace_id, onclick: () => selectTrace(t.trace_id) },
      el("td", {}, fmtTime(t.start_unix_ms)),
      el("td", {}, t.root_name),
      el("td", {}, t.service),
      el("td", { class: "num" }, fmtMs(t.duration_ms)),
      el("td", { class: "num" }, t.span_count));
    if (t.error) tr.classList.add("error");
    return tr;
  }));
  if (!state.trace && traces.length) state.trace = traces[0].trace_id;
  if (!traces.length && !state.trace) {
    $("waterfall").replaceChildren(el("p", { class: "empty" }, "No traces stored for this service."));
  }
}

function selectTrace(id) {
  state.trace = id;
  saveUrl();
  loadTrace().catch((e) => setStatus(e.message, true));
}

/// Spans in tree order (children after their parent, by start), with depth.
function treeOrder(spans) {
  const ids = new Set(spans.map((s) => s.span_id));
  const children = new Map();
  const roots = [];
  for (const s of spans) {
    if (s.parent_span_id && ids.has(s.parent_span_id)) {
      if (!children.has(s.parent_span_id)) children.set(s.parent_span_id, []);
      children.get(s.parent_span_id).push(s);
    } else roots.push(s);
  }
  const out = [];
  const walk = (s, depth) => {
    out.push([s, depth]);
    for (const c of children.get(s.span_id) || []) walk(c, depth + 1);
  };
  for (const r of roots) walk(r, 0);
  return out;
}

function showSpan(s, row) {
  for (const r of document.querySelectorAll(".wf-row.selected")) r.classList.remove("selected");
  row.classList.add("selected");
  const d = $("span-detail");
  const rows = [
    ["name", s.name], ["service", s.service], ["kind", s.kind],
    ["status", s.status + (s.status_message ? ": " + s.status_message : "")],
    ["start", fmtTime(s.start_unix_nano / 1e6)], ["duration", fmtMs(s.duration_ms)],
    ["span id", s.span_id], ["parent", s.parent_span_id || "(root)"], ["scope", s.scope],
    ...s.attributes.map(([k, v]) => [k, v]),
    ...s.events.map((e) => ["event", e]),
    ...s.resource.map(([k, v]) => ["resource " + k, v]),
  ];
  d.replaceChildren(el("table", {}, el("tbody", {}, ...rows.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v))))));
  d.hidden = false;
}

async function loadTrace() {
  const wf = $("waterfall");
  $("span-detail").hidden = true;
  for (const r of document.querySelectorAll("#traces tr.selected")) r.classList.remove("selected");
  if (!state.trace) return;
  const row = document.querySelector(`#traces tr[data-trace="${state.trace}"]`);
  if (row) row.classList.add("selected");
  let t;
  try {
    t = await getJson("/ui/api/traces/" + encodeURIComponent(state.trace));
  } catch (e) {
    wf.replaceChildren(el("p", { class: "empty" }, e.message));
    return;
  }
  const total = Math.max(t.summary.end_unix_nano - t.summary.start_unix_nano, 1) / 1e6;
  $("trace-title").textContent = `${t.summary.root_name} · ${t.summary.trace_id} · ${fmtMs(total)}`;
  wf.replaceChildren(...treeOrder(t.spans).map(([s, depth]) => {
    const left = (100 * s.offset_ms) / total;
    const width = Math.max((100 * s.duration_ms) / total, 0.2);
    const title = `${s.name} (${s.kind}, ${s.status}) ${fmtMs(s.duration_ms)} at +${fmtMs(s.offset_ms)}`;
    const row = el("div", { class: "wf-row", title },
      el("div", { class: "wf-label", style: `padding-left:${8 + depth * 14}px` },
        s.name, " ", el("span", { class: "svc" }, `${s.service} · ${s.kind}`)),
      el("div", { class: "wf-track" },
        el("div", { class: "wf-bar" + (s.status === "error" ? " error" : ""), style: `left:${left}%;width:${width}%` }),
        // The duration after the bar, or inside its end when there is no room.
        left + width > 82
          ? el("span", { class: "wf-time inside", style: `right:${Math.max(100 - left - width, 0)}%` }, fmtMs(s.duration_ms))
          : el("span", { class: "wf-time", style: `left:${left + width}%` }, fmtMs(s.duration_ms))));
    row.addEventListener("click", () => showSpan(s, row));
    return row;
  }));
  wf.dataset.state = "ok";
  markRect(wf);
}

// ---- metrics ----

async function loadMetrics() {
  const rows = await getJson("/ui/api/metrics");
  const tbody = $("metrics").tBodies[0];
  if (!rows.length) {
    tbody.replaceChildren(el("tr", {}, el("td", { colspan: "6", class: "muted" }, "No metrics.")));
    return;
  }
  tbody.replaceChildren(...rows.map((m) => el("tr", { title: m.help },
    el("td", { class: "name" }, m.name),
    el("td", { class: "name" }, m.labels.map(([k, v]) => `${k}="${v}"`).join(", ")),
    el("td", { class: "num" }, fmtNum(m.value)),
    el("td", { class: "num" }, m.count === null ? "" : fmtNum(m.count)),
    el("td", { class: "num" }, m.p50 === null ? "" : fmtNum(m.p50)),
    el("td", { class: "num" }, m.p99 === null ? "" : fmtNum(m.p99)))));
}

// ---- wiring ----

async function refresh() {
  setStatus("loading…");
  try {
    await loadServices();
    await loadSeries();
    saveUrl();
    const results = await Promise.allSettled([
      loadProfile(),
      loadTraces().then(loadTrace),
      loadMetrics(),
    ]);
    const failed = results.find((r) => r.status === "rejected");
    if (failed) setStatus(failed.reason.message, true);
    else if ($("status").textContent === "loading…") setStatus("");
    saveUrl();
  } catch (e) {
    setStatus(e.message, true);
  }
  document.body.dataset.loaded = "true";
}

$("range").value = state.range;
$("service").addEventListener("change", (e) => {
  state.service = e.target.value;
  state.series = "";
  state.trace = "";
  refresh();
});
$("series").addEventListener("change", (e) => {
  const v = e.target.value;
  state.series = v.startsWith("series:") ? v.slice(7) : "";
  state.name = v.startsWith("name:") ? v.slice(5) : state.name;
  refresh();
});
$("type").addEventListener("change", (e) => { state.type = e.target.value; refresh(); });
$("range").addEventListener("change", (e) => { state.range = e.target.value; state.trace = ""; refresh(); });
$("refresh").addEventListener("click", refresh);
refresh();
