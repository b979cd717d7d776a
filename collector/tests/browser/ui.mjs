// Drives the collector's UI in headless Chromium (run by
// collector/tests/ui.rs: BASE, PHASE = empty | data | diff, EXPECT (JSON), SHOTS,
// CHROMIUM). Every check compares what the page shows with what the test
// sent; a failed check exits 1.
import { chromium } from "playwright-core";
import { join } from "node:path";

const BASE = process.env.BASE;
const PHASE = process.env.PHASE;
const EXPECT = JSON.parse(process.env.EXPECT || "{}");
const SHOTS = process.env.SHOTS;

let failures = 0;
function check(ok, what, got) {
  if (ok) console.log("  ok   " + what);
  else { failures++; console.log("  FAIL " + what + (got === undefined ? "" : " — got " + JSON.stringify(got))); }
}

// launch() gives Chromium a fresh temporary profile (--user-data-dir) of
// its own and removes it on close.
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});

async function page(scheme) {
  const ctx = await browser.newContext({ viewport: { width: 1500, height: 1000 }, colorScheme: scheme || "light" });
  const p = await ctx.newPage();
  p.on("pageerror", (e) => { failures++; console.log("  FAIL page error: " + e.message); });
  return p;
}
async function open(p, query) {
  await p.goto(BASE + "/" + query);
  await p.waitForSelector('body[data-loaded="true"]', { timeout: 20000 });
}
const shot = (p, name) => p.screenshot({ path: join(SHOTS, name + ".png"), fullPage: true });
const text = (p, sel) => p.locator(sel).first().innerText();
async function status(p, url) { return p.evaluate(async (u) => (await fetch(u)).status, url); }
async function settle(p) { await p.waitForTimeout(400); }
// The page's own local-time form of `ms` as a datetime-local input holds
// it: the HTML spec's normalized string, which drops the seconds when they
// are zero. Playwright checks that what it types reads back the same
// ("Malformed value" otherwise), so that is the form to type and expect.
async function localValue(p, ms) {
  const v = await p.evaluate((m) => toLocalInput(m), ms);
  return v.endsWith(":00") && v.length === 19 ? v.slice(0, 16) : v;
}
async function fillTime(p, sel, ms) { await p.fill(sel, await localValue(p, ms)); }
/// Waits (up to 5 s) for `sel`'s data-`attr` to be `want`, then checks it.
async function expectAttr(p, sel, attr, want, what) {
  await p.waitForFunction(([s, a, w]) => document.querySelector(s)?.getAttribute(a) === w, [sel, attr, String(want)], { timeout: 5000 }).catch(() => {});
  const got = await p.locator(sel).getAttribute(attr);
  check(got === String(want), what, got);
}

/// Dark mode has no white box: the panels named in `sels` have a dark
/// background, and so has the whole page, seen at points 16 px apart (top
/// to bottom, scrolling): at each, the colour of the topmost element (an
/// SVG shape's fill, or the background of it or its nearest ancestor that
/// has one) is near-white (every channel over 200) at under 1% of points.
async function darkChecks(p, view, sels) {
  const bgs = await p.evaluate((ss) => ss.map((s) => {
    const n = document.querySelector(s);
    return [s, n && n.checkVisibility() ? getComputedStyle(n).backgroundColor : "missing or hidden"];
  }), sels);
  // Opaque and dark (a transparent panel would show whatever is below).
  const dark = (c) => { const v = (c.match(/[\d.]+/g) || []).map(Number); return v.length >= 3 && (v.length < 4 || v[3] === 1) && v[0] + v[1] + v[2] < 200; };
  check(bgs.every(([, c]) => dark(c)), `${view} dark: ${sels.join(", ")} are dark`, bgs);
  const seen = await p.evaluate(async () => {
    const rgba = (c) => (c.match(/[\d.]+/g) || []).map(Number);
    const opaque = (v) => v.length >= 3 && (v.length < 4 || v[3] > 0.5);
    const colourAt = (n) => {
      for (; n && n.nodeType === 1; n = n.parentElement) {
        const st = getComputedStyle(n);
        if (n instanceof SVGElement && !(n instanceof SVGSVGElement) && st.fill !== "none" && Number(st.opacity) > 0.5) {
          const f = rgba(st.fill);
          if (opaque(f)) return [f, n];
        }
        const b = rgba(st.backgroundColor);
        if (opaque(b)) return [b, n];
      }
      return [rgba(getComputedStyle(document.documentElement).backgroundColor), document.documentElement];
    };
    const name = (n) => n.tagName.toLowerCase() + (n.id ? "#" + n.id : "") + (typeof n.className === "string" && n.className ? "." + n.className.split(" ").join(".") : "");
    let points = 0, light = 0;
    const where = {};
    const H = document.documentElement.scrollHeight;
    for (let y0 = 0; y0 < H; y0 += innerHeight) {
      scrollTo(0, y0);
      await new Promise((r) => requestAnimationFrame(r));
      for (let y = 8; y < innerHeight && y0 + y < H; y += 16) {
        for (let x = 8; x < innerWidth; x += 16) {
          const n = document.elementFromPoint(x, y);
          if (!n) continue;
          points++;
          const [c, from] = colourAt(n);
          if (c.length >= 3 && c[0] > 200 && c[1] > 200 && c[2] > 200) {
            light++;
            where[name(from)] = (where[name(from)] || 0) + 1;
          }
        }
      }
    }
    scrollTo(0, 0);
    return { points, light, where };
  });
  check(seen.points > 1000 && seen.light / seen.points < 0.01,
    `${view} dark: near-white at ${seen.light} of ${seen.points} points`, seen);
}

