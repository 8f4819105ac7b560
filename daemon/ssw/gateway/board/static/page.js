// ssw's live status page: reads /ui/stream (server-sent events, with the key in a
// header, so it never sits in a URL or a cookie) and draws each frame. No build step,
// no library: every text goes in through textContent, never as HTML.
"use strict";

const KEY = "ssw.key";
const $ = (sel) => document.querySelector(sel);
// For the browser test and the curious: when each event reached the screen.
window.__ssw = { frames: 0, latencies: [], seen: new Set() };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null) continue;
    if (name === "class") node.className = value;
    else if (name === "width") node.style.width = value; // CSSOM: allowed by the page's CSP
    else node.setAttribute(name, String(value));
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const gb = (bytes) => (bytes / 1e9).toFixed(1) + " GB";
function ago(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 90) return seconds.toFixed(0) + " s";
  if (seconds < 5400) return (seconds / 60).toFixed(0) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}
function clock(at) {
  return new Date(at * 1000).toLocaleTimeString([], { hour12: false });
}

function message(text, info = false) {
  const m = $("#message");
  m.textContent = text;
  m.className = info ? "info" : "";
}

function renderGpus(status) {
  const box = $("#gpus");
  box.replaceChildren();
  const held = {};
  for (const w of status.workers) {
    for (const g of w.gpus) held[g] = (held[g] || []).concat([w]);
  }
  for (const g of status.gpus) {
    const total = g.memory_total_bytes || 1;
    const bar = el("div", { class: "mem", title: "held by workers, reserved by loads, free" });
    for (const w of held[g.index] || []) {
      const bytes = w.vram_measured_bytes ?? w.vram_budget_bytes;
      if (w.state === "sleeping" || !bytes) continue;
      bar.append(el("span", { class: "held", width: `${(100 * bytes) / total}%`, title: `${w.model}: ${gb(bytes)}` }));
    }
    if (g.memory_reserved_bytes) {
      bar.append(el("span", { class: "reserved", width: `${(100 * g.memory_reserved_bytes) / total}%`, title: "reserved" }));
    }
    const util = g.utilization_pct === null ? "" : `, ${g.utilization_pct} % busy`;
    box.append(
      el("div", { class: "gpu", "data-gpu": g.index },
        el("div", {}, `GPU ${g.index} ${g.name}${g.simulated ? " (simulated)" : ""}: `,
          `${gb(g.memory_used_bytes)} used, ${gb(g.memory_reserved_bytes)} reserved, ${gb(g.memory_free_bytes)} free of ${gb(total)}${util}`),
        bar));
  }
}

function tier(w) {
  if (w.state === "sleeping") return `sleeping (level ${w.sleep_level ?? "?"})`;
  if (w.state === "ready" || w.state === "unhealthy") return "ready";
  if (w.state === "stopping" || w.state === "draining") return "leaving";
  return w.state;
}

function renderWorkers(status, inFlight) {
  const body = $("#workers tbody");
  body.replaceChildren();
  for (const w of status.workers) {
    const flying = Object.values(inFlight[w.unit] || {}).reduce((a, b) => a + b, 0);
    body.append(
      el("tr", { "data-unit": w.unit, "data-model": w.model, "data-state": w.state },
        el("td", {}, w.unit), el("td", {}, w.model), el("td", {}, w.replica),
        el("td", { class: "state-" + w.state }, w.state), el("td", {}, tier(w)),
        el("td", {}, w.gpus.join(",")), el("td", {}, ago(w.uptime_s)), el("td", {}, flying),
        el("td", {}, ago(w.idle_s)), el("td", { class: "why", title: w.state_reason }, w.state_reason)));
  }
}

