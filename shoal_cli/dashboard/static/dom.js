// What every part of the dashboard's page builds with: elements made and kept in place,
// never HTML from data (text is set as textContent, values as attributes).

export const $ = (selector) => document.querySelector(selector);

export function el(tag, attrs = {}, text = undefined, ns = null) {
  const node = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

export const fmt = {
  rps: (f) => f.rps.toFixed(f.rps < 100 ? 2 : 0),
  errors: (f) => (f.error_rate === null ? "–" : `${(f.error_rate * 100).toFixed(1)}%`),
  ms: (v) => (v === null ? "–" : `${v < 10 ? v.toFixed(2) : v.toFixed(1)} ms`),
  age: (s) => (s < 120 ? `${s.toFixed(1)} s` : `${Math.round(s / 60)} min`),
  time: (t) => new Date(t * 1000).toLocaleTimeString(),
  clock: (t) => {
    const d = new Date(t * 1000);
    return `${d.toLocaleTimeString([], { hour12: false })}.${String(d.getMilliseconds()).padStart(3, "0")}`;
  },
};

// Keep `parent`'s children one per item, by key, in the items' order.
export function sync(parent, items, keyOf, make, update) {
  const old = new Map();
  for (const child of Array.from(parent.children)) old.set(child.dataset.key, child);
  items.forEach((item, i) => {
    const key = String(keyOf(item));
    let node = old.get(key);
    if (node) old.delete(key);
    else {
      node = make(item);
      node.dataset.key = key;
    }
    if (parent.children[i] !== node) parent.insertBefore(node, parent.children[i] || null);
    update(node, item);
  });
  for (const node of old.values()) node.remove();
}

export function cells(row, values) {
  for (const [name, text] of Object.entries(values)) {
    let cell = row.querySelector(`td.${name}`);
    if (!cell) cell = row.appendChild(el("td", { class: name }));
    if (cell.textContent !== text) cell.textContent = text;
  }
}
