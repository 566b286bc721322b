// The page's recent traces: a row per trace, and the waterfall of the one clicked.

import { $, cells, el, fmt, sync } from "/dom.js";

// The open waterfall is the trace as last received: it stays open when the trace
// leaves the latest ones, so no live update closes what an operator is reading.
let open = null;
let latest = new Map();
const ATTRIBUTES = { "shoal.upstream": "upstream", "shoal.retries": "retries",
  "rpc.grpc.status_code": "grpc status", "process.pid": "pid" };
const HUES = 6;
// A worker's own span of an Echo lasts microseconds: "0.00 ms" would say nothing.
const took = (ms) => (ms < 1 ? `${Math.round(ms * 1000)} µs` : fmt.ms(ms));

function makeTrace() {
  const row = el("tr", { class: "trace", tabindex: 0 });
  const choose = () => toggleTrace(row.dataset.traceId);
  row.addEventListener("click", choose);
  row.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); choose(); }
  });
  return row;
}

function updateTrace(row, t) {
  row.dataset.traceId = t.trace_id;
  row.dataset.status = t.error ? "error" : "ok";
  row.setAttribute("aria-selected", String(open !== null && open.id === t.trace_id));
  cells(row, {
    time: fmt.clock(t.start),
    root: `${t.service}: ${t.root}`,
    services: t.services.join(" → "),
    duration: took(t.duration_ms),
    spans: t.dropped ? `${t.span_count} (+${t.dropped} dropped)` : String(t.span_count),
    status: t.error ? "error" : "ok",
  });
}

function toggleTrace(id) {
  open = open !== null && open.id === id ? null : { id, trace: latest.get(id) };
  for (const row of document.querySelectorAll("#traces tbody tr")) {
    row.setAttribute("aria-selected", String(open !== null && open.id === row.dataset.traceId));
  }
  renderWaterfall(true);
}

function makeSpan() {
  const li = el("li", { class: "span-row" });
  const label = li.appendChild(el("span", { class: "span-label" }));
  label.append(el("span", { class: "span-service" }), " ", el("span", { class: "span-name" }));
  li.appendChild(el("span", { class: "span-track" })).appendChild(el("span", { class: "span-bar" }));
  li.appendChild(el("span", { class: "span-details" }));
  return li;
}

function updateSpan(li, s, total, services) {
  Object.assign(li.dataset, { spanId: s.id, depth: String(s.depth), service: s.service,
    status: s.status, hue: String(services.indexOf(s.service) % HUES) });
  const label = li.querySelector(".span-label");
  // Geometry goes through the CSS object model, which the page's CSP allows (unlike a
  // style attribute).
  label.style.paddingLeft = `${s.depth * 1.25}rem`;
  label.querySelector(".span-service").textContent = s.service;
  label.querySelector(".span-name").textContent = s.name;
  const bar = li.querySelector(".span-bar");
  bar.style.left = `${(100 * s.offset_ms) / total}%`;
  bar.style.width = `${(100 * s.duration_ms) / total}%`;
  bar.title = `${s.kind} span, ${took(s.duration_ms)} from +${took(s.offset_ms)}`;
  const details = [took(s.duration_ms), s.kind];
  for (const [key, name] of Object.entries(ATTRIBUTES)) {
    if (key in s.attributes) details.push(`${name} ${s.attributes[key]}`);
  }
  if (s.status === "error") details.push("error");
  li.querySelector(".span-details").textContent = details.join(" · ");
}

function renderWaterfall(current) {
  const box = $("#waterfall");
  box.hidden = open === null || open.trace === undefined;
  if (box.hidden) return;
  const t = open.trace;
  box.dataset.traceId = t.trace_id;
  $("#waterfall-title").textContent =
    `trace ${t.trace_id} · ${t.service}: ${t.root} · ${took(t.duration_ms)}`;
  const notes = [];
  if (!current) notes.push("no longer among the latest traces: shown as last received");
  if (t.spans_cut) notes.push(`${t.spans_cut} more spans not shown`);
  if (t.dropped) notes.push(`${t.dropped} spans dropped (past what one trace keeps)`);
  $("#waterfall-note").textContent = notes.join(" · ");
  // The scale is the trace's duration, or longer when a span ends past its root.
  const total = Math.max(0.001, t.duration_ms, ...t.spans.map((s) => s.offset_ms + s.duration_ms));
  $("#waterfall-end").textContent = took(total);
  sync($("#waterfall-spans"), t.spans, (s) => s.id, makeSpan,
    (li, s) => updateSpan(li, s, total, t.services));
}

export function renderTraces(traces) {
  const on = traces !== null;
  $("#traces-off").hidden = on;
  $("#no-traces").hidden = !on || traces.recent.length > 0;
  $("#traces").hidden = !on || traces.recent.length === 0;
  if (!on) {
    open = null;
    renderWaterfall(false);
    return;
  }
  const share = traces.share < 1 ? ` · under load, ${(traces.share * 100).toPrecision(2)}% of new traces kept` : "";
  $("#traces-note").textContent =
    `received on ${traces.listen} (OTLP/gRPC) · ${traces.received} spans, ${traces.kept} traces kept${share}`;
  latest = new Map(traces.recent.map((t) => [t.trace_id, t]));
  sync($("#traces tbody"), traces.recent, (t) => t.trace_id, makeTrace, updateTrace);
  if (open !== null && latest.has(open.id)) open.trace = latest.get(open.id);
  renderWaterfall(open !== null && latest.has(open.id));
}

$("#waterfall-close").addEventListener("click", () => { if (open !== null) toggleTrace(open.id); });
