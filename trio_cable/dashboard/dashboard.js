// The trio_cable dashboard: polls /_dashboard/data once a second with the key (kept in this
// tab's sessionStorage only) and draws the last five minutes.  Nothing is shown, or even
// asked for, without the key.
"use strict";
const WINDOW = 300;  // points kept (one a second)
const CHARTS = [
  {id: "connections", title: "Connections", series: ["open", "pending handshakes"]},
  {id: "handshakes", title: "Handshakes / s", series: ["accepted", "refused", "failed"]},
  {id: "refusals", title: "Refusals / s by reason", series: []},  // one series per reason
  {id: "lag", title: "Event-loop lag (ms)", series: ["max", "p99"]},
  {id: "gc", title: "Full GC pauses (ms, max per second)", series: ["pause"]},
  {id: "drain", title: "Drain and rebalancing (per s)", series: ["drained", "handed on"]},
  // Under serve --workers N: one series per worker (only drawn when there are several).
  {id: "worker_connections", title: "Connections per worker", series: [], perWorker: true},
  {id: "worker_lag", title: "Event-loop lag max per worker (ms)", series: [], perWorker: true},
];
const dashboard = {points: [], charts: {}, key: sessionStorage.getItem("trio_cable_key") || "",
                   last: null, reasons: [], workers: [], status: "idle"};
window.dashboard = dashboard;

function rate(now, prev, pick) {
  if (!prev) return null;
  const dt = now.time - prev.time;
  const d = pick(now) - pick(prev);
  return dt > 0 && d >= 0 ? d / dt : null;
}

function row(now, prev) {
  const refused = (s) => Object.values(s.refused || {}).reduce((a, b) => a + b, 0);
  const out = {
    t: now.time,
    connections: [now.connections, now.pending_handshakes],
    handshakes: [rate(now, prev, (s) => s.accepted), rate(now, prev, refused),
                 rate(now, prev, (s) => s.handshakes_failed)],
    refusals: dashboard.reasons.map((r) => rate(now, prev, (s) => (s.refused || {})[r] || 0)),
    lag: [now.lag_max_ms, now.lag_p99_ms],
    gc: [now.gc_pause_max_ms],
    drain: [rate(now, prev, (s) => s.drained), rate(now, prev, (s) => s.rebalanced)],
  };
  const byWorker = {};
  for (const w of now.workers || []) byWorker[w.worker] = w;
  const pick = (field) => dashboard.workers.map((k) => (byWorker[k] ? byWorker[k][field] : null));
  out.worker_connections = pick("connections");
  out.worker_lag = pick("lag_max_ms");
  return out;
}

function makeChart(spec) {
  const box = document.createElement("div");
  box.className = "chart";
  box.id = "chart-" + spec.id;
  box.innerHTML = "<h2>" + spec.title + "</h2>";
  document.getElementById("charts").appendChild(box);
  const colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2"];
  const opts = {
    width: 480, height: 200,
    scales: {x: {time: true}},
    series: [{}].concat(spec.series.map((name, i) => ({label: name, stroke: colors[i % 7], width: 1.5}))),
  };
  return new uPlot(opts, [[]].concat(spec.series.map(() => [])), box);
}

function redraw() {
  for (const spec of CHARTS) {
    let chart = dashboard.charts[spec.id];
    if (spec.perWorker && dashboard.workers.length < 2) continue;  // one process: nothing to split
    // Charts whose series come and go (refusal reasons, workers) are rebuilt when they change.
    const wanted = spec.id === "refusals" ? dashboard.reasons
                 : spec.perWorker ? dashboard.workers.map((k) => "worker " + k) : null;
    if (wanted && spec.series.length !== wanted.length) {
      if (chart) { chart.destroy(); document.getElementById("chart-" + spec.id).remove(); }
      spec.series = wanted.slice();
      chart = null;
    }
    if (!chart) chart = dashboard.charts[spec.id] = makeChart(spec);
    const data = [dashboard.points.map((p) => p.t)];
    spec.series.forEach((_, i) => data.push(dashboard.points.map((p) => (p[spec.id] || [])[i] ?? null)));
    chart.setData(data);
  }
}

function showStatus(s) {
  const broker = s.broker.connected === false ? "<span class=bad>broker: disconnected</span>"
                                               : "<span>broker: " + s.broker.kind + "</span>";
  document.getElementById("node").textContent = s.node;
  document.getElementById("status").innerHTML =
    "<span>connections: <b id=conns>" + s.connections + "</b></span>" +
    "<span>streams: " + s.streams + "</span>" +
    (s.draining ? "<span class=bad>draining</span>" : "<span>serving</span>") +
    broker + "<span>handshake limit: " + Math.round(s.handshake_rate_limit) + "/s</span>" +
    (s.workers ? "<span>workers: <b id=workers>" + s.workers.length + "</b></span>" : "");
}

async function poll() {
  if (!dashboard.key) { document.getElementById("login").style.display = "block"; return; }
  let answer;
  try {
    answer = await fetch("/_dashboard/data", {headers: {authorization: "Bearer " + dashboard.key},
                                               cache: "no-store"});
  } catch (e) { dashboard.status = "offline"; return; }
  if (answer.status === 401) {
    dashboard.key = ""; sessionStorage.removeItem("trio_cable_key");
    dashboard.status = "refused";
    document.getElementById("loginmsg").textContent = "wrong key";
    document.getElementById("login").style.display = "block";
    return;
  }
  if (!answer.ok) { dashboard.status = "error " + answer.status; return; }
  const s = await answer.json();
  document.getElementById("login").style.display = "none";
  for (const r of Object.keys(s.refused || {})) if (!dashboard.reasons.includes(r)) dashboard.reasons.push(r);
  for (const w of s.workers || []) if (!dashboard.workers.includes(w.worker)) dashboard.workers.push(w.worker);
  dashboard.workers.sort((a, b) => a - b);
  dashboard.points.push(row(s, dashboard.last));
  if (dashboard.points.length > WINDOW) dashboard.points.shift();
  dashboard.last = s;
  dashboard.status = "live";
  showStatus(s);
  redraw();
}

document.getElementById("login").addEventListener("submit", (event) => {
  event.preventDefault();
  dashboard.key = document.getElementById("key").value;
  sessionStorage.setItem("trio_cable_key", dashboard.key);
  document.getElementById("loginmsg").textContent = "";
  poll();
});
poll();
setInterval(poll, 1000);
