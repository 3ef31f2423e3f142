// The usage page's charts, drawn with uPlot (vendored beside this file): TTFT and ITL
// distributions per model, TTFT over time, spend per day, and the newest requests as
// waterfalls. renderCharts(data) is called by dashboard.js with api/usage's answer;
// window.trioproxyCharts holds the live charts by name (the browser test reads them).
"use strict";

const PALETTE = ["#3b7dd8", "#e0823d", "#2a9d6f", "#c2417a", "#7a5cc7", "#8c8c2e", "#2aa1b3",
                 "#a0522d"];
// a request's timestamps in order; each waterfall segment ends at its own timestamp
const PHASES = [
  ["written_ms", "written upstream (the proxy's time)", "#d62728"],
  ["head_ms", "response head", "#e0b03d"],
  ["first_token_ms", "first token", "#3b7dd8"],
  ["last_token_ms", "last token", "#2a9d6f"],
  ["last_byte_ms", "last byte", "#9aa5b1"],
];
const HEIGHT = 230;
window.trioproxyCharts = {};

const msText = (v) => (v == null ? "–" : Number(v).toFixed(v < 10 ? 2 : 1) + " ms");
const utcDate = (ts) => uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC");

function ink() {
  return getComputedStyle(document.body).color;
}

function axis(label, extra) {
  return {stroke: ink(), grid: {stroke: "#8883", width: 1}, ticks: {stroke: "#8886", width: 1},
          label, labelSize: 18, ...extra};
}

function place(name, el, opts, data) {
  const old = window.trioproxyCharts[name];
  if (old) old.destroy();
  delete window.trioproxyCharts[name];
  el.replaceChildren();
  if (data == null) {
    const p = document.createElement("p");
    p.className = "empty";
    p.textContent = "nothing measured in this period";
    el.append(p);
    return;
  }
  const width = Math.max(240, el.clientWidth || el.parentElement.clientWidth);
  window.trioproxyCharts[name] = new uPlot({width, height: HEIGHT, ...opts}, data, el);
}

function cdfChart(name, perModel) {
  const models = Object.keys(perModel || {}).filter(
    (m) => perModel[m].some(([x]) => x > 0));
  const tables = models.map((m) => {
    const points = perModel[m].filter(([x]) => x > 0);  // log scale: a 0 ms gap has no place
    return [points.map((p) => p[0]), points.map((p) => p[1])];
  });
  const opts = {
    scales: {x: {time: false, distr: 3}, y: {range: [0, 1]}},
    axes: [axis("ms"), axis("share", {values: (u, ticks) => ticks.map((t) => Math.round(t * 100) + "%")})],
    series: [{label: "ms", value: (u, v) => msText(v)}, ...models.map((m, i) => ({
      label: m, stroke: PALETTE[i % PALETTE.length], width: 2, spanGaps: true,
      paths: uPlot.paths.stepped({align: 1}), points: {show: false},
      value: (u, v) => (v == null ? "–" : (v * 100).toFixed(1) + "%"),
    }))],
  };
  place(name, document.getElementById("chart-" + name), opts,
        tables.length ? uPlot.join(tables) : null);
}

function ttftTimeChart(series, since, now) {
  const models = Object.keys(series.models || {});
  const tables = models.map((m) => {
    const rows = series.models[m];
    return [rows.map((r) => r[0]), rows.map((r) => r[1]), rows.map((r) => r[2])];
  });
  const lines = models.flatMap((m, i) => {
    const color = PALETTE[i % PALETTE.length];
    return [{label: m + " p50", stroke: color, width: 2, spanGaps: true, value: (u, v) => msText(v)},
            {label: m + " p90", stroke: color, width: 1, dash: [5, 4], spanGaps: true,
             value: (u, v) => msText(v)}];
  });
  const opts = {
    tzDate: utcDate,
    scales: {x: {time: true, range: [since, now]},  // the period shown, not just the data
             y: {range: (u, lo, hi) => [0, hi > 0 ? hi * 1.1 : 1]}},
    axes: [axis(""), axis("TTFT ms", {size: 55})],
    series: [{label: "UTC"}, ...lines],
  };
  place("ttft-time", document.getElementById("chart-ttft-time"), opts,
        tables.length ? uPlot.join(tables) : null);
}

const DAY = 86400;
const usdText = (t) => "$" + (t >= 1 || t === 0 ? t.toFixed(2) : t.toPrecision(2));

