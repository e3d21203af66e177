// The dashboard page: the runs list, step-level charts (uPlot), the hyperparameter table, samples and config.
// It polls the server every 2 s; a run's records are fetched again only when its `updated_at` changed.
// Step records come downsampled by the server (at most MAX_POINTS per series: the first and last point and
// each bucket's lowest and highest), so 10 runs of 100,000 records each are a few thousand points per chart.
"use strict";
const POLL_MS = 2000;
const MAX_POINTS = 1500;  // per series: about 2 points per pixel column of a wide chart, so nothing visible is lost
const COLORS = ["#2b6cb0", "#dd6b20", "#2f855a", "#9f2f7f", "#b7791f", "#319795", "#c53030", "#5a67d8",
                "#718096", "#d53f8c"];
const STALE_S = 600;  // a running run without news for this long is shown as stale
const NOT_CHARTED = new Set(["epoch", "step", "best_val"]);
const TOKEN = new URLSearchParams(location.search).get("token");  // sent with a delete, never stored

const state = {
  runs: [],            // from /api/runs
  now: 0,              // server time of that answer
  selected: null,      // run id shown
  overlay: new Set(),  // extra run ids drawn on the same charts
  data: {},            // run id -> {updated_at, epochs, steps, run}
  renders: 0,          // charts drawn so far (data-render on #charts; tests and bench/dashboard_page.py wait on it)
  version: 0,          // bumped whenever a run's records are replaced
  drawn: "",           // the version and the runs the charts show: a poll that brings nothing new draws nothing
};
const charts = new Map();  // chart id -> {box, plot, signature}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}
function fmt(v) {
  if (v == null || !isFinite(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(2);
  return Number(v.toPrecision(4)).toString();
}
function ago(t) {
  if (t == null) return "–";
  const s = Math.max(0, state.now - t);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h ago`;
  return new Date(t * 1000).toLocaleString();
}
function duration(s) {
  if (s == null) return "–";
  if (s < 60) return `${s.toFixed(0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}
function shownRuns() {
  return [state.selected, ...[...state.overlay].filter(r => r !== state.selected)].filter(Boolean);
}
function runColor(id) {
  const i = shownRuns().indexOf(id);
  return COLORS[(i < 0 ? 0 : i) % COLORS.length];
}
function runName(id) { return (state.runs.find(r => r.run_id === id) || {}).name || id; }
function isStale(run) { return run.status === "running" && state.now - run.updated_at > STALE_S; }
function runPath(id, rest) { return `/api/runs/${encodeURIComponent(id)}${rest || ""}`; }

async function getJSON(url) {
  const r = await fetch(url, {cache: "no-store"});
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
  return body;
}

// ------------------------------------------------------------------ the runs list

function renderRuns() {
  const body = document.getElementById("runs-body");
  body.replaceChildren();
  document.getElementById("runs-empty").hidden = state.runs.length > 0;
  const all = document.getElementById("overlay-all");
  all.checked = state.runs.length > 0 && state.runs.every(r => r.run_id === state.selected || state.overlay.has(r.run_id));
  for (const run of state.runs) {
    const shown = run.run_id === state.selected || state.overlay.has(run.run_id);
    const box = el("input", {type: "checkbox", title: "overlay on the charts", "data-overlay": run.run_id});
    box.checked = state.overlay.has(run.run_id);
    box.addEventListener("click", ev => {
      ev.stopPropagation();
      if (box.checked) state.overlay.add(run.run_id); else state.overlay.delete(run.run_id);
      refresh();
    });
    const stale = isStale(run);
    const status = el("span", {class: "status", "data-status": run.status, "data-stale": String(stale),
                               text: stale ? "running?" : run.status});
    if (stale) status.title = `no news for ${ago(run.updated_at).replace(" ago", "")}`;
    const last = run.last_metrics || {};
    const swatch = shown ? el("span", {class: "swatch", style: `background:${runColor(run.run_id)}`}) : null;
    const facts = [`${run.epochs} epoch${run.epochs === 1 ? "" : "s"}`,
                   run.last_step != null ? `step ${run.last_step}` : null,
                   last.train_loss != null ? `train ${fmt(last.train_loss)}` : null,
                   last.val_loss != null ? `val ${fmt(last.val_loss)}` : null,
                   ago(run.updated_at)].filter(Boolean).join(" · ");
    const row = el("tr", {class: "run" + (run.run_id === state.selected ? " selected" : ""), "data-run-id": run.run_id},
      el("td", {}, box),
      el("td", {}, el("div", {class: "name"}, swatch, run.name),
                   el("div", {class: "sub", text: run.run_id + (run.folder ? " · folder" : ""),
                              title: run.folder || ""}),
                   el("div", {class: "sub", text: facts})),
      el("td", {style: "text-align:right"}, status));
    row.addEventListener("click", () => select(run.run_id));
    body.append(row);
  }
}

function select(runId) {
  state.selected = runId;
  hideError();
  history.replaceState(null, "", location.search + "#run=" + encodeURIComponent(runId));
  refresh();
}

// ------------------------------------------------------------------ chart data

// Which chart a series goes on: the step loss with the epochs' train/val loss, each loss term with its
// epoch-level terms, anything else (lr, grad_norm, val_psnr, a custom value) on its own, step- and
// epoch-level values of the same name together.
function chartOf(name) {
  if (name === "loss" || name === "train_loss" || name === "val_loss") return "loss";
  const term = name.match(/^(?:loss|train_loss|val_loss)\/(.+)$/);
  return term ? "loss/" + term[1] : name;
}
function chartOrder(id) {
  const fixed = ["loss", "lr", "grad_norm", "samples_per_s", "epoch_time"];
  if (fixed.includes(id)) return `0${fixed.indexOf(id)}`;
  if (id.startsWith("loss/")) return `1${id}`;
  if (id.startsWith("val_")) return `2${id}`;
  return `3${id}`;
}

function collectSeries() {
  const series = [];  // {run, level, name, xs, ys}
  for (const id of shownRuns()) {
    const d = state.data[id];
    if (!d) continue;
    const stepNames = new Set(Object.keys(d.steps.series || {}));
    for (const [name, s] of Object.entries(d.steps.series || {})) {
      series.push({run: id, level: "step", name, label: name, xs: s.step, ys: s.value});
    }
    const names = [];
    for (const row of d.epochs) for (const k of Object.keys(row.metrics)) if (!names.includes(k)) names.push(k);
    for (const name of names) {
      if (NOT_CHARTED.has(name)) continue;
      const xs = [], ys = [];
      for (const row of d.epochs) {  // epoch-level values at the step they were taken (the epoch's last)
        const v = row.metrics[name], x = row.step != null ? row.step : row.epoch;
        if (v != null && isFinite(v)) { xs.push(x); ys.push(v); }
      }
      if (xs.length) series.push({run: id, level: "epoch", name, label: stepNames.has(name) ? `${name} (epoch)` : name, xs, ys});
    }
  }
  return series;
}

function isConstant(ys) {
  return ys.length > 1 && ys.every(v => v === ys[0]);
}

// Exponential moving average, debiased like TensorBoard's (the first points are not pulled towards 0).
// Applied to the points received, so on a downsampled run it smooths over buckets rather than steps.
function smooth(ys, weight) {
  if (!(weight > 0)) return ys;
  const out = new Array(ys.length);
  let last = 0, n = 0;
  for (let i = 0; i < ys.length; i++) {
    last = last * weight + (1 - weight) * ys[i];
    n++;
    out[i] = last / (1 - Math.pow(weight, n));
  }
  return out;
}

function chartSpecs() {
  const hide = document.getElementById("hide-constant").checked;
  const weight = Number(document.getElementById("smoothing").value);
  const byChart = new Map(), constant = [];
  for (const s of collectSeries()) {
    if (hide && isConstant(s.ys)) {
      constant.push(`${s.label} = ${fmt(s.ys[0])}` + (shownRuns().length > 1 ? ` (${runName(s.run)})` : ""));
      continue;
    }
    const id = chartOf(s.name);
    if (!byChart.has(id)) byChart.set(id, []);
    byChart.get(id).push({...s, ys: smooth(s.ys, weight)});
  }
  const ids = [...byChart.keys()].sort((a, b) => chartOrder(a).localeCompare(chartOrder(b)));
  return {specs: ids.map(id => ({id, series: byChart.get(id)})), constant};
}

// ------------------------------------------------------------------ charts (uPlot)

function drawCharts() {
  const root = document.getElementById("charts");
  const {specs, constant} = chartSpecs();
  const useLog = document.getElementById("logscale").checked;
  const render = ++state.renders;
  const keep = new Set(specs.map(s => s.id));
  for (const [id, chart] of charts) if (!keep.has(id)) { chart.plot.destroy(); chart.box.remove(); charts.delete(id); }
  const multi = shownRuns().length > 1;
  for (const spec of specs) {
    const positive = spec.series.every(s => s.ys.every(v => v > 0));
    const log = useLog && positive;
    const labels = spec.series.map(s => (multi ? `${runName(s.run)} · ` : "") + s.label);
    const signature = JSON.stringify([labels, spec.series.map(s => runColor(s.run)), log]);
    const data = uPlot.join(spec.series.map(s => [s.xs, s.ys]));
    let chart = charts.get(spec.id);
    // data-render: this drawing's number; uPlot's draw hook copies it into data-drawn once it has drawn.
    if (!chart || chart.signature !== signature) {
      if (chart) { chart.plot.destroy(); chart.box.remove(); }
      chart = makeChart(spec, labels, log, signature, data, render);
      charts.set(spec.id, chart);
    } else {
      chart.box.dataset.render = render;
      chart.plot.setData(data);
    }
    chart.title.textContent = spec.id + (useLog && !log ? " (linear: values ≤ 0)" : log ? " (log)" : "");
    chart.box.dataset.series = JSON.stringify(spec.series.map(s => ({run: s.run, name: s.name, level: s.level,
                                                                     points: s.xs.length})));
    root.append(chart.box);  // keeps the order of `specs`
  }
  root.dataset.runs = shownRuns().filter(id => state.data[id]).join(",");
  root.dataset.render = render;
  const note = document.getElementById("constant-note");
  note.hidden = !constant.length;
  note.textContent = constant.length ? `Constant, not drawn: ${constant.join(" · ")}` : "";
  if (!specs.length && !constant.length) {
    note.hidden = false;
    note.textContent = "No records yet: the first arrive after `training.log_every` steps or when epoch 1 ends.";
  }
}

function makeChart(spec, labels, log, signature, data, render) {
  const box = el("div", {class: "chart", "data-chart": spec.id, "data-render": render});
  const title = el("h3");
  const plotBox = el("div", {class: "plot"});
  box.append(title, plotBox);
  document.getElementById("charts").append(box);
  const width = Math.max(300, plotBox.clientWidth || 420);
  const opts = {
    width, height: 220,
    scales: {x: {time: false}, y: {distr: log ? 3 : 1}},
    axes: [{label: "step", labelSize: 16, size: 34}, {size: 56, values: (u, vals) => vals.map(fmt)}],
    legend: {live: true},
    cursor: {drag: {x: true, y: false}},
    series: [{label: "step"}, ...spec.series.map((s, i) => ({
      label: labels[i],
      stroke: runColor(s.run),
      width: s.level === "step" ? 1 : 2,
      dash: s.name.startsWith("val_") ? [6, 3] : undefined,
      spanGaps: true,
      points: {show: s.level === "epoch" && s.xs.length <= 80, size: 5},
      value: (u, v) => fmt(v),
    }))],
    hooks: {draw: [u => { box.dataset.drawn = box.dataset.render; }]},
  };
  return {box, title, signature, plot: new uPlot(opts, data, plotBox)};
}

// ------------------------------------------------------------------ the selected runs: table, detail

function flatten(value, prefix, out) {
  if (value && typeof value === "object" && !Array.isArray(value)) {
    for (const [k, v] of Object.entries(value)) flatten(v, prefix ? `${prefix}.${k}` : k, out);
  } else {
    out[prefix] = value;
  }
  return out;
}

function renderHparams() {
  const ids = shownRuns().filter(id => state.data[id]);
  const configs = ids.map(id => flatten(state.data[id].run.config || {}, "", {}));
  const keys = [...new Set(configs.flatMap(c => Object.keys(c)))].sort();
  const differ = keys.filter(k => new Set(configs.map(c => JSON.stringify(c[k] ?? null))).size > 1);
  const finals = ids.map(id => {
    const rows = state.data[id].epochs;
    return rows.length ? rows[rows.length - 1].metrics : {};
  });
  const wanted = k => ["train_loss", "val_loss", "best_val"].includes(k) || (k.startsWith("val_") && !k.includes("/"));
  const order = k => ({train_loss: "0", val_loss: "1", best_val: "2"})[k] || `3${k}`;
  const metrics = [...new Set(finals.flatMap(m => Object.keys(m)).filter(wanted))]
    .sort((a, b) => order(a).localeCompare(order(b)));
  const head = el("tr", {}, el("th", {text: "run"}), ...differ.map(k => el("th", {text: k, "data-param": k})),
                  el("th", {text: "epochs"}), el("th", {text: "last step"}),
                  ...metrics.map(k => el("th", {text: k, "data-metric": k})));
  const body = ids.map((id, i) => {
    const listed = state.runs.find(r => r.run_id === id) || {};
    return el("tr", {"data-run-id": id},
      el("td", {}, el("span", {class: "swatch", style: `background:${runColor(id)}`}), runName(id)),
      ...differ.map(k => el("td", {text: configs[i][k] === undefined ? "–" : JSON.stringify(configs[i][k])})),
      el("td", {class: "num", text: String(state.data[id].epochs.length)}),
      el("td", {class: "num", text: listed.last_step != null ? String(listed.last_step) : "–"}),
      ...metrics.map(k => el("td", {class: "num", text: fmt(finals[i][k])})));
  });
  const table = document.getElementById("hparams");
  table.replaceChildren(el("thead", {}, head), el("tbody", {}, ...body));
  if (ids.length > 1 && !differ.length) {
    table.append(el("caption", {class: "note", text: "The configs of these runs are the same."}));
  }
}

function renderDetail() {
  const d = state.selected && state.data[state.selected];
  const run = d && d.run;
  document.getElementById("detail-empty").hidden = !!run;
  document.getElementById("detail-body").hidden = !run;
  document.getElementById("detail").dataset.runId = run ? run.run_id : "";
  if (!run) return;
  document.getElementById("run-title").textContent = run.name;
  const status = document.getElementById("run-status");
  const listed = state.runs.find(r => r.run_id === run.run_id) || run;
  status.textContent = isStale(listed) ? "running? (no news)" : listed.status;
  status.dataset.status = listed.status;
  status.dataset.stale = String(isStale(listed));
  const rows = d.epochs;
  const last = rows.length ? rows[rows.length - 1].metrics : {};
  const end = listed.ended_at ?? (listed.status === "running" ? state.now : listed.updated_at);
  const items = [["id", run.run_id], ["epochs", String(rows.length)], ["last step", listed.last_step ?? "–"],
                 ["world size", run.world_size ?? "–"], ["device", run.device ?? "–"],
                 ["started", new Date(run.created_at * 1000).toLocaleString()],
                 ["running for", duration(end - run.created_at)], ["last update", ago(listed.updated_at)]];
  if (last.best_val != null) items.push(["best val", fmt(last.best_val)]);
  if (run.folder) items.push(["folder", run.folder]);
  if (run.end_message) items.push(["note", run.end_message]);
  document.getElementById("meta").replaceChildren(...items.map(([k, v]) => el("span", {}, `${k} `, el("b", {text: String(v)}))));
  document.getElementById("csv-metrics").href = runPath(run.run_id, "/metrics.csv");
  document.getElementById("csv-steps").href = runPath(run.run_id, "/steps.csv");
  document.getElementById("config").textContent = run.config ? JSON.stringify(run.config, null, 2) : "(not sent)";
  const img = document.getElementById("samples");
  const has = run.samples_epoch != null;
  img.hidden = !has;
  document.getElementById("samples-none").hidden = has;
  document.getElementById("samples-epoch").textContent = has ? `(epoch ${run.samples_epoch})` : "";
  const src = runPath(run.run_id, `/samples.png?epoch=${run.samples_epoch}`);
  if (has && img.getAttribute("src") !== src) img.setAttribute("src", src);
}

function showError(text) {
  const box = document.getElementById("error");
  box.textContent = text;
  box.hidden = false;
}
function hideError() { document.getElementById("error").hidden = true; }

async function deleteRun() {
  const id = state.selected;
  if (!id || !confirm(`Delete the run "${runName(id)}" (${id}) and all its records from the dashboard?\n` +
                      "Its run folder, if any, is left as it is.")) return;
  const headers = TOKEN ? {Authorization: `Bearer ${TOKEN}`} : {};
  const r = await fetch(runPath(id), {method: "DELETE", headers});
  const body = await r.json().catch(() => ({}));
  if (!r.ok) {
    const hint = r.status === 401 ? " Open the page as …/?token=YOUR_TOKEN (the server's --token) to delete runs." : "";
    showError(`Could not delete ${id}: ${body.error || "HTTP " + r.status}.${hint}`);
    return;
  }
  hideError();
  state.overlay.delete(id);
  delete state.data[id];
  state.selected = null;
  history.replaceState(null, "", location.search);
  refresh();
}

// ------------------------------------------------------------------ polling

async function load(id, run) {
  const cached = state.data[id];
  if (cached && cached.updated_at === run.updated_at) return;
  const [epochs, steps, detail] = await Promise.all([
    getJSON(runPath(id, "/epochs")),
    getJSON(runPath(id, `/steps?max_points=${MAX_POINTS}`)),
    getJSON(runPath(id)),
  ]);
  state.data[id] = {updated_at: run.updated_at, epochs: epochs.epochs, steps, run: detail.run};
  state.version++;
}

let busy = false, again = false;
async function refresh() {
  if (busy) { again = true; return; }  // a click during a poll: run once more right after it
  busy = true;
  const conn = document.getElementById("conn");
  try {
    const list = await getJSON("/api/runs");
    state.runs = list.runs;
    state.now = list.now;
    const ids = new Set(state.runs.map(r => r.run_id));
    for (const id of [...state.overlay]) if (!ids.has(id)) state.overlay.delete(id);
    for (const id of Object.keys(state.data)) if (!ids.has(id)) delete state.data[id];
    if (state.selected && !ids.has(state.selected)) state.selected = null;
    if (!state.selected && state.runs.length) state.selected = state.runs[0].run_id;  // the newest
    await Promise.all(shownRuns().map(id => load(id, state.runs.find(r => r.run_id === id))));
    conn.dataset.state = "up";
    conn.textContent = "live";
  } catch (err) {
    conn.dataset.state = "down";
    conn.textContent = "server unreachable, retrying";
    conn.title = String(err);
  } finally {
    busy = false;
  }
  renderRuns();
  renderDetail();
  const drawn = JSON.stringify([state.version, shownRuns()]);
  if (state.selected && state.data[state.selected] && drawn !== state.drawn) {
    state.drawn = drawn;
    drawCharts();
    renderHparams();
  }
  if (again) { again = false; refresh(); }
}

function redraw() { if (state.selected && state.data[state.selected]) drawCharts(); }

function fromHash() {
  const m = location.hash.match(/run=([^&]+)/);
  if (m) state.selected = decodeURIComponent(m[1]);
}
document.getElementById("logscale").addEventListener("change", redraw);
document.getElementById("hide-constant").addEventListener("change", redraw);
document.getElementById("smoothing").addEventListener("input", ev => {
  document.getElementById("smoothing-value").textContent = ev.target.value;
  redraw();
});
document.getElementById("overlay-all").addEventListener("change", ev => {
  state.overlay = ev.target.checked ? new Set(state.runs.map(r => r.run_id)) : new Set();
  refresh();
});
document.getElementById("delete-run").addEventListener("click", deleteRun);
window.addEventListener("resize", () => {
  for (const chart of charts.values()) chart.plot.setSize({width: Math.max(300, chart.box.clientWidth - 16), height: 220});
});
window.addEventListener("hashchange", () => { fromHash(); refresh(); });
fromHash();
refresh();
setInterval(refresh, POLL_MS);
