// The usage page: fetch api/usage, fill the tables, refresh every REFRESH_MS.
"use strict";

// ?refresh=SECONDS (at least 2) changes how often
const REFRESH_MS = Math.max(2, Number(new URLSearchParams(location.search).get("refresh")) || 10) * 1000;
const $ = (id) => document.getElementById(id);

const fmtInt = (n) => (n == null ? "–" : Number(n).toLocaleString("en-US"));
const fmtUsd = (x) => (x == null ? "unpriced" : "$" + Number(x).toFixed(x === 0 || x >= 1 ? 2 : 4));
const fmtMs = (x) => (x == null ? "–" : Number(x).toFixed(1));
const fmtTime = (t) => new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19);
const fmtClock = (t) => fmtTime(t).slice(5, 16);  // MM-DD HH:MM, short enough for a phone

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function fill(tableId, rows, toCells) {
  const body = $(tableId).querySelector("tbody");
  body.replaceChildren(...rows.map((row) => {
    const tr = document.createElement("tr");
    tr.append(...toCells(row));
    return tr;
  }));
}

function totalsRow(g) {
  return [cell(g.group ?? "(none)"), cell(fmtInt(g.requests), "n"), cell(fmtInt(g.input_tokens), "n"),
          cell(fmtInt(g.output_tokens), "n"), cell(fmtUsd(g.cost_usd), "n")];
}

function sum(groups, key) {
  return groups.reduce((acc, g) => acc + (g[key] || 0), 0);
}

function render(data) {
  const models = data.by_model;
  const priced = models.some((g) => g.cost_usd != null);
  $("total-cost").textContent = priced ? fmtUsd(sum(models, "cost_usd")) : "–";
  $("total-requests").textContent = fmtInt(sum(models, "requests"));
  $("total-input").textContent = fmtInt(sum(models, "input_tokens"));
  $("total-output").textContent = fmtInt(sum(models, "output_tokens"));
  fill("by-model", models, totalsRow);
  fill("by-day", data.by_day, totalsRow);
  const note = $("latency-note");
  if (data.latency == null) {
    note.hidden = false;
    note.textContent = "This store keeps no latency figures yet.";
    fill("latency", [], () => []);
  } else {
    note.hidden = true;
    fill("latency", data.latency, (g) => {
      const m = g.metrics;
      return [cell(g.group), cell(fmtInt(g.requests), "n"),
              cell(fmtMs(m.ttft_ms.p50), "n"), cell(fmtMs(m.ttft_ms.p90), "n wide"),
              cell(fmtMs(m.ttft_ms.p99), "n wide"), cell(fmtMs(m.itl_ms.p50), "n"),
              cell(fmtMs(m.itl_ms.p90), "n wide"), cell(fmtMs(m.e2e_ms.p50), "n"),
              cell(fmtMs(m.e2e_ms.p90), "n wide")];
    });
  }
  fill("recent", data.recent, (r) => [
    cell(fmtClock(r.started_at)), cell(r.model ?? "–"), cell(r.api ?? "–", "wide"),
    cell(r.status ?? "–", "n" + (r.status >= 400 ? " bad" : "")),
    cell(r.end_reason ?? "–", r.end_reason === "complete" ? "ok" : "bad"),
    cell(fmtInt(r.input_tokens), "n wide"), cell(fmtInt(r.output_tokens), "n wide"),
    // a request that never reached a model (404, 413, connect failure) costs nothing by nature
    cell(r.cost_usd == null && r.input_tokens == null && r.output_tokens == null
      ? "–" : fmtUsd(r.cost_usd), "n"), cell(fmtMs(r.duration_ms), "n wide"),
  ]);
}

async function refresh() {
  const days = $("days").value;
  let resp;
  try {
    resp = await fetch("api/usage?days=" + encodeURIComponent(days), {credentials: "same-origin"});
  } catch (err) {
    $("status").textContent = "proxy unreachable; retrying";
    return;
  }
  if (resp.status === 401 || resp.status === 403) {
    $("content").hidden = true;
    $("login").hidden = resp.status === 403;
    $("status").textContent = resp.status === 403
      ? "This page answers loopback clients only (set TRIOPROXY_ADMIN_TOKEN to open it to others)."
      : (location.search.includes("login=failed") ? "Wrong token." : "Log in to see usage.");
    return;
  }
  const data = await resp.json();
  if (!resp.ok) {
    $("status").textContent = data.error || "error " + resp.status;
    return;
  }
  render(data);
  $("content").hidden = false;
  try {
    showCharts(data);  // dashboard_charts.js; the tables stand without it
  } catch (err) {
    console.error("charts:", err);
  }
  $("status").textContent = "updated " + fmtTime(data.generated_at) + " UTC";
  document.body.dataset.loaded = String(Number(document.body.dataset.loaded || 0) + 1);
}

$("days").addEventListener("change", refresh);
refresh();
setInterval(refresh, REFRESH_MS);