function spendChart(byDay, since, now) {
  const days = (byDay || []).filter((g) => g.group);
  const xs = days.map((g) => Date.parse(g.group + "T00:00:00Z") / 1000 + DAY / 2);  // noon
  const opts = {
    tzDate: utcDate,
    scales: {x: {time: true, range: [Math.floor(since / DAY) * DAY, Math.ceil(now / DAY) * DAY]},
             y: {range: (u, lo, hi) => [0, hi > 0 ? hi * 1.15 : 1]}},
    axes: [axis("", {incrs: [DAY, 2 * DAY, 7 * DAY, 14 * DAY, 28 * DAY, 91 * DAY],
                     values: (u, ticks) => ticks.map(
                       (t) => new Date(t * 1000).toISOString().slice(5, 10))}),
           axis("USD", {size: 75, values: (u, ticks) => ticks.map(usdText)})],
    series: [{label: "day (UTC)",
              value: (u, v) => (v == null ? "–" : new Date(v * 1000).toISOString().slice(0, 10))},
             {label: "spend", stroke: PALETTE[0], fill: PALETTE[0] + "99", width: 1,
              paths: uPlot.paths.bars({size: [0.6, 48]}), points: {show: false},
              value: (u, v) => (v == null ? "–" : usdText(v))}],
  };
  place("spend", document.getElementById("chart-spend"), opts,
        days.length ? [xs, days.map((g) => g.cost_usd || 0)] : null);
}

function waterfallChart(requests) {
  const rows = requests || [];
  const label = (i) => {
    const r = rows[i];
    return r ? new Date(r.started_at * 1000).toISOString().slice(11, 19) : "";
  };
  const opts = {
    height: Math.max(HEIGHT, 40 + rows.length * 24),
    scales: {x: {time: false, ori: 1, dir: 1, range: [-0.6, Math.max(rows.length, 1) - 0.4]},
             y: {ori: 0, dir: 1, range: (u, lo, hi) => [0, hi > 0 ? hi * 1.05 : 1]}},
    axes: [axis("", {side: 3, size: 70, splits: () => rows.map((_, i) => i),
                     values: (u, ticks) => ticks.map(label), grid: {show: false}}),
           axis("ms after the request reached the proxy", {side: 2})],
    // each segment floats from the previous timestamp to its own (uPlot bands)
    bands: PHASES.slice(1).map((_, i) => ({series: [i + 2, i + 1]})),
    series: [{label: "request", value: (u, i) => (rows[i] ? label(i) + " " + (rows[i].model || "")
                                                         : "–")},
             ...PHASES.map(([key, name, color]) => ({
               label: name, fill: color, stroke: color, width: 0, points: {show: false},
               paths: uPlot.paths.bars({size: [0.7, 22], align: 0}), value: (u, v) => msText(v),
             }))],
  };
  const data = [rows.map((_, i) => i), ...PHASES.map(([key]) => rows.map((r) => r[key]))];
  place("waterfall", document.getElementById("chart-waterfall"), opts, rows.length ? data : null);
  const proxy = rows.map((r) => r.proxy_ms).filter((v) => v != null);
  const relay = rows.map((r) => r.proxy_relay_ms).filter((v) => v != null);
  const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length;
  document.getElementById("waterfall-note").textContent = rows.length
    ? `Red: the proxy's own time before the request went upstream (mean ${msText(mean(proxy))}` +
      (relay.length ? `; it also adds ${msText(mean(relay))} per relayed chunk on average)` : ")") +
      ". Newest first; hover a bar for its times."
    : "";
}

function renderCharts(data) {
  const charts = data.charts || {};
  spendChart(data.by_day, data.since, data.generated_at);
  cdfChart("ttft", charts.ttft_cdf);
  cdfChart("itl", charts.itl_cdf);
  ttftTimeChart(charts.ttft_series || {}, data.since, data.generated_at);
  waterfallChart(charts.waterfalls);
}

let lastData = null;
let resizeTimer = null;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => lastData && renderCharts(lastData), 150);
});

// called by dashboard.js once the page is visible (a hidden chart has no width)
function showCharts(data) {
  lastData = data;
  renderCharts(data);
  // how many times they were drawn (for tests and screenshots: wait for body[data-charts])
  document.body.dataset.charts = String(Number(document.body.dataset.charts || 0) + 1);
}
