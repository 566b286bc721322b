// The Shoal dashboard: renders each snapshot the server streams (/events, server-sent
// events). Everything from the mesh is set as textContent or an attribute, never as
// HTML. Rows are kept by key and updated in place, so the page does not flicker and a
// row an operator is looking at stays where it is. ES modules: dom.js has the helpers,
// traces.js the recent traces.
import { $, cells, el, fmt, sync } from "/dom.js";
import { renderTraces } from "/traces.js";

const SVG = "http://www.w3.org/2000/svg";

const figureCells = (f) => ({ rps: fmt.rps(f), errors: fmt.errors(f), p50: fmt.ms(f.p50_ms), p99: fmt.ms(f.p99_ms) });

const COLUMNS = ["instance", "address", "health", "zone", "weight", "load", "lease age",
  "req/s", "errors", "p50", "p99", "scrape"];

function makeService(service) {
  const table = el("table", { class: "service", "data-service": service.name });
  table.appendChild(el("caption"));
  const head = table.appendChild(el("thead")).appendChild(el("tr"));
  for (const name of COLUMNS) head.appendChild(el("th", {}, name));
  table.appendChild(el("tbody"));
  const total = table.appendChild(el("tfoot")).appendChild(el("tr", { class: "total" }));
  total.dataset.serviceTotal = service.name;
  return table;
}

function updateService(table, service) {
  const f = service.figures;
  table.querySelector("caption").textContent =
    `${service.name} · ${service.serving}/${service.instances} serving`;
  sync(table.querySelector("tbody"), service.rows, (r) => r.id, () => el("tr"), updateInstance);
  cells(table.querySelector("tfoot tr"), {
    instance: "all instances", address: "", health: "", zone: "", weight: "", load: "",
    lease: "", ...figureCells(f), scrape: "",
  });
}

function updateInstance(row, inst) {
  row.dataset.instanceId = inst.id;
  row.dataset.health = inst.health;
  row.dataset.status = inst.status;
  row.className = inst.health === "healthy" && inst.status === "SERVING" ? "ok" : "bad";
  const load = inst.load;
  cells(row, {
    instance: inst.id,
    address: inst.address,
    // The registry's "healthy" is the lease's state; the status is the app's own.
    health: `${inst.health === "healthy" ? "lease live" : "lease lapsed"} · ${inst.status}`,
    zone: inst.zone || "–",
    weight: String(inst.weight),
    load: `${load.in_flight} in flight, ${load.queue_depth} queued, ${load.cpu_percent}% cpu`,
    lease: fmt.age(inst.lease_age),
    ...figureCells(inst.figures),
    scrape: inst.scrape === null ? "ok" : inst.scrape,
  });
}

function renderGraph(snap) {
  // One edge per pair: the callee's view where it has one, else the caller's.
  const pairs = new Map();
  for (const e of snap.edges) {
    const key = `${e.caller}\u0000${e.service}`;
    if (!pairs.has(key) || e.seen === "inbound") pairs.set(key, e);
  }
  const edges = Array.from(pairs.values());
  const registered = new Set(snap.services.map((s) => s.name));
  const names = new Set(registered);
  for (const e of edges) { names.add(e.caller); names.add(e.service); }
  // Columns by longest path from a caller nobody calls; cycles stop at the node count.
  const depth = new Map(Array.from(names, (n) => [n, 0]));
  for (let round = 0; round < names.size; round++) {
    for (const e of edges) {
      if (e.caller !== e.service && depth.get(e.service) <= depth.get(e.caller)) {
        depth.set(e.service, Math.min(depth.get(e.caller) + 1, names.size));
      }
    }
  }
  const columns = [];
  for (const name of Array.from(names).sort()) {
    const d = depth.get(name);
    (columns[d] = columns[d] || []).push(name);
  }
  // Columns far enough apart for an edge's label between them.
  const W = 420, H = 90, BOX_W = 150, BOX_H = 36;
  const at = new Map();
  columns.forEach((col, c) => col.forEach((name, r) => at.set(name, { x: 20 + c * W, y: 20 + r * H })));
  const svg = $("#graph");
  const width = 40 + Math.max(1, columns.length) * W - (W - BOX_W);
  const height = 40 + Math.max(1, ...columns.map((c) => c.length)) * H - (H - BOX_H);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("width", String(width));
  svg.setAttribute("height", String(height));
  svg.replaceChildren();
  const defs = svg.appendChild(el("defs", {}, undefined, SVG));
  const marker = defs.appendChild(el("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5,
    markerWidth: 8, markerHeight: 8, orient: "auto-start-reverse" }, undefined, SVG));
  marker.appendChild(el("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrowhead" }, undefined, SVG));
  for (const e of edges) {
    const a = at.get(e.caller), b = at.get(e.service);
    const x1 = a.x + BOX_W, y1 = a.y + BOX_H / 2, x2 = b.x, y2 = b.y + BOX_H / 2;
    const bad = e.figures.error_rate !== null && e.figures.error_rate > 0;
    svg.appendChild(el("path", {
      d: `M ${x1} ${y1} C ${x1 + 60} ${y1}, ${x2 - 60} ${y2}, ${x2} ${y2}`,
      class: bad ? "edge bad" : "edge", "marker-end": "url(#arrow)",
    }, undefined, SVG));
    const f = e.figures;
    const label = `${fmt.rps(f)} req/s · ${fmt.errors(f)} err · p99 ${fmt.ms(f.p99_ms)}`;
    svg.appendChild(el("text", { x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 6, class: "edge-label",
      "text-anchor": "middle", "data-edge": `${e.caller}->${e.service}` }, label, SVG));
  }
  for (const [name, p] of at) {
    const kind = registered.has(name) ? "node" : "node external"; // external: not registered
    const g = svg.appendChild(el("g", { class: kind, "data-node": name }, undefined, SVG));
    g.appendChild(el("rect", { x: p.x, y: p.y, width: BOX_W, height: BOX_H, rx: 6 }, undefined, SVG));
    g.appendChild(el("text", { x: p.x + BOX_W / 2, y: p.y + BOX_H / 2 + 5, "text-anchor": "middle" }, name, SVG));
  }
}

