// clientsync dashboard: polls the monitor JSON API (same origin, session cookie) and renders
// with textContent only: ledger data (names, provider messages) is never parsed as HTML.
"use strict";

const REFRESH_MS = 3000;
const HEADERS = { "X-Clientsync-Request": "1" };
let selectedJob = null;
let timer = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key.startsWith("data-")) node.setAttribute(key, String(value));
    else node[key] = value;
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  const secs = Math.round((Date.now() - d.getTime()) / 1000);
  const rel = Math.abs(secs) < 60 ? `${Math.abs(secs)}s` : Math.abs(secs) < 3600
    ? `${Math.round(Math.abs(secs) / 60)}m` : `${Math.round(Math.abs(secs) / 3600)}h`;
  return secs >= 0 ? `${rel} ago` : `in ${rel}`;
}

function timeCell(iso) {
  return el("td", { title: iso || "" }, when(iso));
}

function badge(state, prefix) {
  return el("span", { class: `badge ${prefix || "state"}-${state}` }, state);
}

async function api(path, options) {
  const opts = Object.assign({ credentials: "same-origin", headers: {} }, options || {});
  opts.headers = Object.assign({}, HEADERS, opts.headers);
  if (opts.body !== undefined) opts.headers["Content-Type"] = "application/json";
  const response = await fetch(path, opts);
  if (response.status === 401) {
    window.location.reload(); // the session expired: show the login form
    throw new Error("signed out");
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
  return data;
}

function banner(message, isError) {
  const node = document.getElementById("banner");
  node.textContent = message;
  node.className = isError ? "error" : "";
  node.hidden = !message;
}

function jobLink(job) {
  return el("a", { class: "job", href: "#", "data-job-link": job.id,
                   onclick: (e) => { e.preventDefault(); showJob(job.id); } }, job.id);
}

function errorText(job) {
  const parts = [job.last_error_class, job.last_error].filter(Boolean);
  return parts.join(": ");
}

async function replay(jobId, button) {
  button.disabled = true;
  try {
    await api(`/monitor/jobs/${encodeURIComponent(jobId)}/replay`, { method: "POST", body: "{}" });
    banner(`Replayed ${jobId}: queued again.`);
  } catch (err) {
    banner(`Replay of ${jobId} failed: ${err.message}`, true);
  }
  refresh();
}

async function discard(jobId, button) {
  button.disabled = true;
  try {
    await api(`/monitor/jobs/${encodeURIComponent(jobId)}/discard`, { method: "POST", body: "{}" });
    banner(`Discarded ${jobId} (still replayable from its detail view).`);
  } catch (err) {
    banner(`Discard of ${jobId} failed: ${err.message}`, true);
  }
  refresh();
}

async function replayAll() {
  const provider = document.getElementById("bulk-provider").value;
  const button = document.getElementById("replay-all");
  button.disabled = true;
  try {
    const body = provider ? { provider } : {};
    const result = await api("/monitor/replay", { method: "POST", body: JSON.stringify(body) });
    banner(`Replayed ${result.replayed} dead job(s)${result.more ? " (more remain: run again)" : ""}.`);
  } catch (err) {
    banner(`Bulk replay failed: ${err.message}`, true);
  } finally {
    button.disabled = false;
  }
  refresh();
}

function renderProviders(summary) {
  const box = document.getElementById("providers");
  const select = document.getElementById("bulk-provider");
  const chosen = select.value;
  box.replaceChildren();
  select.replaceChildren(el("option", { value: "" }, "every provider"));
  const names = Object.keys(summary.providers);
  if (!names.length) box.append(el("p", { class: "muted" }, "No jobs yet."));
  for (const name of names) {
    const p = summary.providers[name];
    const c = p.counts;
    const health = c.dead > 0 || p.circuit.state === "open" ? "bad"
      : c.retrying > 0 || p.circuit.state === "half_open" ? "warn" : "ok";
    const label = name === "-" ? "(invalid messages)" : name;
    const rate = p.rate_limit.known && p.rate_limit.tokens !== undefined
      ? `${p.rate_limit.tokens}${p.rate_limit.capacity ? " / " + p.rate_limit.capacity : ""} tokens`
        + (p.rate_limit.limit ? ` (limit ${p.rate_limit.limit} per ${p.rate_limit.period_seconds} s)` : "")
        + (p.rate_limit.blocked_until ? `, blocked until ${p.rate_limit.blocked_until}` : "")
      : "no limit recorded";
    const oldest = p.oldest_retrying
      ? el("p", {}, "oldest retrying: ", jobLink(p.oldest_retrying), ` (${p.oldest_retrying.attempts} attempts)`)
      : null;
    box.append(el("div", { class: `card health-${health}`, "data-provider": name },
      el("h3", {}, label, badge(p.circuit.state, "circuit")),
      el("dl", { class: "counts" }, ...["queued", "running", "retrying", "dead", "succeeded", "skipped", "discarded"]
        .map((s) => el("div", {}, el("dt", {}, s), el("dd", { class: `state-${s}`, "data-count": s }, c[s])))),
      el("p", { class: "muted" }, `rate limit: ${rate}`),
      el("p", { class: "muted" }, `applied ${p.totals.applied}, retried ${p.totals.retried}, `
        + `dead ${p.totals.dead}, replayed ${p.totals.replayed}`),
      oldest));
    if (name !== "-") select.append(el("option", { value: name, selected: name === chosen }, name));
  }
  document.getElementById("overview").textContent =
    `queue ${summary.queue}: ${summary.queue_depth} waiting · workers alive: ${summary.workers.length}`;
}

function fillTable(id, jobs, row, columns) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren();
  if (!jobs.length) body.append(el("tr", {}, el("td", { class: "empty", colSpan: columns }, "none")));
  for (const job of jobs) body.append(row(job));
}

