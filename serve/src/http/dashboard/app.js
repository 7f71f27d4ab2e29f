// storepulse live dashboard: polls the HTTP API (SQL over the live views,
// /api/v1/health, /api/v1/alerts) and redraws Chart.js charts in place.
// State for tests and debugging is mirrored into <body data-*> attributes.
"use strict";

const REFRESH_MS = 2000;
// `/#token=...` (a bookmark, a kiosk screen) logs in without the form; the
// token moves to sessionStorage and out of the address bar.
if (location.hash.startsWith("#token=")) {
  sessionStorage.setItem("storepulse.token", decodeURIComponent(location.hash.slice(7)));
  history.replaceState(null, "", location.pathname);
}
const state = { token: sessionStorage.getItem("storepulse.token") || "", charts: {}, lastCounts: null, epsSeries: {}, errors: 0, refreshes: 0, storeCity: {} };

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.token) h["Authorization"] = "Bearer " + state.token;
  return h;
}

class AuthError extends Error {}

async function api(path, init) {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), 10000);
  try {
    const r = await fetch(path, Object.assign({ signal: ctl.signal }, init, { headers: headers(init && init.headers) }));
    if (r.status === 401) throw new AuthError("token required");
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || r.statusText);
    return body;
  } finally {
    clearTimeout(timer);
  }
}

function sql(text) {
  return api("/api/v1/query", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ sql: text }) }).then(r => r.rows);
}