function renderLoads(status) {
  const box = $("#loads");
  box.replaceChildren();
  for (const [name, m] of Object.entries(status.models)) {
    const p = m.progress;
    if (!p) continue;
    const expected = p.expected_s;
    const value = expected ? Math.min(p.elapsed_s / expected, 1) : 0;
    const late = expected !== null && p.elapsed_s > expected;
    const eta = expected === null ? "first load here: no ETA yet" : late ? `${(p.elapsed_s - expected).toFixed(1)} s past the usual ${expected} s` : `ETA ${p.eta_s} s of ~${expected} s`;
    box.append(
      el("div", { class: "load" + (late ? " late" : ""), "data-model": name, "data-phase": p.phase },
        el("div", {}, `${name}: ${p.kind}, ${p.phase.replace("_", " ")}, ${p.elapsed_s} s — ${eta}`),
        el("progress", { max: 1, value: value.toFixed(3) })));
  }
  for (const [name, m] of Object.entries(status.models)) {
    const state = m.load.state;
    if (state === "backing_off" || state === "cooling_down") {
      box.append(el("div", { class: "load failed", "data-model": name, "data-state": state },
        `${name}: ${state.replace("_", " ")} — ${m.load.last_error || m.load.reason}`));
    }
  }
  if (!box.children.length) box.append(el("p", { class: "none" }, "none"));
}

function renderWaiting(waiting) {
  const box = $("#waiting");
  box.replaceChildren();
  for (const [model, byPriority] of Object.entries(waiting)) {
    const parts = Object.entries(byPriority).map(([p, n]) => `${n} ${p}`);
    box.append(el("div", { "data-model": model }, `${model}: ${parts.join(", ")}`));
  }
  if (!box.children.length) box.append(el("p", { class: "none" }, "nobody"));
}

function renderEvents(status) {
  const list = $("#events");
  const seen = window.__ssw.seen;
  const fresh = status.events.filter((e) => !seen.has(e.at + e.text));
  for (const e of fresh) {
    seen.add(e.at + e.text);
    list.prepend(el("li", { "data-kind": e.kind, "data-model": e.model },
      el("time", {}, clock(e.at)), el("span", { class: "kind kind-" + e.kind }, e.kind), " ", e.text));
  }
  while (list.children.length > 300) list.lastChild.remove();
  if (fresh.length && window.__ssw.frames > 1) {
    // Event to pixel: the frame after the DOM change is the one on screen.
    requestAnimationFrame(() => requestAnimationFrame(() => {
      const now = Date.now();
      for (const e of fresh) window.__ssw.latencies.push(now - e.at * 1000);
    }));
  }
}