function renderJobs(dead, retrying, recent) {
  document.getElementById("dead-count").textContent = `(${dead.jobs.length}${dead.next_cursor ? "+" : ""})`;
  document.getElementById("retrying-count").textContent =
    `(${retrying.jobs.length}${retrying.next_cursor ? "+" : ""})`;
  fillTable("dead", dead.jobs, (job) => el("tr", { "data-job-id": job.id, "data-state": job.state },
    el("td", {}, jobLink(job)), el("td", {}, job.provider), el("td", {}, job.client_id),
    el("td", {}, job.attempts), el("td", { class: "error" }, errorText(job)), timeCell(job.updated_at),
    el("td", {},
      el("button", { type: "button", class: "replay", "data-job-id": job.id,
                     onclick: (e) => replay(job.id, e.currentTarget) }, "Replay"),
      " ",
      el("button", { type: "button", class: "discard", "data-job-id": job.id,
                     onclick: (e) => discard(job.id, e.currentTarget) }, "Discard"))), 7);
  fillTable("retrying", retrying.jobs, (job) => el("tr", { "data-job-id": job.id, "data-state": job.state },
    el("td", {}, jobLink(job)), el("td", {}, job.provider), el("td", {}, job.client_id),
    el("td", {}, job.attempts), el("td", { class: "error" }, errorText(job)), timeCell(job.next_attempt_at)), 6);
  fillTable("recent", recent.jobs, (job) => el("tr", { "data-job-id": job.id, "data-state": job.state },
    el("td", {}, jobLink(job)), el("td", {}, job.provider), el("td", {}, job.client_id),
    el("td", {}, badge(job.state)), el("td", {}, job.attempts), el("td", {}, job.result || job.reason || ""),
    timeCell(job.updated_at)), 7);
}

function renderDetail(job) {
  const section = document.getElementById("detail");
  section.hidden = false;
  section.dataset.jobId = job.id;
  section.dataset.state = job.state;
  document.getElementById("detail-id").textContent = job.id;
  const fields = document.getElementById("detail-fields");
  fields.replaceChildren();
  const shown = [["state", badge(job.state)], ["provider", job.provider], ["event", job.event_id],
    ["client", job.client_id], ["action", job.action], ["attempts", job.attempts], ["replays", job.replays],
    ["received", job.received_at], ["last update", job.updated_at], ["result", job.result || job.reason],
    ["provider id", job.provider_id],
    ["last error", ["dead", "retrying", "discarded"].includes(job.state) ? errorText(job) : null],
    ["note", job.note]];
  for (const [name, value] of shown) {
    if (value === null || value === undefined || value === "") continue;
    fields.append(el("dt", {}, name), el("dd", {}, value));
  }
  if (job.replayable) {
    fields.append(el("dt", {}, "actions"), el("dd", {}, el("button", { type: "button", class: "replay",
      "data-job-id": job.id, onclick: (e) => replay(job.id, e.currentTarget) }, "Replay")));
  }
  const timeline = document.getElementById("timeline");
  timeline.replaceChildren();
  for (const a of job.history) {
    const bits = [a.error_class, a.status ? `HTTP ${a.status}` : null, a.message || a.note].filter(Boolean);
    const fieldErrors = Object.entries(a.field_errors || {}).map(([f, msgs]) => `${f}: ${msgs.join(", ")}`);
    timeline.append(el("li", { "data-outcome": a.outcome },
      el("span", { title: a.at }, a.at ? new Date(a.at).toLocaleString() : ""), " ",
      a.number ? `attempt ${a.number} ` : "", badge(a.outcome), " ", bits.join(" · "),
      a.next_attempt_at ? ` · next attempt ${when(a.next_attempt_at)}` : "",
      a.duration_ms ? ` · ${a.duration_ms} ms` : "",
      fieldErrors.length ? el("ul", {}, fieldErrors.map((t) => el("li", {}, t))) : null));
  }
  if (!job.history.length) timeline.append(el("li", { class: "muted" }, "no attempt yet"));
  document.getElementById("detail-change").textContent =
    job.change ? JSON.stringify(job.change, null, 2) : (job.raw || "");
}

async function showJob(jobId) {
  selectedJob = jobId;
  try {
    renderDetail(await api(`/monitor/jobs/${encodeURIComponent(jobId)}`));
    document.getElementById("detail").scrollIntoView({ behavior: "smooth" });
  } catch (err) {
    banner(`Cannot load ${jobId}: ${err.message}`, true);
  }
}

async function refresh() {
  clearTimeout(timer);
  try {
    const [summary, dead, retrying, recent] = await Promise.all([
      api("/monitor/summary"),
      api("/monitor/jobs?state=dead&limit=100"),
      api("/monitor/jobs?state=retrying&limit=100"),
      api("/monitor/jobs?limit=25"),
    ]);
    renderProviders(summary);
    renderJobs(dead, retrying, recent);
    if (selectedJob) {
      try {
        renderDetail(await api(`/monitor/jobs/${encodeURIComponent(selectedJob)}`));
      } catch (err) {  // dropped by retention meanwhile
        selectedJob = null;
        document.getElementById("detail").hidden = true;
      }
    }
    const updated = document.getElementById("updated");
    updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.loaded = "1";
  } catch (err) {
    banner(`Refresh failed: ${err.message}`, true);
  } finally {
    timer = setTimeout(refresh, REFRESH_MS);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("replay-all").addEventListener("click", replayAll);
  document.getElementById("detail-close").addEventListener("click", () => {
    selectedJob = null;
    document.getElementById("detail").hidden = true;
  });
  refresh();
});