function render(snap) {
  const reg = snap.registry;
  const registry = $("#registry");
  registry.dataset.state = reg.connected ? "connected" : "disconnected";
  registry.textContent = reg.connected
    ? `registry ${reg.address}: watching (revision ${reg.revision})`
    : `registry ${reg.address}: ${reg.error || "connecting"}`;
  $("#updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  $("#window").textContent = `figures over the last ${snap.window_seconds} s`;
  $("#no-services").hidden = snap.services.length > 0;
  sync($("#services"), snap.services, (s) => s.name, makeService, updateService);
  const cut = $("#rows-cut");
  cut.hidden = snap.instances_shown >= snap.instances_total;
  cut.textContent = `${snap.instances_total - snap.instances_shown} more instances not shown`;

  renderGraph(snap);
  sync($("#edges tbody"), snap.edges, (e) => `${e.caller}>${e.service}>${e.seen}`, () => el("tr"),
    (row, e) => cells(row, { caller: e.caller, service: e.service, seen: `${e.seen} sidecars`,
      ...figureCells(e.figures) }));

  const denied = snap.denied;
  const total = $("#denied-total");
  total.dataset.total = String(denied.total);
  total.textContent = String(denied.total);
  $("#denied-recent").textContent = `${denied.recent} in the last ${snap.window_seconds} s`;
  sync($("#denied tbody"), denied.pairs, (p) => `${p.source}>${p.destination}`, () => el("tr"),
    (row, p) => cells(row, { source: p.source, destination: p.destination,
      recent: String(p.recent), total: String(p.total) }));

  renderTraces(snap.traces === undefined ? null : snap.traces);

  $("#load-updates").textContent = `(${snap.load_updates} load reports not listed)`;
  sync($("#events"), snap.events, (e) => `${e.revision}>${e.kind}>${e.instance}`, () => el("li"),
    (li, e) => {
      li.dataset.kind = e.kind;
      li.textContent = `${fmt.time(e.at)}  rev ${e.revision}  ${e.kind}  ` +
        `${e.service ? `${e.service}/${e.instance}` : ""}  ${e.detail}`;
    });
  sync($("#targets tbody"), snap.targets, (t) => t.address, () => el("tr"),
    (row, t) => cells(row, { address: t.address, instance: t.instance || "(named by --scrape)",
      scrape: t.error === null ? "ok" : t.error }));
}

const stream = $("#stream");
const source = new EventSource("/events");
source.onopen = () => { stream.dataset.state = "live"; stream.textContent = "live"; };
source.onerror = () => { stream.dataset.state = "reconnecting"; stream.textContent = "live: reconnecting"; };
source.onmessage = (message) => render(JSON.parse(message.data));