// SQL string literal.
function lit(s) { return "'" + String(s).replace(/'/g, "''") + "'"; }

function filter(alias) {
  const city = document.getElementById("city").value;
  const store = document.getElementById("store").value;
  const parts = [];
  if (store) parts.push(`${alias}.store_id = ${lit(store)}`);
  else if (city) parts.push(`${alias}.store_id IN (SELECT store_id FROM stores WHERE city = ${lit(city)})`);
  return parts.length ? parts.join(" AND ") : "TRUE";
}

function fmt(n, digits) {
  if (n === null || n === undefined) return "–";
  return Number(n).toLocaleString(undefined, { maximumFractionDigits: digits === undefined ? 0 : digits });
}

function fillTable(id, rows, cells) {
  const tbody = document.querySelector(`#${id} tbody`);
  tbody.replaceChildren();
  if (!rows.length) {
    const tr = document.createElement("tr");
    tr.className = "empty";
    const td = document.createElement("td");
    td.colSpan = document.querySelectorAll(`#${id} thead th`).length;
    td.textContent = "nothing right now";
    tr.append(td);
    tbody.append(tr);
    return;
  }
  for (const row of rows) {
    const tr = document.createElement("tr");
    tr.className = "row";
    for (const [value, cls] of cells(row)) {
      const td = document.createElement("td");
      td.textContent = value;
      if (cls) td.className = cls;
      tr.append(td);
    }
    tbody.append(tr);
  }
  document.body.dataset[id.replace(/-(\w)/g, (_, c) => c.toUpperCase()) + "Rows"] = String(rows.length);
}

function chart(id, config) {
  if (!state.charts[id]) {
    config.options = Object.assign({ responsive: true, maintainAspectRatio: false, animation: false }, config.options || {});
    state.charts[id] = new Chart(document.getElementById(id), config);
  }
  return state.charts[id];
}

function setSeries(id, labels, datasets) {
  const c = state.charts[id];
  c.data.labels = labels;
  datasets.forEach((d, i) => {
    if (!c.data.datasets[i]) c.data.datasets[i] = {};
    Object.assign(c.data.datasets[i], d);
  });
  c.data.datasets.length = datasets.length;
  c.update();
  document.body.dataset[id.replace(/-(\w)/g, (_, c) => c.toUpperCase()) + "Points"] =
    String(datasets.reduce((n, d) => n + d.data.filter(v => v !== null).length, 0));
}

const PALETTE = ["#2563eb", "#16a34a", "#f59e0b", "#dc2626", "#7c3aed", "#0891b2", "#db2777", "#65a30d", "#ea580c", "#475569"];

async function loadFilters() {
  const stores = await sql("SELECT store_id, name, city FROM stores ORDER BY city, store_id");
  const city = document.getElementById("city");
  const store = document.getElementById("store");
  for (const c of [...new Set(stores.map(s => s.city))]) city.add(new Option(c, c));
  for (const s of stores) store.add(new Option(`${s.store_id} · ${s.name || ""} (${s.city})`, s.store_id));
  for (const s of stores) state.storeCity[s.store_id] = s.city;
  city.addEventListener("change", () => {
    for (const o of store.options) o.hidden = !!(o.value && city.value && !o.text.endsWith(`(${city.value})`));
    store.value = "";
    refresh();
  });
  store.addEventListener("change", refresh);
}

async function refreshSales() {
  const rows = await sql(`
    WITH m AS (SELECT * FROM sales_per_minute m WHERE ${filter("m")})
    SELECT minute, sum(revenue) AS revenue, sum(receipts) AS receipts FROM m
    WHERE minute > (SELECT max(minute) FROM m) - INTERVAL '60 minutes'
    GROUP BY minute ORDER BY minute`);
  chart("chart-sales", {
    type: "line",
    data: { labels: [], datasets: [] },
    options: { scales: { y: { beginAtZero: true, title: { display: true, text: "revenue" } }, y1: { position: "right", beginAtZero: true, grid: { drawOnChartArea: false }, title: { display: true, text: "receipts" } } } },
  });
  // The last minute is still open: drawn dashed and labelled partial, not as a drop.
  const open = rows.length - 1;
  const partial = { borderDash: ctx => (ctx.p1DataIndex === open ? [5, 4] : undefined) };
  document.body.dataset.salesPartial = rows.length ? String(rows[open].minute) : "";
  setSeries("chart-sales", rows.map((r, i) => String(r.minute).slice(11, 16) + (i === open ? " (partial)" : "")), [
    { label: "revenue", data: rows.map(r => r.revenue), borderColor: PALETTE[0], backgroundColor: PALETTE[0], yAxisID: "y", pointRadius: 0, tension: 0.2, segment: partial },
    { label: "receipts", data: rows.map(r => r.receipts), borderColor: PALETTE[1], backgroundColor: PALETTE[1], yAxisID: "y1", pointRadius: 0, tension: 0.2, segment: partial },
  ]);
  const store = document.getElementById("store").value, city = document.getElementById("city").value;
  document.getElementById("sales-scope").textContent = store ? `store ${store}` : city ? city : "chain-wide";
}

async function refreshHealth() {
  const h = await api("/api/v1/health");
  const now = performance.now();
  const counts = {};
  for (const s of h.streams || []) counts[s.stream] = s.accepted_events;
  const asOf = (h.streams || []).map(s => s.watermark).filter(w => typeof w === "string" && w !== "final").sort().pop();
  document.getElementById("as-of").textContent = `${h.pipeline} · epoch ${h.epoch}` + (asOf ? ` · watermark ${String(asOf).replace("T", " ").slice(0, 19)}` : "");
  if (state.lastCounts) {
    const dt = (now - state.lastCounts.at) / 1000;
    const label = new Date().toLocaleTimeString();
    let total = 0;
    for (const [stream, n] of Object.entries(counts)) {
      const rate = Math.max(0, (n - (state.lastCounts.counts[stream] || 0)) / dt);
      total += rate;
      (state.epsSeries[stream] = state.epsSeries[stream] || []).push({ label, rate });
      if (state.epsSeries[stream].length > 60) state.epsSeries[stream].shift();
    }
    document.getElementById("eps").textContent = `${fmt(total)} events/s`;
    chart("chart-eps", { type: "line", data: { labels: [], datasets: [] }, options: { scales: { y: { beginAtZero: true } } } });
    const streams = Object.keys(state.epsSeries).sort();
    const labels = streams.length ? state.epsSeries[streams[0]].map(p => p.label) : [];
    setSeries("chart-eps", labels, streams.map((s, i) => ({ label: s, data: state.epsSeries[s].map(p => p.rate), borderColor: PALETTE[i % PALETTE.length], backgroundColor: PALETTE[i % PALETTE.length], pointRadius: 0 })));
  }
  state.lastCounts = { at: now, counts };
}

async function refreshRisk() {
  const rows = await sql(`
    SELECT store_id, sku, category, on_hand, hours_of_cover, p_stockout, expected_lost_units, suggested_order_qty
    FROM stockout_risk r WHERE ${filter("r")} AND suggested_order_qty > 0
    ORDER BY expected_lost_units DESC, p_stockout DESC, store_id, sku LIMIT 15`);
  fillTable("risk-table", rows, r => [[r.store_id], [r.sku], [r.category], [fmt(r.on_hand), "num"], [fmt(r.hours_of_cover, 1), "num"], [fmt(r.p_stockout, 3), "num"], [fmt(r.expected_lost_units, 1), "num"], [fmt(r.suggested_order_qty), "num"]]);
}

async function refreshTransfers() {
  const rows = await sql(`
    SELECT sku, from_store, to_store, qty FROM transfer_suggestions t
    WHERE ${filter("t").replace(/t\.store_id/g, "t.to_store")}
    ORDER BY qty DESC, sku, to_store LIMIT 10`);
  fillTable("transfer-table", rows, r => [[r.sku], [r.from_store], [r.to_store], [fmt(r.qty), "num"]]);
}

async function refreshPrices() {
  const rows = await sql(`
    SELECT store_id, sku, CAST(list_price AS DOUBLE) AS list_price,
      CAST(max_charged_price AS DOUBLE) AS charged, mismatched_lines,
      CAST(lost_revenue AS DOUBLE) AS lost
    FROM price_deviations p WHERE ${filter("p")} AND still_mismatched
    ORDER BY lost_revenue DESC, mismatched_lines DESC, store_id, sku LIMIT 10`);
  fillTable("price-table", rows, r => [[r.store_id], [r.sku], [fmt(r.list_price, r.list_price < 0.1 ? 6 : 2), "num"], [fmt(r.charged, r.charged < 0.1 ? 6 : 2), "num"], [fmt(r.mismatched_lines), "num"], [fmt(r.lost, 2), "num"]]);
}

async function refreshSync() {
  const rows = await sql(`
    SELECT store_id, min(minutes_behind) AS minutes_behind, sum(late_events) AS late_events
    FROM store_sync_status s WHERE ${filter("s")}
    GROUP BY store_id ORDER BY minutes_behind DESC, store_id LIMIT 10`);
  fillTable("sync-table", rows, r => [[r.store_id], [fmt(r.minutes_behind, 1), "num"], [fmt(r.late_events), "num"]]);
}

async function refreshAlerts() {
  const a = await api("/api/v1/alerts?limit=2000");
  const store = document.getElementById("store").value, city = document.getElementById("city").value;
  // An alert belongs to the store in its row (or the first part of its key).
  const storeOf = x => (x.row && x.row.store_id) || String(x.alert_key).split("|")[0];
  const keep = x => (store ? storeOf(x) === store : !city || state.storeCity[storeOf(x)] === city);
  const matching = (a.active || []).filter(keep);
  const rows = matching.slice(0, 20);
  document.getElementById("alert-total").textContent = store || city
    ? `${fmt(matching.length)} here of ${fmt(a.active_total)} chain-wide`
    : `${fmt(a.active_total)} active (${fmt(a.active_firing)} firing)`;
  fillTable("alert-table", rows, r => [[r.rule], [r.alert_key], [r.state, r.state === "firing" ? "firing" : ""], [r.severity]]);
}

async function refreshTurnover() {
  const rows = await sql(`
    SELECT category, sum(cogs) / nullif(sum(avg_inventory_cost), 0) AS turnover
    FROM inventory_turnover t
    WHERE ${filter("t")} AND period = 'week'
      AND period_start = (SELECT max(period_start) FROM inventory_turnover WHERE period = 'week')
    GROUP BY category ORDER BY category`);
  chart("chart-turnover", { type: "bar", data: { labels: [], datasets: [] }, options: { plugins: { legend: { display: false } }, scales: { y: { beginAtZero: true } } } });
  setSeries("chart-turnover", rows.map(r => r.category), [{ label: "turnover", data: rows.map(r => r.turnover), backgroundColor: PALETTE[0] }]);
}

async function refreshRfm() {
  const rows = await sql("SELECT segment, count(*) AS members FROM member_rfm GROUP BY segment ORDER BY members DESC, segment");
  chart("chart-rfm", { type: "doughnut", data: { labels: [], datasets: [] }, options: { plugins: { legend: { position: "right" } } } });
  setSeries("chart-rfm", rows.map(r => r.segment), [{ label: "members", data: rows.map(r => r.members), backgroundColor: rows.map((_, i) => PALETTE[i % PALETTE.length]) }]);
}

let refreshing = false;
async function refresh() {
  if (refreshing) return;
  refreshing = true;
  const results = await Promise.allSettled([refreshHealth(), refreshSales(), refreshRisk(), refreshTransfers(), refreshPrices(), refreshSync(), refreshAlerts(), refreshTurnover(), refreshRfm()]);
  refreshing = false;
  const failed = results.filter(r => r.status === "rejected").map(r => r.reason);
  if (failed.some(e => e instanceof AuthError)) {
    document.getElementById("login").hidden = false;
    return;
  }
  state.refreshes += 1;
  state.errors = failed.length;
  document.body.dataset.refreshes = String(state.refreshes);
  document.body.dataset.errors = String(failed.length);
  document.getElementById("error").textContent = failed.map(e => e.message).join(" · ");
  document.body.dataset.overflow = String(document.documentElement.scrollWidth > window.innerWidth);
  if (state.refreshes >= 2) document.body.dataset.ready = "1";
}

async function start() {
  try {
    await loadFilters();
  } catch (e) {
    if (e instanceof AuthError) {
      document.getElementById("login").hidden = false;
      return;
    }
    document.getElementById("error").textContent = `filters: ${e.message}`;
  }
  await refresh();
  // A second refresh right away gives the events/s chart its first rate.
  await refresh();
  setInterval(refresh, REFRESH_MS);
}

document.getElementById("login").addEventListener("submit", ev => {
  ev.preventDefault();
  state.token = document.getElementById("token").value.trim();
  sessionStorage.setItem("storepulse.token", state.token);
  document.getElementById("login").hidden = true;
  start();
});

window.addEventListener("DOMContentLoaded", start);