try {
  if (PHASE === "empty") {
    console.log("empty store: onboarding");
    for (const view of ["profiles", "traces", "metrics"]) {
      const p = await page();
      await open(p, "?view=" + view);
      const box = await text(p, "#onboarding");
      check(box.includes(`No ${view} stored yet`), `${view}: onboarding shown`, box.slice(0, 80));
      check(box.includes(":" + EXPECT.otlp_grpc_port) && box.includes(":" + EXPECT.otlp_http_port),
        `${view}: onboarding names the OTLP ports ${EXPECT.otlp_grpc_port}/${EXPECT.otlp_http_port}`);
      check(box.includes("/ingest") || box.includes("v1/"), `${view}: onboarding says what to send`);
      check(box.includes(`Store: ${EXPECT.store_path},`), `${view}: onboarding names the store ${EXPECT.store_path}`, box.slice(-200));
      // The OTLP gRPC port serves TraceService, MetricsService and
      // push.v1's PusherService (ingest.rs: push_v1_over_grpc_…).
      const grpcItem = await p.locator(`#onboarding li:has-text(":${EXPECT.otlp_grpc_port}")`).innerText();
      check(grpcItem.endsWith("OTLP gRPC (traces, metrics), Pyroscope push.v1 over gRPC"), `${view}: the OTLP gRPC port is for traces, metrics and push.v1`, grpcItem);
      if (view === "profiles") {
        const dl = await p.locator("#p-download").getAttribute("href");
        check(dl === null, "no Download pprof link without a profile", dl);
        await shot(p, "empty-profiles");
      }
      await p.context().close();
    }
  } else if (PHASE === "range") {
    // Three profiles pushed minutes apart (ui.rs sets EXPECT.pushes: time,
    // total and the one function of each): the flame graph's total is what
    // was pushed in the brushed range, then in the typed range.
    console.log("profiles: timeline brush and typed range");
    const pushes = EXPECT.pushes;
    const inRange = (from, until) => pushes.filter((x) => x.t_ms >= from && x.t_ms <= until);
    const sum = (xs) => xs.reduce((a, x) => a + x.total, 0);
    const totalNow = async () => Number(await p.locator("#p-total").getAttribute("data-total"));
    const frames = () => p.locator("#flame .fg-node").evaluateAll((ns) => ns.map((n) => n.dataset.name));
    const urlRange = () => { const u = new URL(p.url()).searchParams; return [u.get("p.range"), Number(u.get("p.from")), Number(u.get("p.until"))]; };
    /// Waits for the total to become `want` (and the flame graph to be drawn).
    const waitTotal = (want) => p.waitForFunction((w) => document.querySelector("#p-total")?.dataset.total === String(w)
      && document.querySelector("#flame")?.dataset.state === "ok", want, { timeout: 10000 }).catch(() => {});
    /// The range in the URL holds exactly `want` of the pushes, and the page
    /// shows their total and functions, no other.
    const checkRange = async (what, want) => {
      const [mode, from, until] = urlRange();
      const held = inRange(from, until);
      check(mode === "custom" && JSON.stringify(held.map((x) => x.fn)) === JSON.stringify(want.map((x) => x.fn)),
        `${what}: the range in the URL holds the pushes of ${want.map((x) => x.fn).join(", ")}`, [mode, from, until, held.map((x) => x.fn)]);
      const total = sum(held);
      await waitTotal(total);
      await settle(p);
      check(await totalNow() === total, `${what}: the flame graph's total is ${total} ns, the pushes' in [${from}, ${until}]`, await totalNow());
      const shown = await p.evaluate(([t, u]) => `Total ${fmtUnit(t, u)} of cpu`, [total, "nanoseconds"]);
      check((await text(p, "#p-total")) === shown, `${what}: the page says ${JSON.stringify(shown)}`, await text(p, "#p-total"));
      const names = await frames();
      check(pushes.every((x) => names.includes(x.fn) === held.includes(x)),
        `${what}: the flame graph has ${held.map((x) => x.fn).join(", ")} and no other push's function`, names);
      // The range inputs show the range.
      const inputs = [await p.inputValue("#p-from"), await p.inputValue("#p-until")];
      const wantInputs = [await localValue(p, from), await localValue(p, until)];
      check(JSON.stringify(inputs) === JSON.stringify(wantInputs), `${what}: From/Until show ${wantInputs.join(" – ")}`, inputs);
    };
    const p = await page();
    await open(p, "?view=profiles&p.range=15m&p.q=" + encodeURIComponent(EXPECT.selector));
    await waitTotal(sum(pushes));
    check(await totalNow() === sum(pushes), `15 min: the total of all ${pushes.length} pushes, ${sum(pushes)} ns`, await totalNow());
    // Brush from between the first two bars to between the last two: the
    // middle push only.
    await p.waitForFunction((n) => document.querySelectorAll("#p-timeline rect.bar").length === n, pushes.length, { timeout: 5000 }).catch(() => {});
    const bars = await p.locator("#p-timeline rect.bar").evaluateAll((rs) => rs.map((r) => { const b = r.getBoundingClientRect(); return b.x + b.width / 2; }).sort((a, b) => a - b));
    check(bars.length === pushes.length, `timeline: one bar per push (${pushes.length})`, bars.length);
    const y = (await p.locator("#p-timeline svg").boundingBox()).y + 50;
    await p.mouse.move((bars[0] + bars[1]) / 2, y);
    await p.mouse.down();
    await p.mouse.move((bars[1] + bars[2]) / 2, y, { steps: 8 });
    await p.mouse.up();
    await p.waitForFunction(() => new URLSearchParams(location.search).get("p.range") === "custom", null, { timeout: 5000 }).catch(() => {});
    await checkRange("brush", [pushes[1]]);
    await shot(p, "profiles-brushed");
    // Typed ranges, applied: around the first push, then over the first two.
    const typed = async (what, from, until, want) => {
      await fillTime(p, "#p-from", from);
      await fillTime(p, "#p-until", until);
      await p.click("#p-apply");
      await p.waitForFunction(([a, b]) => { const u = new URLSearchParams(location.search); return u.get("p.from") === String(a) && u.get("p.until") === String(b); },
        [from, until], { timeout: 5000 }).catch(() => {});
      const [, gotFrom, gotUntil] = urlRange();
      check(gotFrom === from && gotUntil === until, `${what}: Apply puts the typed range in the URL`, [gotFrom, gotUntil]);
      await checkRange(what, want);
    };
    const minute = 60000;
    // Whole minutes, on purpose: an input holds such a time without its
    // seconds (`fillTime`), the case that once failed this test 1 run in 60.
    const min = (ms) => Math.floor(ms / minute) * minute;
    await typed("typed range around the first push", min(pushes[0].t_ms - minute), min(pushes[0].t_ms + minute), [pushes[0]]);
    await typed("typed range over the first two pushes", min(pushes[0].t_ms - minute), min(pushes[1].t_ms + minute), [pushes[0], pushes[1]]);
    await shot(p, "profiles-typed-range");
    // Back to a relative range: everything again.
    await p.selectOption("#p-range", "15m");
    await waitTotal(sum(pushes));
    check(await totalNow() === sum(pushes) && urlRange()[0] === "15m", "15 min again: every push", [await totalNow(), urlRange()]);
    await p.context().close();
  } else if (PHASE === "sandwich") {
    // Callers and callees of a function (ui.rs computes each path's time
    // from the pushed stacks: EXPECT.sandwich[fn]).
    console.log("profiles: sandwich view");
    const p = await page();
    await open(p, "?view=profiles&p.range=15m&p.q=" + encodeURIComponent(EXPECT.selector));
    await p.waitForSelector('#flame[data-state="ok"]');
    const ns = (v) => p.evaluate((x) => fmtUnit(x, "nanoseconds"), v);
    /// Each path of the two trees the page draws, with its time.
    const paths = () => p.evaluate(() => {
      const out = {};
      for (const side of ["callers", "callees"]) {
        const m = (out[side] = {});
        const walk = (n, prefix) => {
          const key = prefix ? prefix + ";" + n.name : n.name;
          m[key] = (m[key] || 0) + n.total;
          for (const c of n.children) walk(c, key);
        };
        if (sandwich[side].root) walk(sandwich[side].root, "");
      }
      return out;
    });
    const sorted = (o) => JSON.stringify(Object.entries(o).sort());
    const checkFn = async (fn) => {
      const want = EXPECT.sandwich[fn];
      await p.waitForSelector(`#p-sandwich[data-fn="${fn}"]`, { timeout: 5000 }).catch(() => {});
      await settle(p);
      const got = await paths();
      check(sorted(got.callers) === sorted(want.callers), `${fn}: callers ${JSON.stringify(want.callers)}`, got.callers);
      check(sorted(got.callees) === sorted(want.callees), `${fn}: callees ${JSON.stringify(want.callees)}`, got.callees);
      const title = await text(p, "#sw-title");
      check(title === `${fn}: ${await ns(want.total)}`, `${fn}: title names its total ${await ns(want.total)}`, title);
      // The table's total of the function is the sandwich's.
      const tableTotal = await p.locator(`#p-table tr[data-name="${fn}"] td`).nth(3).innerText();
      check(tableTotal === await ns(want.total), `${fn}: the table's total is ${await ns(want.total)} too`, tableTotal);
      // Drawn: callers inverted (the function at the bottom), callees top-down.
      const tops = (box) => p.locator(`${box} .fg-node`).evaluateAll((ns) => ns.map((n) => [n.dataset.name, n.offsetTop, n.getBoundingClientRect().width]));
      const [callers, callees] = [await tops("#sw-callers"), await tops("#sw-callees")];
      // The root row holds the function alone: the bottom row of the
      // callers, the top row of the callees.
      const row = (list, pick) => { const t = pick(...list.map(([, top]) => top)); return list.filter(([, top]) => top === t).map(([n]) => n); };
      check(callers.length > 1 && JSON.stringify(row(callers, Math.max)) === JSON.stringify([fn]), `${fn}: callers drawn above it`, callers);
      check(callees.length > 1 && JSON.stringify(row(callees, Math.min)) === JSON.stringify([fn]), `${fn}: callees drawn below it`, callees);
      check(new URL(p.url()).searchParams.get("p.fn") === fn && new URL(p.url()).searchParams.get("p.mode") === "sandwich", `${fn}: function and mode in the URL`, p.url());
    };
    await p.click(`#p-table tr[data-name="${EXPECT.first}"]`);
    await p.click('#p-mode button[data-mode="sandwich"]');
    check(await p.locator("#flame").isHidden() && await p.locator("#p-sandwich").isVisible(), "sandwich mode: the two graphs instead of the flame graph");
    await checkFn(EXPECT.first);
    await shot(p, "profiles-sandwich");
    // A click on a caller makes it the function.
    await p.locator(`#sw-callers .fg-node[data-name="${EXPECT.then}"]`).first().click();
    await checkFn(EXPECT.then);
    // A link to it opens the same view.
    const again = await page();
    await open(again, new URL(p.url()).search);
    await again.waitForSelector(`#p-sandwich[data-fn="${EXPECT.then}"]`, { timeout: 5000 }).catch(() => {});
    check(await again.locator(`#p-sandwich`).getAttribute("data-fn") === EXPECT.then, "the URL opens the sandwich of the same function");
    await again.context().close();
    await p.context().close();
  } else if (PHASE === "diff") {
    // Two ranges, one real profile in each (ui.rs sets EXPECT from the files).
    console.log("profiles: diff of two ranges");
    const p = await page();
    await open(p, "?view=profiles&p.range=15m&p.q=" + encodeURIComponent(EXPECT.selector));
    await p.waitForSelector('#flame[data-state="ok"]');
    await p.click("#p-diff");
    await p.waitForSelector("#p-diff-controls", { state: "visible" });
    for (const [id, ms] of [["#p-a-from", EXPECT.a_from], ["#p-a-until", EXPECT.a_until],
      ["#p-b-from", EXPECT.b_from], ["#p-b-until", EXPECT.b_until]]) {
      await fillTime(p, id, ms);
      await p.dispatchEvent(id, "change");
    }
    // What the page must say, in its own units.
    const ns = (v) => p.evaluate((x) => fmtUnit(x, "nanoseconds"), v);
    const want = `A: ${await ns(EXPECT.total_a)} · B: ${await ns(EXPECT.total_b)}`;
    await p.waitForFunction((w) => document.querySelector("#p-total").textContent.startsWith(w), want, { timeout: 10000 }).catch(() => {});
    await settle(p);
    check((await text(p, "#p-total")).startsWith(want), `diff totals: ${want}`, await text(p, "#p-total"));
    // The page's diff tree: each loop's time in A and in B (outermost
    // occurrences summed).
    const sums = await p.evaluate((names) => {
      const out = {};
      const walk = (n, inside) => {
        const hit = names.includes(n.name) && !inside.has(n.name);
        if (hit) { const o = (out[n.name] ||= [0, 0, 0]); o[0] += n.a; o[1] += n.b; o[2] += 1; }
        const next = hit ? new Set([...inside, n.name]) : inside;
        for (const c of n.children) walk(c, next);
      };
      walk(flame.root, new Set());
      return out;
    }, Object.keys(EXPECT.loops));
    for (const [name, [a, b]] of Object.entries(EXPECT.loops)) {
      const got = sums[name] || [0, 0, 0];
      check(got[0] === a && got[1] === b, `${name}: A ${a} ns, B ${b} ns in the diff`, got);
      if (got[2] === 1) {
        await p.locator(`#flame .fg-node[data-name="${name}"]`).first().hover();
        const tip = await p.locator("#fg-tip").innerText();
        const line = (side, v, total) => p.evaluate(([s, x, t]) => `${s}: ${fmtUnit(x, "nanoseconds")} (${pct(x, t)})`, [side, v, total]);
        const wantTip = [name, await line("A", a, EXPECT.total_a), await line("B", b, EXPECT.total_b)].join("\n");
        check(tip === wantTip, `${name}: tooltip ${JSON.stringify(wantTip)}`, tip);
      }
    }
    const rgb = (name) => p.locator(`#flame .fg-node[data-name="${name}"]`).first().evaluate((n) => getComputedStyle(n).backgroundColor.match(/\d+/g).map(Number));
    const [sr, sg] = await rgb(EXPECT.shrank);
    const [gr, gg] = await rgb(EXPECT.grew);
    check(sg > sr + 20, `${EXPECT.shrank} (smaller share in B) is green`, [sr, sg]);
    check(gr > gg + 40, `${EXPECT.grew} (larger share in B) is red`, [gr, gg]);
    await shot(p, "profiles-diff-ranges");
    await p.context().close();
  } else {
    // ---------------- profiles ----------------
    console.log("profiles view");
    let p = await page();
    await open(p, '?view=profiles&p.q={service_name="api"}');
    await p.waitForSelector('#flame[data-state="ok"]');
    check(await p.locator("#onboarding").isHidden(), "no onboarding once data is stored");
    const typeText = await p.locator("#p-type option:checked").innerText();
    check(typeText.includes("cpu") && typeText.includes("nanoseconds"), "profile type: cpu (nanoseconds) chosen", typeText);
    const total = await text(p, "#p-total");
    check(total.includes(EXPECT.total_all), `total in human units (${EXPECT.total_all})`, total);
    const names = await p.locator("#flame .fg-node").evaluateAll((ns) => ns.map((n) => n.dataset.name));
    for (const f of EXPECT.functions) check(names.includes(f), `flame graph has ${f}`);
    // Labels are the function names (never the count name, never cut at the left).
    const labelsOk = async () => p.locator("#flame .fg-node").evaluateAll((ns) => ns
      .filter((n) => n.textContent)
      .every((n) => n.textContent === n.dataset.name && !/cpu|nanoseconds|^\.\./.test(n.textContent)));
    check(await labelsOk(), "labels are whole function names");
    // Hover: a tooltip with human units and %.
    await p.locator('#flame .fg-node[data-name="api::parse_json"]').hover();
    const tip = await text(p, "#fg-tip");
    check(tip.includes(`Self: ${EXPECT.parse_json_self} (${EXPECT.parse_json_pct})`), "tooltip: self in ms and %", tip);
    // Click-zoom on api::serve: it spans the width, labels stay whole.
    await p.locator('#flame .fg-node[data-name="api::serve"]').click();
    await settle(p);
    const serveW = await p.locator('#flame .fg-node[data-name="api::serve"]').evaluate((n) => n.getBoundingClientRect().width);
    const flameW = await p.locator("#flame").evaluate((n) => n.clientWidth);
    check(Math.abs(serveW - flameW) < 3, "zoomed node spans the flame graph", [serveW, flameW]);
    check(await labelsOk(), "labels after zoom are whole function names");
    const parseText = await p.locator('#flame .fg-node[data-name="api::parse_json"]').innerText();
    check(parseText === "api::parse_json", "api::parse_json label readable after zoom", parseText);
    await shot(p, "profiles-zoomed");
    // Search: matches highlighted, labels intact.
    await p.fill("#p-search", "parse");
    await settle(p);
    const matches = await p.locator("#flame .fg-node.match").evaluateAll((ns) => ns.map((n) => n.dataset.name));
    check(matches.length === 1 && matches[0] === "api::parse_json", "search highlights api::parse_json", matches);
    check(await labelsOk(), "labels after search are whole function names");
    await p.fill("#p-search", "");
    await p.click("#p-reset");
    // Table: self/total in units.
    const row = await p.locator('#p-table tr[data-name="api::parse_json"]').innerText();
    check(row.includes(EXPECT.parse_json_self) && row.includes(EXPECT.parse_json_pct), "table: parse_json self 600 ms 40%", row);
    // Top-down vs bottom-up: main at the top, then at the bottom.
    const tops = () => p.locator("#flame .fg-node").evaluateAll((ns) => Object.fromEntries(ns.map((n) => [n.dataset.name, n.offsetTop])));
    let t = await tops();
    check(t.total === 0 && t.main < t["api::serve"], "top-down: root at the top, callees below", t);
    await p.click("#p-topdown");
    t = await tops();
    check(t.total > 0 && t.main > t["api::serve"], "bottom-up: root at the bottom, callees above", t);
    await p.click("#p-topdown");
    // Label chips: pick pod=api-1.
    await p.selectOption("#p-label-name", "pod");
    await p.waitForFunction(() => document.querySelectorAll("#p-label-value option").length > 2);
    await p.selectOption("#p-label-value", "api-1");
    await p.waitForFunction((t) => document.querySelector("#p-total").textContent.includes(t), EXPECT.total_api1);
    const chips = await p.locator("#p-chips .chip").evaluateAll((cs) => cs.map((c) => c.dataset.label));
    check(chips.includes("pod") && chips.includes("service_name"), "chips: service_name and pod", chips);
    check((await p.locator("#p-query").inputValue()).includes('pod="api-1"'), "selector has pod=\"api-1\"");
    check(new URL(p.url()).searchParams.get("p.q").includes("api-1"), "selector in the URL");
    const only = await p.locator("#flame .fg-node").evaluateAll((ns) => ns.map((n) => n.dataset.name));
    check(only.includes("zstd::compress") && !only.includes("api::parse_json"), "pod api-1: only its stacks", only);
    const dl = await p.locator("#p-download").getAttribute("href");
    check(dl && (await status(p, dl)) === 200, "Download pprof link answers 200", dl);
    // The pod chip's ×: the filter goes, everything of api comes back.
    await p.locator('#p-chips .chip[data-label="pod"] button').click();
    await p.waitForFunction((t) => document.querySelector("#p-total").textContent.includes(t), EXPECT.total_all, { timeout: 5000 }).catch(() => {});
    const chipsLeft = await p.locator("#p-chips .chip").evaluateAll((cs) => cs.map((c) => c.dataset.label));
    const back = await p.locator("#flame .fg-node").evaluateAll((ns) => ns.map((n) => n.dataset.name));
    check(JSON.stringify(chipsLeft) === JSON.stringify(["service_name"]) && (await p.locator("#p-query").inputValue()) === '{service_name="api"}',
      "chip ×: pod filter removed, service_name left", [chipsLeft, await p.locator("#p-query").inputValue()]);
    check((await text(p, "#p-total")).includes(EXPECT.total_all) && back.includes("api::parse_json") && back.includes("zstd::compress"),
      `chip ×: both pods back (${EXPECT.total_all}, parse_json and compress)`, [await text(p, "#p-total"), back]);
    check(!new URL(p.url()).searchParams.get("p.q").includes("api-1"), "chip ×: pod gone from the URL", new URL(p.url()).searchParams.get("p.q"));
    // A selector nothing matches: no link, no 404.
    await p.fill("#p-query", '{pod="nope"}');
    await p.press("#p-query", "Enter");
    await p.waitForSelector('#flame[data-state="empty"]');
    check((await p.locator("#p-download").getAttribute("href")) === null, "no Download pprof link when nothing matches");
    // Remove the chip: back to everything of api.
    await p.fill("#p-query", '{service_name="api"}');
    await p.press("#p-query", "Enter");
    await p.waitForFunction((t) => document.querySelector("#p-total").textContent.includes(t), EXPECT.total_all);
    // Group by pod: one stacked series per pod, a legend with their totals;
    // a click on a pod selects it.
    await p.selectOption("#p-group", "pod");
    await p.waitForSelector('#p-legend[data-groups="2"]', { timeout: 5000 }).catch(() => {});
    const legend = await p.locator("#p-legend .legend-item").evaluateAll((bs) => bs.map((b) => b.textContent));
    check(JSON.stringify(legend) === JSON.stringify([`api-0 ${EXPECT.total_api0}`, `api-1 ${EXPECT.total_api1}`]), "group by pod: legend api-0 1 s, api-1 500 ms", legend);
    const fills = await p.locator("#p-timeline rect.bar").evaluateAll((rs) => [...new Set(rs.map((r) => r.dataset.group))].sort());
    check(JSON.stringify(fills) === JSON.stringify(["api-0", "api-1"]), "timeline bars of both pods", fills);
    check(new URL(p.url()).searchParams.get("p.group") === "pod", "group by in the URL");
    await shot(p, "profiles-group-by");
    await p.click('#p-legend .legend-item[data-value="api-1"]');
    await p.waitForFunction((t) => document.querySelector("#p-total").textContent.includes(t), EXPECT.total_api1, { timeout: 5000 }).catch(() => {});
    check((await p.locator("#p-query").inputValue()).includes('pod="api-1"') && (await text(p, "#p-total")).includes(EXPECT.total_api1), "legend click selects pod api-1", await text(p, "#p-total"));
    await p.selectOption("#p-group", "");
    await p.waitForSelector("#p-legend", { state: "hidden" });
    await p.fill("#p-query", '{service_name="api"}');
    await p.press("#p-query", "Enter");
    await p.waitForFunction((t) => document.querySelector("#p-total").textContent.includes(t), EXPECT.total_all);
    // Timeline with points; brushing selects a custom range.
    const pts = Number(await p.locator("#p-timeline").getAttribute("data-points"));
    check(pts > 0, "timeline has points", pts);
    const tl = await p.locator("#p-timeline svg").boundingBox();
    await p.mouse.move(tl.x + tl.width * 0.3, tl.y + 40);
    await p.mouse.down();
    await p.mouse.move(tl.x + tl.width * 0.995, tl.y + 40, { steps: 5 });
    await p.mouse.up();
    await p.waitForFunction(() => new URLSearchParams(location.search).get("p.range") === "custom");
    check(true, "brush sets a custom range in the URL");
    check((await p.locator("#p-from").inputValue()) !== "", "absolute range inputs filled");
    await shot(p, "profiles");
    // Diff between two ranges.
    await p.click("#p-diff");
    await p.waitForSelector('#flame[data-state="ok"]');
    await settle(p);
    check((await text(p, "#p-total")).startsWith("A:"), "diff view shows A and B totals", await text(p, "#p-total"));
    await shot(p, "profiles-diff");
    // Diff of two label sets (pods) over the same range.
    await p.click("#p-ab-whole");
    await p.fill("#p-a-q", EXPECT.selector_a);
    await p.press("#p-a-q", "Enter");
    await p.fill("#p-b-q", EXPECT.selector_b);
    await p.press("#p-b-q", "Enter");
    const want = `A ${EXPECT.selector_a}: ${EXPECT.total_api0} · B ${EXPECT.selector_b}: ${EXPECT.total_api1}`;
    await p.waitForFunction((w) => document.querySelector("#p-total").textContent.startsWith(w), want, { timeout: 5000 }).catch(() => {});
    check((await text(p, "#p-total")).startsWith(want), `label-set diff totals: ${want}`, await text(p, "#p-total"));
    // The flame graph may still be redrawn once (both selectors' loads):
    // let it settle before reading its nodes' colours.
    await settle(p);
    const hue = (name) => p.locator(`#flame .fg-node[data-name="${name}"]`).evaluate((n) => (getComputedStyle(n).backgroundColor.match(/\d+/g) || []).map(Number));
    const [cr, cg] = await hue("zstd::compress");
    const [pr, pg] = await hue("api::parse_json");
    check(cr > cg + 40, "zstd::compress (only in B) is red", [cr, cg]);
    check(pg > pr + 20, "api::parse_json (only in A) is green", [pr, pg]);
    check(new URL(p.url()).searchParams.get("p.bq") === EXPECT.selector_b, "B selector in the URL");
    await shot(p, "profiles-diff-labels");
    await p.context().close();

    // Dark mode: no white box.
    p = await page("dark");
    await open(p, '?view=profiles&p.q={service_name="api"}');
    await p.waitForSelector('#flame[data-state="ok"]');
    const bgs = await p.evaluate(() => ["body", "#flame", "#p-table-wrap", "header"].map((s) => getComputedStyle(document.querySelector(s)).backgroundColor));
    const dark = (c) => { const [r, g, b] = c.match(/\d+/g).map(Number); return r + g + b < 200; };
    check(bgs.every(dark), "dark mode: body, flame graph, table, header are dark", bgs);
    await shot(p, "profiles-dark");
    await p.context().close();

    // ---------------- traces ----------------
    console.log("traces view");
    p = await page();
    await open(p, "?view=traces&t.range=1h");
    const count = async () => Number(await p.locator("#t-count").getAttribute("data-total"));
    await p.selectOption("#t-service", "frontend");
    await p.waitForFunction(() => document.querySelector("#t-operation").options.length > 1);
    await p.click("#t-find");
    await settle(p);
    await expectAttr(p, "#t-count", "data-total", EXPECT.traces_frontend, `frontend: ${EXPECT.traces_frontend} traces`);
    check((await text(p, "#t-page")) === "page 1 of 2", "20 per page: page 1 of 2", await text(p, "#t-page"));
    check(await p.locator("#t-results tbody tr").count() === 20, "20 rows on page 1");
    await p.click("#t-next");
    await settle(p);
    check(await p.locator("#t-results tbody tr").count() === EXPECT.traces_frontend - 20, "rest on page 2");
    // Sort: longest first.
    await p.selectOption("#t-sort", "longest");
    await settle(p);
    const first = await p.locator("#t-results tbody tr").first().locator("td").nth(3).innerText();
    check(first === EXPECT.longest, `longest first: ${EXPECT.longest}`, first);
    check(new URL(p.url()).searchParams.get("t.sort") === "longest", "sort in the URL");
    await p.selectOption("#t-sort", "newest");
    // Errors only: the errors are payment's spans (a search matches one
    // span that satisfies everything, as Jaeger's does).
    await p.check("#t-errors");
    await settle(p);
    await expectAttr(p, "#t-count", "data-total", 0, "errors only of frontend: none");
    await p.selectOption("#t-service", "");
    await settle(p);
    await expectAttr(p, "#t-count", "data-total", EXPECT.traces_errors, `errors only, all services: ${EXPECT.traces_errors}`);
    await p.uncheck("#t-errors");
    await p.selectOption("#t-service", "frontend");
    await settle(p);
    // Tags.
    await p.fill("#t-tags", "http.status_code=500");
    await p.click("#t-find");
    await settle(p);
    await expectAttr(p, "#t-count", "data-total", EXPECT.traces_errors, "tags http.status_code=500");
    await p.fill("#t-tags", "");
    // Min duration.
    await p.fill("#t-min", "120ms");
    await p.click("#t-find");
    await settle(p);
    await expectAttr(p, "#t-count", "data-total", EXPECT.traces_min_120ms, `minDuration 120ms: ${EXPECT.traces_min_120ms}`);
    await p.fill("#t-min", "");
    // Max duration: the traces over it go, those up to it stay.
    await p.fill("#t-max", "110ms");
    await p.click("#t-find");
    await settle(p);
    await expectAttr(p, "#t-count", "data-total", EXPECT.traces_max_110ms.length, `maxDuration 110ms: ${EXPECT.traces_max_110ms.length}`);
    const listed = (await p.locator("#t-results tbody tr td:nth-child(4)").allInnerTexts()).sort();
    check(JSON.stringify(listed) === JSON.stringify([...EXPECT.traces_max_110ms].sort()) && !listed.includes(EXPECT.longest),
      `maxDuration 110ms lists ${EXPECT.traces_max_110ms[0]} … ${EXPECT.traces_max_110ms.at(-1)}, not ${EXPECT.longest}`, listed);
    check(new URL(p.url()).searchParams.get("t.max") === "110ms", "max duration in the URL");
    await p.fill("#t-max", "");
    await p.click("#t-find");
    await settle(p);
    await expectAttr(p, "#t-count", "data-total", EXPECT.traces_frontend, `max duration cleared: ${EXPECT.traces_frontend} again`);
    // Operation of another service.
    await p.selectOption("#t-service", "payment");
    await p.waitForFunction(() => [...document.querySelector("#t-operation").options].some((o) => o.value === "charge"));
    await p.selectOption("#t-operation", "charge");
    await settle(p);
    await expectAttr(p, "#t-count", "data-total", EXPECT.traces_frontend, "payment / charge: every trace");
    await shot(p, "traces-search");
    // Unknown parameters are refused.
    check(await status(p, "/ui/api/traces?service=frontend&bogus=1") === 400, "/ui/api/traces: unknown parameter → 400");
    check(await status(p, "/api/traces?service=frontend&bogus=1") === 400, "/api/traces: unknown parameter → 400");
    check(await status(p, "/ui/api/traces?sort=random") === 400, "/ui/api/traces: bad sort → 400");
    // Trace id box.
    await p.fill("#t-id", EXPECT.error_trace);
    await p.click("#t-open");
    await p.waitForSelector('#waterfall[data-state="ok"]');
    check(await p.locator("#waterfall .wf-row").count() === 3, "waterfall: 3 spans");
    check(await p.locator("#waterfall .wf-tick").count() === 5, "time ruler with 5 ticks");
    // The short span at the right edge: its duration is readable.
    const short = p.locator('#waterfall .wf-row:has-text("SELECT stock") .wf-time');
    check((await short.innerText()) === EXPECT.short_span, `short span reads ${EXPECT.short_span}`, await short.innerText());
    const vis = await short.evaluate((n) => {
      const r = n.getBoundingClientRect();
      const track = n.parentElement.getBoundingClientRect();
      const bar = n.parentElement.querySelector(".wf-bar").getBoundingClientRect();
      const c = getComputedStyle(n).color.match(/\d+/g).map(Number);
      return { inside: r.left >= track.left - 1 && r.right <= track.right + 71, overBar: r.right > bar.left + 1 && r.left < bar.right - 1, white: c[0] > 240 && c[1] > 240 && c[2] > 240 };
    });
    check(vis.inside && !vis.overBar && !vis.white, "short span's duration is beside its bar, not white", vis);
    // Collapse the root.
    await p.locator("#waterfall .wf-row").first().locator(".wf-caret").click();
    check(await p.locator("#waterfall .wf-row").count() === 1, "collapsed root: 1 row");
    await p.click("#wf-expand");
    check(await p.locator("#waterfall .wf-row").count() === 3, "expanded: 3 rows");
    // Collapse all: the children's rows go, the root says how many.
    await p.click("#wf-collapse");
    const collapsed = await p.locator("#waterfall .wf-row").evaluateAll((rs) => rs.map((r) => r.querySelector(".wf-label").textContent));
    check(collapsed.length === 1 && collapsed[0].startsWith("▸") && collapsed[0].endsWith("(+2)"), "Collapse all: the root row only, ▸ … (+2)", collapsed);
    await p.click("#wf-expand");
    check(await p.locator("#waterfall .wf-row").count() === 3, "Expand all: 3 rows");
    // The error span's event attributes.
    await p.locator('#waterfall .wf-row:has-text("charge")').click();
    const detail = await text(p, "#span-detail");
    check(detail.includes("exception.message") && detail.includes(EXPECT.exception_message), "event attribute exception.message shown", detail.slice(0, 300));
    check(detail.includes("exception.type") && detail.includes("CardDeclinedError"), "event attribute exception.type shown");
    check(new URL(p.url()).searchParams.get("trace") === EXPECT.error_trace, "trace id in the URL");
    await shot(p, "traces-waterfall");
    // An unknown trace id: a message, no crash.
    await p.fill("#t-id", "00000000000000000000000000000001");
    await p.click("#t-open");
    await p.waitForSelector('#waterfall[data-state="error"]');
    check((await text(p, "#waterfall")).includes("not stored"), "unknown trace id: not stored");
    await p.context().close();

    p = await page("dark");
    await open(p, `?view=traces&t.service=frontend&trace=${EXPECT.error_trace}`);
    await p.waitForSelector('#waterfall[data-state="ok"]');
    await p.locator('#waterfall .wf-row:has-text("charge")').click();
    await darkChecks(p, "traces", ["body", "header", "#t-form", ".results .panel.scroll", "#t-results th", "#waterfall", ".wf-ruler", "#span-detail", "#t-service", "#t-min"]);
    await shot(p, "traces-dark");
    await p.context().close();

    // ---------------- span → flame graph ----------------
    console.log("span and trace → flame graph");
    p = await page();
    const E = EXPECT;
    await open(p, `?view=traces&trace=${E.span_trace}`);
    await p.waitForSelector('#waterfall[data-state="ok"]');
    await p.waitForSelector('#waterfall[data-profiles="yes"]', { timeout: 5000 }).catch(() => {});
    const marked = await p.locator("#waterfall .wf-row[data-profile]").evaluateAll((rs) => rs.map((r) => r.dataset.span).sort());
    check(JSON.stringify(marked) === JSON.stringify([E.span_a, E.span_b].sort()), "waterfall marks the spans with samples (A, B)", marked);
    const traceLink = await text(p, "#trace-profile");
    check(traceLink === `Profile of this trace (${E.trace_total} cpu)`, `Profile of this trace link shown, ${E.trace_total}`, traceLink);
    // Span A: pyroscope.profile.id and samples.
    await p.locator(`#waterfall .wf-row[data-span="${E.span_a}"]`).click();
    check((await p.locator("#span-profile").innerText()) === "Profile of this span", "span detail: Profile of this span link");
    const spanInfo = await text(p, "#span-detail .span-profile");
    check(spanInfo.includes(`${E.span_a_total} of cpu samples`), `span detail: ${E.span_a_total} of cpu samples`, spanInfo);
    await shot(p, "span-detail");
    await p.click("#span-profile");
    await p.waitForURL(/view=profiles/);
    await p.waitForSelector('body[data-loaded="true"]', { timeout: 20000 });
    await p.waitForSelector('#flame[data-state="ok"]', { timeout: 5000 }).catch(() => {});
    const spanNames = await p.locator("#flame .fg-node").evaluateAll((ns) => ns.map((n) => n.dataset.name));
    check(["price", "tax", "checkout_handler", "serve", "main"].every((f) => spanNames.includes(f)), "span A flame graph: its frames", spanNames);
    check(!["gc", "payment_call", "async_flush", "other_request", "api::parse_json"].some((f) => spanNames.includes(f)), "span A flame graph: no other sample's frames", spanNames);
    const spanTotalText = await text(p, "#p-total");
    check(spanTotalText.includes(`Total ${E.span_a_total} of cpu in this span`), `span A total ${E.span_a_total}`, spanTotalText);
    const priceRow = await p.locator('#p-table tr[data-name="price"]').innerText();
    check(priceRow.includes(E.span_a_price) && priceRow.includes(E.span_a_price_pct), `table: price ${E.span_a_price} ${E.span_a_price_pct}`, priceRow);
    const banner = await text(p, "#p-span");
    check(banner.includes("POST /checkout") && banner.includes(E.span_a), "banner names the span", banner);
    check(await p.locator("#p-timeline").isHidden(), "no timeline of the whole selection in span mode");
    const spanDl = await p.locator("#p-download").getAttribute("href");
    check(spanDl && spanDl.includes("span_id=" + E.span_a) && (await status(p, spanDl)) === 200, "Download pprof of the span answers 200", spanDl);
    await shot(p, "span-profile");
    // Back to the trace; span D names a profile but no sample carries it.
    await p.click("#p-span-back");
    await p.waitForURL(/view=traces/);
    await p.waitForSelector('#waterfall[data-profiles]', { timeout: 20000 });
    await p.locator(`#waterfall .wf-row[data-span="${E.span_d}"]`).click();
    check(await p.locator("#span-profile").count() === 1, "span D (pyroscope.profile.id, no samples): link shown");
    check((await text(p, "#span-detail .span-profile")).includes("no samples"), "span D: says no samples", await text(p, "#span-detail .span-profile"));
    await p.locator(`#waterfall .wf-row[data-span="${E.span_b}"]`).click();
    check(await p.locator("#span-profile").count() === 1, "span B (samples, no attribute): link shown");
    // A span with neither: no link.
    await p.locator(`#waterfall .wf-row[data-span="${E.span_e}"]`).click();
    check((await text(p, "#span-detail h3")).includes("load cart") && await p.locator("#span-profile").count() === 0,
      "span E (no attribute, no samples): no link");
    check(!/\bnull\b/.test(await text(p, "#span-detail")), "span E: no stray \"null\" in the detail", await text(p, "#span-detail"));
    await p.locator(`#waterfall .wf-row[data-span="${E.span_d}"]`).click();
    await p.click("#span-profile");
    await p.waitForURL(/view=profiles/);
    await p.waitForSelector('body[data-loaded="true"]', { timeout: 20000 });
    await p.waitForSelector('#flame[data-state="empty"]', { timeout: 5000 }).catch(() => {});
    const empty = await text(p, "#flame");
    check(empty.includes("No cpu samples carry span_id " + E.span_d), "span D: honest empty state", empty.slice(0, 200));
    check((await p.locator("#p-download").getAttribute("href")) === null, "span D: no Download pprof link");
    await shot(p, "span-profile-empty");
    // The whole trace.
    await open(p, `?view=traces&trace=${E.span_trace}`);
    await p.waitForSelector('#waterfall[data-profiles="yes"]', { timeout: 5000 }).catch(() => {});
    await p.click("#trace-profile");
    await p.waitForURL(/view=profiles/);
    await p.waitForSelector('body[data-loaded="true"]', { timeout: 20000 });
    await p.waitForSelector('#flame[data-state="ok"]', { timeout: 5000 }).catch(() => {});
    const traceTotal = await text(p, "#p-total");
    check(traceTotal.includes(`Total ${E.trace_total} of cpu in these spans`), `trace total ${E.trace_total}`, traceTotal);
    const traceNames = await p.locator("#flame .fg-node").evaluateAll((ns) => ns.map((n) => n.dataset.name));
    check(traceNames.includes("price") && traceNames.includes("payment_call") && !traceNames.includes("gc") && !traceNames.includes("other_request"),
      "trace flame graph: its spans' frames only", traceNames);
    // Show all samples: the span filter goes.
    await p.click("#p-span-clear");
    await p.waitForFunction(() => !new URLSearchParams(location.search).get("p.spans"));
    await p.waitForFunction(() => [...document.querySelectorAll("#flame .fg-node")].some((n) => n.dataset.name === "gc"), null, { timeout: 5000 }).catch(() => {});
    check(await p.locator("#p-span").isHidden(), "Show all samples: banner gone");
    check(await p.locator('#flame .fg-node[data-name="gc"]').count() > 0, "Show all samples: unlabelled samples back");
    await p.context().close();

    // ---------------- metrics ----------------
    console.log("metrics view");
    p = await page();
    await open(p, "?view=metrics&m.range=1h");
    await p.selectOption("#m-service", "checkout");
    await settle(p);
    await expectAttr(p, "#m-count", "data-count", 3, "checkout: 3 series");
    const gauge = await text(p, '.metric[data-metric="queue_depth"]');
    check(gauge.includes(EXPECT.gauge_last) && gauge.includes(`${EXPECT.metric_points} points`), `gauge: last ${EXPECT.gauge_last}, ${EXPECT.metric_points} points`, gauge);
    const hist = await text(p, '.metric[data-metric="http_server_request_duration_seconds"]');
    check(/p50 \d+(\.\d+)? ms/.test(hist) && hist.includes(`${EXPECT.metric_points} points`), "histogram: p50 in ms, history", hist);
    const ctr = await text(p, '.metric[data-metric="orders_total"]');
    check(ctr.includes("rate per second"), "counter shown as a rate", ctr);
    const paths = await p.locator(".metric svg path").count();
    check(paths >= 3, "charts drawn", paths);
    await p.fill("#m-name", "queue");
    await p.press("#m-name", "Enter");
    await settle(p);
    await expectAttr(p, "#m-count", "data-count", 1, "name filter: 1 series");
    await p.fill("#m-name", "");
    await p.press("#m-name", "Enter");
    await settle(p);
    await shot(p, "metrics");
    await p.selectOption("#m-service", "");
    await settle(p);
    // Service and range filters, against what was pushed: checkout in the
    // last 3 minutes, billing 40 and 30 minutes ago.
    const B = EXPECT.billing;
    const billingNames = Object.keys(B.series).sort();
    const cards = () => p.locator("#m-list .metric").evaluateAll((ms) => ms.map((m) => m.dataset.metric).sort());
    await expectAttr(p, "#m-count", "data-count", 6, "last hour, all services: 6 series");
    check(JSON.stringify(await cards()) === JSON.stringify([...billingNames, ...EXPECT.checkout_series].sort()), "last hour: checkout's and billing's series", await cards());
    await p.selectOption("#m-range", "15m");
    await expectAttr(p, "#m-count", "data-count", 3, "last 15 min, all services: checkout's 3 series");
    check(JSON.stringify(await cards()) === JSON.stringify(EXPECT.checkout_series), "last 15 min: checkout's series only", await cards());
    await p.selectOption("#m-service", "billing");
    await expectAttr(p, "#m-count", "data-count", 0, "last 15 min, billing: none (30 and 40 min old)");
    check((await text(p, "#m-list")).includes("No metrics match."), "last 15 min, billing: says no metrics match", await text(p, "#m-list"));
    await p.selectOption("#m-range", "1h");
    await expectAttr(p, "#m-count", "data-count", billingNames.length, `last hour, billing: ${billingNames.length} series`);
    check(JSON.stringify(await cards()) === JSON.stringify(billingNames), "last hour, billing: its series only", await cards());
    const u = new URL(p.url()).searchParams;
    check(u.get("m.service") === "billing" && u.get("m.range") === "1h", "service and range in the URL", [u.get("m.service"), u.get("m.range")]);
    // The charts span the range (the last hour), not just the points: the
    // pushes sit at their times on it.
    const [from, until] = (await p.locator("#m-list").evaluate((n) => [n.dataset.from, n.dataset.until])).map(Number);
    const drift = await p.evaluate((u) => Date.now() - u, until);
    check(until - from === 3600000 && drift >= 0 && drift < 60000, "the view's range is the last hour", [from, until, drift]);
    const clocks = await p.evaluate((ts) => ts.map((t) => fmtClock(t)), [from, until]);
    for (const [name, shown] of Object.entries(B.series)) {
      const card = p.locator(`.metric[data-metric="${name}"]`);
      const value = await card.locator(".mvalue").innerText();
      check(value === shown, `${name}: last value in its unit, ${shown}`, value);
      const info = await card.innerText();
      check(info.includes("gauge · 2 points") && info.includes('job="billing"'), `${name}: a gauge of billing, 2 points`, info);
      const axis = await card.locator("svg text").evaluateAll((ts) => ts.map((t) => t.textContent));
      check(clocks.every((c) => axis.includes(c)), `${name}: the chart's time axis is the range, ${clocks.join(" to ")}`, axis);
      // Each point's x on the plot is where its time is in the range.
      const geo = await card.locator("svg").evaluate((s) => {
        const plot = s.querySelector("rect.plot");
        const d = s.querySelector("path.line")?.getAttribute("d") || "";
        return { x: Number(plot?.getAttribute("x")), w: Number(plot?.getAttribute("width")), from: Number(s.dataset.from), until: Number(s.dataset.until),
          xs: [...d.matchAll(/[ML]([\d.]+),/g)].map((m) => Number(m[1])) };
      });
      const want = B.times_ms.map((t) => geo.x + ((t - from) / (until - from)) * geo.w);
      check(geo.from === from && geo.until === until && geo.xs.length === want.length && geo.xs.every((x, i) => Math.abs(x - want[i]) < 0.5),
        `${name}: its points at ${want.map((x) => x.toFixed(1)).join(", ")} of the plot (40 and 30 min ago, on the last hour's ${geo.w} wide plot)`, geo);
    }
    await shot(p, "metrics-billing");
    await p.context().close();
    p = await page("dark");
    await open(p, "?view=metrics&m.service=checkout");
    await expectAttr(p, "#m-count", "data-count", 3, "metrics dark: checkout's 3 series");
    await darkChecks(p, "metrics", ["body", "header", "#m-list .metric", "#m-service", "#m-name"]);
    await shot(p, "metrics-dark");
    await p.context().close();
  }
} catch (e) {
  failures++;
  console.log("  FAIL " + (e.stack || e));
} finally {
  await browser.close();
}
console.log(failures ? `${failures} check(s) failed` : "all checks passed");
process.exit(failures ? 1 : 0);