function path(values, max, width, height) {
  let d = "";
  values.forEach((v, i) => {
    if (v === null) return;
    const x = (i / (values.length - 1)) * width;
    const y = height - (v / max) * (height - 2) - 1;
    const joined = i > 0 && values[i - 1] !== null;
    d += (joined ? "L" : "M") + x.toFixed(1) + "," + y.toFixed(1);
    // A point alone (one busy bucket) is a short dash, not nothing.
    if (!joined && (i + 1 >= values.length || values[i + 1] === null)) d += "h-3";
  });
  return d;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

function renderCharts(charts) {
  const box = $("#charts");
  box.replaceChildren();
  const W = 240, H = 50;
  for (const [name, s] of Object.entries(charts.series)) {
    const maxRate = Math.max(...s.rate, 0.1);
    const lat = s.p95_ms.concat(s.p50_ms).filter((v) => v !== null);
    const maxLat = Math.max(...lat, 1);
    const last = (xs) => [...xs].reverse().find((v) => v !== null);
    const rateSvg = svg("svg", { width: W, height: H, role: "img" });
    rateSvg.append(svg("path", { class: "rate", d: path(s.rate, maxRate, W, H) }));
    const latSvg = svg("svg", { width: W, height: H, role: "img" });
    latSvg.append(svg("path", { class: "p95", d: path(s.p95_ms, maxLat, W, H) }));
    latSvg.append(svg("path", { class: "p50", d: path(s.p50_ms, maxLat, W, H) }));
    box.append(el("div", { class: "chart", "data-series": name },
      el("div", {}, `${name}: ${(last(s.rate) ?? 0).toFixed(2)} req/s (max ${maxRate.toFixed(2)})`), rateSvg,
      el("div", {}, `p50 ${last(s.p50_ms) ?? "-"} ms, p95 ${last(s.p95_ms) ?? "-"} ms (max ${maxLat.toFixed(0)} ms)`), latSvg,
      s.errors ? el("div", { class: "state-failed" }, `${s.errors} errors`) : ""));
  }
  if (!box.children.length) box.append(el("p", { class: "none" }, "no requests yet"));
}

function renderBatches(batches) {
  const box = $("#batches");
  box.replaceChildren();
  if (!batches) return box.append(el("p", { class: "none" }, "the batch tier is off"));
  if (batches.error) return box.append(el("p", { class: "state-failed" }, batches.error));
  for (const b of batches.batches || []) {
    const total = Number(b.total) || 0;
    const done = Number(b.completed) + Number(b.failed);
    box.append(el("div", { class: "load", "data-batch": b.id },
      el("div", {}, `${b.id} (${b.model || "?"}): ${b.status}, ${done} of ${total}` + (Number(b.failed) ? `, ${b.failed} failed` : "")),
      el("progress", { max: total || 1, value: done })));
  }
  for (const j of batches.jobs || []) {
    box.append(el("div", { "data-job": j.id }, `${j.id} (${j.model || "?"}): ${j.status}`));
  }
  if (!box.children.length) box.append(el("p", { class: "none" }, "none"));
}

function renderFleet(fleet) {
  const section = $("#fleet-section");
  section.hidden = !fleet;
  if (!fleet) return;
  const body = $("#fleet tbody");
  body.replaceChildren();
  const now = Date.now() / 1000;
  for (const [name, h] of Object.entries(fleet.hosts)) {
    body.append(el("tr", { "data-host": name }, el("td", {}, name + (name === fleet.host ? " (this one)" : "")),
      el("td", { class: h.reachable ? "state-ready" : "state-failed" }, h.reachable ? "yes" : "no"),
      el("td", {}, h.gpus), el("td", {}, gb(h.free_bytes)), el("td", {}, h.ready.join(", ")), el("td", {}, ago(now - h.at) + " ago")));
  }
}

function render(frame) {
  window.__ssw.frames += 1;
  $("#host").textContent = frame.host;
  $("#updated").textContent = "updated " + clock(frame.at);
  $("#board").hidden = false;
  renderWaiting(frame.waiting);
  renderCharts(frame.charts);
  renderBatches(frame.batches);
  renderFleet(frame.fleet);
  const status = frame.status;
  if (!status) {
    message("The loader is away: " + (frame.loader.error || "not connected") + ". The gateway serves the workers it knows; this page shows what it can.", true);
    return;
  }
  message("");
  renderGpus(status);
  renderLoads(status);
  renderWorkers(status, frame.in_flight);
  renderEvents(status);
}

function connected(on, text) {
  const badge = $("#conn");
  badge.textContent = text;
  badge.className = "badge" + (on ? "" : " off");
}

async function follow(key) {
  let backoff = 1000;
  for (;;) {
    let resp;
    try {
      const headers = key ? { Authorization: "Bearer " + key } : {};
      resp = await fetch("/ui/stream", { headers, cache: "no-store" });
    } catch (err) {
      connected(false, "gateway unreachable");
      await new Promise((r) => setTimeout(r, backoff));
      backoff = Math.min(backoff * 2, 15000);
      continue;
    }
    if (resp.status === 401 || resp.status === 403) {
      let why = "refused";
      try { why = (await resp.json()).error.message; } catch (err) { /* keep the word */ }
      sessionStorage.removeItem(KEY);
      connected(false, "refused");
      message(key ? "Refused: " + why : "This page needs an operator key.", !key);
      $("#board").hidden = true;
      $("#login").hidden = false;
      return;
    }
    if (!resp.ok) {
      connected(false, "error " + resp.status);
      await new Promise((r) => setTimeout(r, backoff));
      continue;
    }
    connected(true, "live");
    backoff = 1000;
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let pending = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        pending += value;
        let cut;
        while ((cut = pending.indexOf("\n\n")) >= 0) {
          const block = pending.slice(0, cut);
          pending = pending.slice(cut + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
          if (data) render(JSON.parse(data));
        }
      }
    } catch (err) {
      /* the stream broke: reconnect */
    }
    connected(false, "reconnecting");
    await new Promise((r) => setTimeout(r, backoff));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const form = $("#login");
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("#key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY, key);
    form.hidden = true;
    message("");
    follow(key);
  });
  // No key yet: try without one (a host with auth off), and ask for one if refused.
  follow(sessionStorage.getItem(KEY) || "");
});
