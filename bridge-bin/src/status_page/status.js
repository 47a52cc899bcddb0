// The status page: polls /status every second and draws one card per route. Everything
// shown comes from ferry's own metrics; the admin token, when one is needed, lives only in
// the password field of this page (never in storage, a cookie or the URL).
"use strict";

const POLL_MS = 1000;
const SERIES = ["delivered", "retried", "dead_lettered"];
const SVG = "http://www.w3.org/2000/svg";

const cards = new Map();
let tokenRequired = false;
let windowSteps = 300;
let timer = null;

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const child of children) node.append(child);
  return node;
}

function seconds(v) {
  if (v === null || v === undefined) return "–";
  if (v < 1) return `${(v * 1000).toFixed(v < 0.01 ? 1 : 0)} ms`;
  if (v < 120) return `${v.toFixed(2)} s`;
  return `${(v / 60).toFixed(1)} min`;
}

function rate(v) {
  return `${(v || 0).toFixed(1)}/s`;
}

function ago(when) {
  const s = Math.max(0, Math.round((Date.now() - when.getTime()) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  return `${Math.round(s / 3600)} h ago`;
}

function field(card, name, label) {
  const dd = el("dd", { "data-field": name }, "–");
  card.numbers.append(el("div", {}, el("dt", {}, label), dd));
  card.fields[name] = dd;
  return dd;
}

function makeCard(name) {
  const card = { fields: {}, lines: {}, legend: {} };
  card.root = el("article", { class: "card", "data-route": name });
  card.title = el("h2", {}, name);
  card.kind = el("span", { class: "kind" });
  card.state = el("span", { class: "state", "data-state": "connecting" }, "connecting");
  card.root.append(el("div", { class: "card-head" }, card.title, card.kind, card.state));

  card.chart = document.createElementNS(SVG, "svg");
  card.chart.setAttribute("class", "chart");
  card.chart.setAttribute("viewBox", "0 0 300 100");
  card.chart.setAttribute("preserveAspectRatio", "none");
  card.chart.setAttribute("role", "img");
  card.chart.setAttribute("aria-label", `${name}: messages per second, last 5 minutes`);
  const legend = el("div", { class: "legend" });
  for (const s of SERIES) {
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("class", s);
    line.setAttribute("points", "");
    card.chart.append(line);
    card.lines[s] = line;
    card.legend[s] = el("span", { "data-rate": s }, "0.0/s");
    legend.append(el("span", { class: s }, el("i"), `${s.replace("_", "-")} `, card.legend[s]));
  }
  card.peak = el("span", { class: "peak" }, "");
  legend.append(card.peak);
  card.root.append(card.chart, legend);

  card.numbers = el("dl", { class: "numbers" });
  const inFlight = field(card, "in_flight", "in flight / limit");
  card.bar = el("span");
  inFlight.after(el("div", { class: "bar" }, card.bar));
  field(card, "backlog", "backlog");
  field(card, "request", "request p50 / p99");
  field(card, "lag", "end-to-end lag p50 / p99");
  field(card, "received", "received");
  field(card, "delivered", "delivered");
  field(card, "retried", "retried");
  field(card, "dead_lettered", "dead-lettered");
  card.root.append(card.numbers);

  card.error = el("p", { class: "error", "data-field": "error", hidden: "" });
  card.root.append(card.error);

  card.pause = el("button", { type: "button", "data-action": "pause" }, "Pause");
  card.resume = el("button", { type: "button", "data-action": "resume" }, "Resume");
  card.outcome = el("span", { class: "outcome", role: "status" });
  card.pause.addEventListener("click", () => act(name, "pause", card));
  card.resume.addEventListener("click", () => act(name, "resume", card));
  card.root.append(el("div", { class: "actions" }, card.pause, card.resume, card.outcome));
  return card;
}

function draw(card, throughput) {
  const all = SERIES.flatMap((s) => throughput[s] || []);
  const top = Math.max(1, ...all);
  const step = 300 / Math.max(1, windowSteps - 1);
  for (const s of SERIES) {
    const values = throughput[s] || [];
    const start = windowSteps - values.length;
    const points = values.map((v, i) =>
      `${((start + i) * step).toFixed(1)},${(100 - (v / top) * 96).toFixed(1)}`);
    card.lines[s].setAttribute("points", points.join(" "));
    card.legend[s].textContent = rate(values[values.length - 1]);
  }
  card.peak.textContent = `peak ${rate(Math.max(0, ...all))}`;
}

function update(card, route) {
  card.kind.textContent = route.source;
  card.state.dataset.state = route.state;
  card.state.textContent = route.state.replace("_", " ");
  draw(card, route.throughput || {});
  const f = card.fields;
  f.in_flight.textContent = `${route.in_flight} / ${route.concurrency_limit}`;
  const share = route.concurrency_limit > 0 ? route.in_flight / route.concurrency_limit : 0;
  card.bar.style.width = `${Math.min(100, Math.round(share * 100))}%`;
  f.backlog.textContent = String(route.backlog);
  f.request.textContent = `${seconds(route.request_seconds.p50)} / ${seconds(route.request_seconds.p99)}`;
  f.lag.textContent = `${seconds(route.end_to_end_seconds.p50)} / ${seconds(route.end_to_end_seconds.p99)}`;
  for (const k of ["received", "delivered", "retried", "dead_lettered"]) {
    f[k].textContent = String(route[k]);
  }
  const problem = route.error
    ? { message: `broker: ${route.error}`, at: null }
    : route.last_error || null;
  if (problem) {
    card.error.hidden = false;
    card.error.replaceChildren();
    if (problem.at) {
      const at = new Date(problem.at);
      card.error.append(el("time", { datetime: problem.at, title: problem.at },
        `${at.toLocaleTimeString()} (${ago(at)})`));
    }
    card.error.append(`last error: ${problem.message}`);
  } else {
    card.error.hidden = true;
  }
  card.pause.disabled = route.paused;
  card.resume.disabled = !route.paused;
}

function render(status) {
  tokenRequired = status.token_required;
  windowSteps = Math.max(2, Math.round(status.window_seconds / status.step_seconds));
  $("token-field").hidden = !tokenRequired;
  $("version").textContent = `ferry ${status.version}.`;
  const seen = new Set();
  for (const route of status.routes) {
    seen.add(route.name);
    let card = cards.get(route.name);
    if (!card) {
      card = makeCard(route.name);
      cards.set(route.name, card);
      $("routes").append(card.root);
    }
    update(card, route);
  }
  for (const [name, card] of cards) {
    if (!seen.has(name)) {
      card.root.remove();
      cards.delete(name);
    }
  }
  $("empty").hidden = status.routes.length > 0;
}

function connection(state, text) {
  const badge = $("connection");
  badge.dataset.state = state;
  badge.textContent = text;
  document.body.classList.toggle("stale", state !== "live");
}

async function poll() {
  clearTimeout(timer);
  try {
    const response = await fetch("/status", { cache: "no-store", credentials: "omit" });
    if (!response.ok) throw new Error(`status ${response.status}`);
    render(await response.json());
    connection("live", "live");
  } catch (e) {
    // ferry restarting or the network gone: keep the last numbers, greyed, and retry.
    connection("reconnecting", "reconnecting…");
  }
  timer = setTimeout(poll, POLL_MS);
}

function say(card, ok, text) {
  card.outcome.dataset.ok = String(ok);
  card.outcome.textContent = text;
}

async function act(name, action, card) {
  const token = $("token").value.trim();
  if (tokenRequired && !token) {
    say(card, false, `${action} needs the admin token: enter it above`);
    $("token").focus();
    return;
  }
  const headers = {};
  if (token) headers.Authorization = `Bearer ${token}`;
  card.pause.disabled = card.resume.disabled = true;
  try {
    const response = await fetch(`/routes/${encodeURIComponent(name)}/${action}`, {
      method: "PUT", headers, cache: "no-store", credentials: "omit",
    });
    const body = await response.json().catch(() => ({}));
    if (response.ok) {
      say(card, true, `${body.paused ? "paused" : "resumed"} at ${new Date().toLocaleTimeString()}`);
    } else {
      const why = body.error || response.statusText;
      say(card, false, `${action} refused (${response.status}): ${why}`);
    }
  } catch (e) {
    say(card, false, `${action} failed: ferry did not answer`);
  }
  poll();
}

poll();
