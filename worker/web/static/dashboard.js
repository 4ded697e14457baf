// clientsync dashboard: a page per view behind hash routes (#/, #/jobs?filters, #/jobs/<id>,
// #/clients/<id>, #/providers), so every view has a link to share and Back works. It polls the
// monitor JSON API (same origin, session cookie) and renders with textContent only: ledger data
// (names, provider messages) is never parsed as HTML. Emails arrive masked from the API.
"use strict";

const REFRESH_MS = 3000;
const HEADERS = { "X-Clientsync-Request": "1" };
const STATES = ["queued", "running", "retrying", "needs_attention", "dead", "succeeded", "skipped", "discarded"];
const FILTERS = ["provider", "state", "error_class", "client_id", "event_id", "since", "until"];
const BULK_FILTERS = ["provider", "error_class", "client_id", "since", "until"];
const MAX_BULK = 10000;
const MAX_LIMIT = 500;
const PAGE = 50;

let load = null;        // the current view's loader
let seq = 0;            // bumped on every route change: answers for an older view are dropped
let timer = null;
let confirming = false; // no refresh while the operator is asked to confirm
let rendered = {};      // last data drawn per part of the view: redraw only what changed
let providerNames = [];

// --- DOM and formats ------------------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key.startsWith("data-") || key.startsWith("aria-")) node.setAttribute(key, String(value));
    else node[key] = value;
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// One timestamp format everywhere: "2024-05-01 12:00:05 UTC"; how long ago in the tooltip.
function fmtTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return `${d.toISOString().slice(0, 19).replace("T", " ")} UTC`;
}

function relative(iso) {
  const secs = Math.round((Date.now() - new Date(iso).getTime()) / 1000);
  const a = Math.abs(secs);
  const text = a < 60 ? `${a} s` : a < 3600 ? `${Math.round(a / 60)} min` : a < 172800
    ? `${Math.round(a / 3600)} h` : `${Math.round(a / 86400)} days`;
  return secs >= 0 ? `${text} ago` : `in ${text}`;
}

function timeEl(iso) {
  if (!iso) return "";
  return el("time", { dateTime: iso, title: relative(iso) }, fmtTime(iso));
}

function badge(state, prefix) {
  return el("span", { class: `badge ${prefix || "state"}-${state}` }, String(state).replace("_", " "));
}

function section(title, ...children) {
  return el("section", {}, el("h2", {}, title), ...children);
}

function table(id, headings) {
  return el("table", { id }, el("thead", {}, el("tr", {}, headings.map((h) => el("th", {}, h)))), el("tbody"));
}

function fill(id, rows, columns, empty) {
  const body = document.querySelector(`#${id} tbody`);
  if (!body) return;
  body.replaceChildren(...rows);
  if (!rows.length) body.append(el("tr", {}, el("td", { class: "empty", colSpan: columns }, empty || "none")));
}

function changed(part, data) {
  const text = JSON.stringify(data);
  if (rendered[part] === text) return false;
  rendered[part] = text;
  return true;
}

function banner(message, isError) {
  const node = document.getElementById("banner");
  node.textContent = message;
  node.className = isError ? "error" : "";
  node.hidden = !message;
}

// --- API ------------------------------------------------------------------------------------------
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
  if (!response.ok) {
    const error = new Error(data.error || `${response.status} ${response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

const enc = encodeURIComponent;
const post = (path, body) => api(path, { method: "POST", body: JSON.stringify(body || {}) });

// --- routes ---------------------------------------------------------------------------------------
function currentRoute() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const q = raw.indexOf("?");
  const params = new URLSearchParams(q < 0 ? "" : raw.slice(q + 1));
  const parts = (q < 0 ? raw : raw.slice(0, q)).split("/").filter(Boolean).map((p) => {
    try { return decodeURIComponent(p); } catch (err) { return p; }
  });
  return { parts, params };
}

function href(parts, params) {
  const path = `#/${parts.map(enc).join("/")}`;
  const kept = Object.entries(params || {}).filter(([, v]) => v !== undefined && v !== null && v !== "");
  const qs = new URLSearchParams(kept).toString();
  return qs ? `${path}?${qs}` : path;
}

const jobHref = (id) => href(["jobs", id]);
const clientHref = (id) => href(["clients", id]);
const jobsHref = (filters) => href(["jobs"], filters);

function go(target) {
  if (location.hash === target) render();
  else location.hash = target; // a history entry: Back returns to the previous view
}

function render() {
  const { parts, params } = currentRoute();
  seq += 1;
  rendered = {};
  clearTimeout(timer);
  const view = document.getElementById("view");
  view.replaceChildren();
  let name;
  if (!parts.length) { name = "overview"; load = overviewView(view); }
  else if (parts[0] === "jobs" && parts.length === 1) {
    name = params.get("state") === "dead" ? "dead" : params.get("state") === "needs_attention" ? "attention" : "jobs";
    load = jobsView(view, params);
  } else if (parts[0] === "jobs") { name = "job"; load = jobView(view, parts.slice(1).join("/")); }
  else if (parts[0] === "clients" && parts.length > 1) { name = "client"; load = clientView(view, parts.slice(1).join("/")); }
  else if (parts[0] === "providers") { name = "providers"; load = providersView(view); }
  else {
    name = "unknown";
    load = null;
    view.append(el("p", {}, "No such page. ", el("a", { href: "#/" }, "Go to the overview")));
  }
  document.body.dataset.view = name;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("current", a.dataset.nav === name);
  refresh();
}

// After an action the view is drawn again even where the data did not change (buttons re-enabled).
function redraw() {
  rendered = {};
  return refresh();
}

async function refresh() {
  clearTimeout(timer);
  const mine = seq;
  const live = () => mine === seq;
  if (load && !confirming && !document.hidden) {
    try {
      await load(live);
      if (live()) {
        document.getElementById("updated").textContent = `updated ${fmtTime(new Date().toISOString())}`;
        document.body.dataset.loaded = "1";
      }
    } catch (err) {
      if (live() && err.message !== "signed out") banner(`Refresh failed: ${err.message}`, true);
    }
  }
  if (live()) timer = setTimeout(refresh, REFRESH_MS);
}

function askConfirm(message, yesLabel) {
  return new Promise((resolve) => {
    const box = document.getElementById("confirm");
    const yes = document.getElementById("confirm-yes");
    const no = document.getElementById("confirm-no");
    confirming = true;
    document.getElementById("confirm-text").textContent = message;
    yes.textContent = yesLabel;
    box.hidden = false;
    const done = (answer) => {
      box.hidden = true;
      confirming = false;
      yes.onclick = null;
      no.onclick = null;
      resolve(answer);
    };
    yes.onclick = () => done(true);
    no.onclick = () => done(false);
    yes.focus();
  });
}

// --- shared pieces --------------------------------------------------------------------------------
function jobLink(job) {
  return el("a", { class: "job", href: jobHref(job.id), "data-job-link": job.id }, job.id);
}

function clientLink(clientId) {
  if (!clientId || clientId === "-") return clientId || "";
  return el("a", { class: "client", href: clientHref(clientId), "data-client-link": clientId }, clientId);
}

function errorText(job) {
  return [job.last_error_class, job.last_error].filter(Boolean).join(": ");
}

function outcomeText(job) {
  if (["dead", "retrying", "discarded", "needs_attention"].includes(job.state)) return errorText(job);
  return job.result || job.reason || "";
}

async function replay(jobId, button) {
  if (button) button.disabled = true;
  try {
    await post(`/monitor/jobs/${enc(jobId)}/replay`);
    banner(`Replayed ${jobId}: queued again.`);
  } catch (err) {
    banner(`Replay of ${jobId} failed: ${err.message}`, true);
  }
  redraw();
}

async function discard(jobId, button) {
  if (button) button.disabled = true;
  try {
    await post(`/monitor/jobs/${enc(jobId)}/discard`);
    banner(`Discarded ${jobId} (still replayable from its job view).`);
  } catch (err) {
    banner(`Discard of ${jobId} failed: ${err.message}`, true);
  }
  redraw();
}

function jobActions(job) {
  const out = [];
  if (job.state === "dead" && job.provider !== "intake" && job.provider !== "-") {
    out.push(el("button", { type: "button", class: "replay", "data-job-id": job.id,
                            onclick: (e) => replay(job.id, e.currentTarget) }, "Replay"));
  }
  if (job.state === "dead") {
    out.push(el("button", { type: "button", class: "discard", "data-job-id": job.id,
                            onclick: (e) => discard(job.id, e.currentTarget) }, "Discard"));
  }
  if (job.state === "needs_attention") out.push(el("a", { href: jobHref(job.id), class: "button" }, "Resolve…"));
  return out;
}

function jobRow(job, { actions } = {}) {
  const when = job.state === "retrying" && job.next_attempt_at
    ? el("span", {}, "next ", timeEl(job.next_attempt_at)) : timeEl(job.updated_at);
  return el("tr", { "data-job-id": job.id, "data-state": job.state },
    el("td", {}, jobLink(job)),
    el("td", {}, job.provider || ""),
    el("td", {}, clientLink(job.client_id)),
    el("td", {}, badge(job.state)),
    el("td", { class: "num" }, job.attempts),
    el("td", { class: "error" }, outcomeText(job)),
    el("td", {}, when),
    actions ? el("td", { class: "actions" }, jobActions(job)) : null);
}

const JOB_HEADINGS = ["job", "provider", "client", "state", "attempts", "outcome", "updated"];

function describe(filter) {
  const parts = Object.entries(filter).filter(([, v]) => v).map(([k, v]) => `${k.replace("_", " ")} ${v}`);
  return parts.length ? parts.join(", ") : "every provider";
}

// Bulk replay: a dry run first gives the exact number, the operator confirms that number, and the
// replay is capped at it (jobs that die meanwhile wait for the next bulk replay).
async function bulkReplay(filter) {
  let dry;
  try {
    dry = await post("/monitor/replay", Object.assign({}, filter, { dry_run: true, limit: MAX_BULK }));
  } catch (err) {
    banner(`Bulk replay failed: ${err.message}`, true);
    return;
  }
  if (!dry.matched) {
    banner(`No dead job matches (${describe(filter)}): nothing to replay.`);
    return;
  }
  const replayable = dry.matched - dry.not_replayable;
  let message = `Replay ${dry.matched} dead job${dry.matched === 1 ? "" : "s"} (${describe(filter)})?`;
  if (dry.not_replayable) message += ` ${dry.not_replayable} of them are invalid messages and cannot be replayed.`;
  if (dry.more) message += ` More than ${MAX_BULK} match: this replays ${MAX_BULK}; run it again for the rest.`;
  if (!await askConfirm(message, `Replay ${replayable}`)) {
    banner("Bulk replay cancelled: nothing was replayed.");
    return;
  }
  try {
    const result = await post("/monitor/replay", Object.assign({}, filter, { limit: dry.matched }));
    const refused = Object.keys(result.refused || {}).length;
    banner(`Replayed ${result.replayed} dead job${result.replayed === 1 ? "" : "s"}`
      + `${refused ? ` (${refused} changed state meanwhile and were left alone)` : ""}.`);
  } catch (err) {
    banner(`Bulk replay failed: ${err.message}`, true);
  }
  redraw();
}

function groupsTable(id) {
  return table(id, ["error class", "provider", "dead jobs", "latest", "newest error", ""]);
}

function fillGroups(id, groups) {
  fill(id, groups.groups.map((g) => {
    const filter = { provider: g.provider, error_class: g.error_class };
    return el("tr", { "data-error-class": g.error_class, "data-provider": g.provider, "data-count": g.count },
      el("td", {}, el("a", { href: jobsHref({ state: "dead", ...filter }) }, g.error_class)),
      el("td", {}, g.provider),
      el("td", { class: "num" }, g.count),
      el("td", {}, timeEl(g.latest_at)),
      el("td", { class: "error" }, g.example_error || ""),
      el("td", { class: "actions" }, g.provider === "intake" ? "" : el("button", {
        type: "button", class: "replay-group", onclick: () => bulkReplay(filter) }, `Replay ${g.count}…`)));
  }), 6, "no dead job");
}

// --- overview -------------------------------------------------------------------------------------
function overviewView(view) {
  view.append(
    section("Providers", el("div", { id: "providers", class: "cards" })),
    section(el("span", {}, "Dead jobs by cause ", el("span", { id: "dead-total", class: "muted" })),
      el("div", { class: "toolbar" },
        el("button", { id: "replay-all", type: "button", onclick: () => bulkReplay({}) }, "Replay all dead…")),
      groupsTable("dead-groups")),
    section(el("span", {}, "Needs attention ", el("span", { id: "attention-count", class: "muted" })),
      table("attention", JOB_HEADINGS)),
    section("Retrying", table("retrying", JOB_HEADINGS)),
    section(el("span", {}, "Recent activity ", el("a", { href: "#/jobs", class: "muted" }, "all jobs →")),
      table("recent", JOB_HEADINGS)));
  return async (live) => {
    const [summary, groups, attention, retrying, recent] = await Promise.all([
      api("/monitor/summary"), api("/monitor/dead-groups"),
      api("/monitor/jobs?state=needs_attention&limit=50"), api("/monitor/jobs?state=retrying&limit=20"),
      api("/monitor/jobs?limit=25"),
    ]);
    if (!live()) return;
    noteSummary(summary);
    if (changed("summary", summary.providers)) renderCards(summary);
    if (changed("groups", groups)) {
      document.getElementById("dead-total").textContent = `(${groups.total})`;
      const all = document.getElementById("replay-all");
      all.textContent = `Replay all ${groups.total} dead…`;
      all.disabled = groups.total === 0;
      fillGroups("dead-groups", groups);
    }
    if (changed("attention", attention)) {
      document.getElementById("attention-count").textContent =
        `(${attention.jobs.length}${attention.next_cursor ? "+" : ""})`;
      fill("attention", attention.jobs.map((j) => jobRow(j)), 7, "nothing waits for an operator");
    }
    if (changed("retrying", retrying)) fill("retrying", retrying.jobs.map((j) => jobRow(j)), 7);
    if (changed("recent", recent)) fill("recent", recent.jobs.map((j) => jobRow(j)), 7, "no job yet");
  };
}

function noteSummary(summary) {
  providerNames = [...new Set([...(summary.provider_names || []), ...Object.keys(summary.providers)])]
    .filter((n) => n !== "-");
  document.getElementById("overview").textContent =
    `queue ${summary.queue}: ${summary.queue_depth} waiting · workers alive: ${summary.workers.length}`
    + (summary.heartbeats || []).filter((b) => !b.live).slice(0, 5)
      .map((b) => ` · silent: ${b.worker} (last heartbeat ${Math.round(b.age_seconds)} s ago)`).join("");
}

function rateText(rate) {
  if (!rate.known || rate.tokens === undefined) return "no limit recorded";
  return `${rate.tokens}${rate.capacity ? ` / ${rate.capacity}` : ""} tokens`
    + (rate.limit ? ` (limit ${rate.limit} per ${rate.period_seconds} s)` : "")
    + (rate.blocked_until ? `, blocked until ${fmtTime(rate.blocked_until)}` : "");
}

function renderCards(summary) {
  const box = document.getElementById("providers");
  box.replaceChildren();
  const names = Object.keys(summary.providers);
  if (!names.length) box.append(el("p", { class: "muted" }, "No jobs yet."));
  for (const name of names) {
    const p = summary.providers[name];
    const c = p.counts;
    const health = c.dead > 0 || ["open", "auth_failed"].includes(p.circuit.state) ? "bad"
      : c.retrying > 0 || c.needs_attention > 0 || ["half_open", "paused"].includes(p.circuit.state) ? "warn" : "ok";
    const label = name === "-" ? "(invalid messages)" : name;
    box.append(el("div", { class: `card health-${health}`, "data-provider": name },
      el("h3", {}, el("a", { href: jobsHref({ provider: name }) }, label), badge(p.circuit.state, "circuit")),
      el("dl", { class: "counts" }, STATES.map((s) => el("div", {},
        el("dt", {}, s.replace("_", " ")),
        el("dd", { class: `state-${s}`, "data-count": s },
          el("a", { href: jobsHref({ provider: name, state: s }) }, c[s] || 0))))),
      el("p", { class: "muted" }, `rate limit: ${rateText(p.rate_limit)}`),
      el("p", { class: "muted" }, `applied ${p.totals.applied}, retried ${p.totals.retried}, `
        + `dead ${p.totals.dead}, replayed ${p.totals.replayed}`),
      p.oldest_retrying ? el("p", {}, "oldest retrying: ", jobLink(p.oldest_retrying),
        ` (${p.oldest_retrying.attempts} attempts)`) : null));
  }
}

// --- jobs (filters in the URL) ----------------------------------------------------------------------
function jobsView(view, params) {
  const filter = {};
  for (const name of FILTERS) if (params.get(name)) filter[name] = params.get(name);
  let limit = Math.min(MAX_LIMIT, Math.max(PAGE, Number(params.get("limit")) || PAGE));
  const field = (name, label, input) => el("label", { class: "field" }, el("span", {}, label), input);
  const providerSelect = el("select", { id: "f-provider", name: "provider" }, el("option", { value: "" }, "any"));
  const stateSelect = el("select", { id: "f-state", name: "state" }, el("option", { value: "" }, "any"),
    STATES.map((s) => el("option", { value: s, selected: filter.state === s }, s.replace("_", " "))));
  const text = (name, placeholder) => el("input", { id: `f-${name}`, name, value: filter[name] || "", placeholder,
                                                   type: "text", autocomplete: "off" });
  const since = text("since", "2024-05-01T12:00:00Z");
  const within = el("select", { id: "f-within", "aria-label": "updated within", onchange: (e) => {
    const minutes = Number(e.currentTarget.value);
    since.value = minutes ? new Date(Date.now() - minutes * 60000).toISOString().slice(0, 19) + "Z" : "";
  } }, [["", "or pick…"], ["15", "last 15 min"], ["60", "last hour"], ["1440", "last 24 h"], ["10080", "last 7 days"]]
    .map(([v, t]) => el("option", { value: v }, t)));
  const form = el("form", { id: "filters", class: "filters", onsubmit: (e) => {
    e.preventDefault();
    const values = {};
    for (const name of FILTERS) values[name] = form.elements[name].value.trim();
    go(jobsHref(values));
  } },
    field("provider", "provider", providerSelect), field("state", "state", stateSelect),
    field("error_class", "error class", text("error_class", "e.g. validation")),
    field("client_id", "client", text("client_id", "client id")),
    field("event_id", "event", text("event_id", "event id")),
    field("since", "updated since", since), field("within", "", within),
    field("until", "until", text("until", "2024-05-02T00:00:00Z")),
    el("div", { class: "field buttons" }, el("button", { type: "submit", id: "apply-filters", class: "primary" }, "Apply"),
      el("a", { href: "#/jobs", id: "clear-filters" }, "clear")));
  const title = filter.state ? `${filter.state.replace("_", " ")} jobs` : "Jobs";
  view.append(el("section", {}, el("h2", {}, title, " ", el("span", { id: "jobs-count", class: "muted" })), form));
  const bulkFilter = {};
  for (const name of BULK_FILTERS) if (filter[name]) bulkFilter[name] = filter[name];
  const bulkable = filter.state === "dead" && !filter.event_id;
  if (filter.state === "dead") {
    view.append(el("section", {},
      el("h3", {}, "By cause ", el("span", { id: "dead-total", class: "muted" })), groupsTable("dead-groups"),
      bulkable ? el("div", { class: "toolbar" }, el("button", { id: "replay-all", type: "button",
        onclick: () => bulkReplay(bulkFilter) }, "Replay all matching dead…")) : null));
  }
  view.append(el("section", {}, table("jobs", [...JOB_HEADINGS, ""]),
    el("div", { class: "toolbar" }, el("button", { id: "more", type: "button", hidden: true, onclick: () => {
      limit = Math.min(MAX_LIMIT, limit + PAGE);
      refresh();
    } }, "Load more"), el("span", { id: "more-note", class: "muted" }))));
  let named = false;
  const groupQuery = new URLSearchParams(Object.entries({ provider: filter.provider, client_id: filter.client_id })
    .filter(([, v]) => v)).toString();
  return async (live) => {
    const query = new URLSearchParams({ ...filter, limit: String(limit) }).toString();
    const wants = [api(`/monitor/jobs?${query}`), providerNames.length ? null : api("/monitor/summary"),
                   filter.state === "dead" ? api(`/monitor/dead-groups?${groupQuery}`) : null];
    const [page, summary, groups] = await Promise.all(wants);
    if (!live()) return;
    if (summary) noteSummary(summary);
    if (!named) {
      named = true;
      const names = [...new Set([...providerNames, "intake", ...(filter.provider ? [filter.provider] : [])])];
      providerSelect.append(...names.map((n) => el("option", { value: n, selected: filter.provider === n }, n)));
    }
    if (groups && changed("groups", groups)) {
      const scope = describe({ provider: filter.provider, client_id: filter.client_id });
      document.getElementById("dead-total").textContent = `(${groups.total} dead, ${scope})`;
      fillGroups("dead-groups", groups);
    }
    if (changed("jobs", page)) {
      document.getElementById("jobs-count").textContent =
        `(${page.jobs.length}${page.next_cursor ? "+" : ""} matching ${describe(filter)})`;
      fill("jobs", page.jobs.map((j) => jobRow(j, { actions: true })), 8, "no job matches these filters");
      const more = document.getElementById("more");
      more.hidden = !page.next_cursor || limit >= MAX_LIMIT;
      document.getElementById("more-note").textContent = page.next_cursor && limit >= MAX_LIMIT
        ? `showing the newest ${MAX_LIMIT}: narrow the filters to see older ones` : "";
    }
  };
}

// --- one job ----------------------------------------------------------------------------------------
function jobView(view, jobId) {
  const box = el("section", { id: "detail", class: "panel" },
    el("h2", {}, el("button", { type: "button", class: "quiet", id: "back", onclick: () => history.back() }, "← back"),
      " Job ", el("code", { id: "detail-id" }, jobId)),
    el("p", { class: "muted" }, "loading…"));
  view.append(box);
  return async (live) => {
    let job;
    try {
      job = await api(`/monitor/jobs/${enc(jobId)}`);
    } catch (err) {
      if (!live() || err.status !== 404) throw err;
      box.replaceChildren(el("h2", {}, "Job ", el("code", {}, jobId)), el("p", { class: "error" }, err.message));
      return;
    }
    if (live() && changed("job", job)) renderJob(box, job);
  };
}

async function resolve(job, body, button) {
  button.disabled = true;
  try {
    await post(`/monitor/jobs/${enc(job.id)}/resolve`, body);
    banner(body.action === "adopt" ? `Resolved ${job.id}: adopt ${body.provider_id}; queued again.`
      : `Resolved ${job.id}: create a new record; queued again.`);
  } catch (err) {
    banner(`Resolving ${job.id} failed: ${err.message}`, true);
  }
  redraw();
}

function resolutionText(resolution) {
  if (!resolution) return null;
  return resolution.action === "adopt" ? `adopt the provider's record ${resolution.provider_id}`
    : resolution.action === "create" ? "create a new record" : JSON.stringify(resolution);
}

function renderJob(box, job) {
  box.dataset.jobId = job.id;
  box.dataset.state = job.state;
  const fields = el("dl", { id: "detail-fields" });
  const shown = [
    ["state", badge(job.state)],
    ["provider", job.provider ? el("a", { href: jobsHref({ provider: job.provider }) }, job.provider) : null],
    ["event", job.event_id && job.event_id !== "-" ? el("a", { href: jobsHref({ event_id: job.event_id }) }, job.event_id) : null],
    ["client", job.client_id && job.client_id !== "-" ? clientLink(job.client_id) : null],
    ["action", job.action !== "-" ? job.action : null], ["attempts", job.attempts], ["replays", job.replays],
    ["received", timeEl(job.received_at)], ["last update", timeEl(job.updated_at)],
    ["finished", timeEl(job.finished_at)], ["next attempt", timeEl(job.next_attempt_at)],
    ["result", job.result || (job.provider === "intake" ? null : job.reason)], ["provider id", job.provider_id],
    ["last error", ["dead", "retrying", "discarded", "needs_attention"].includes(job.state) ? errorText(job) : null],
    ["resolution", resolutionText(job.resolution)], ["note", job.note],
    ["not taken by provider", job.unsupported_fields && job.unsupported_fields.length
      ? el("span", { class: "unsupported", title: "canonical fields set on the client that this provider cannot hold" },
        job.unsupported_fields.join(", ")) : null],
  ];
  for (const [name, value] of shown) {
    if (value === null || value === undefined || value === "") continue;
    fields.append(el("dt", {}, name), el("dd", { "data-field": name }, value));
  }
  const actions = [];
  if (job.replayable) {
    actions.push(el("button", { type: "button", class: "replay primary", id: "job-replay",
                                onclick: (e) => replay(job.id, e.currentTarget) }, "Replay"));
  }
  if (job.state === "dead") {
    actions.push(el("button", { type: "button", class: "discard", id: "job-discard",
                                onclick: (e) => discard(job.id, e.currentTarget) }, "Discard"));
  }
  if (actions.length) fields.append(el("dt", {}, "actions"), el("dd", { class: "actions" }, actions));

  const parts = [fields];
  if (job.state === "needs_attention" && job.candidates && job.candidates.length) {
    parts.push(el("div", { id: "candidates", class: "attention" },
      el("h3", {}, "Which record at ", job.provider, " is this client?"),
      el("p", {}, `Several records at ${job.provider} could be client ${job.client_id}. Adopt one (clientsync links `
        + "it and updates it), or create a new record. The job runs again with your answer."),
      el("table", {}, el("thead", {}, el("tr", {}, ["record id", "name", "email", "created", ""].map((h) => el("th", {}, h)))),
        el("tbody", {}, job.candidates.map((c) => el("tr", { "data-candidate": c.provider_id },
          el("td", {}, el("code", {}, c.provider_id)), el("td", {}, c.name || ""), el("td", {}, c.email || ""),
          el("td", {}, timeEl(c.created_at)),
          el("td", {}, el("button", { type: "button", class: "adopt primary", "data-provider-id": c.provider_id,
            onclick: (e) => resolve(job, { action: "adopt", provider_id: String(c.provider_id) }, e.currentTarget) },
            "Adopt")))))),
      el("p", {}, el("button", { type: "button", id: "resolve-create",
        onclick: (e) => resolve(job, { action: "create" }, e.currentTarget) }, "Create new record"))));
  }
  if (job.provider === "intake") {
    parts.push(el("div", { id: "dead-letter" }, el("h3", {}, "Dead letter"),
      el("p", { class: "muted" }, "A queue entry that never became a valid job; fix the producer and send the change again."),
      el("dl", {}, el("dt", {}, "reason"), el("dd", { "data-field": "reason" }, job.reason || ""),
        el("dt", {}, "stage"), el("dd", { "data-field": "stage" }, job.stage || ""))));
  }
  const timeline = el("ol", { id: "timeline" });
  for (const a of job.history) {
    const bits = [a.error_class, a.status ? `HTTP ${a.status}` : null, a.message || a.note].filter(Boolean);
    const fieldErrors = Object.entries(a.field_errors || {}).map(([f, msgs]) => `${f}: ${msgs.join(", ")}`);
    timeline.append(el("li", { "data-outcome": a.outcome },
      timeEl(a.at), " ", a.number ? `attempt ${a.number} ` : "", badge(a.outcome), " ", bits.join(" · "),
      a.next_attempt_at ? el("span", {}, " · next attempt ", timeEl(a.next_attempt_at)) : "",
      a.duration_ms ? ` · ${a.duration_ms} ms` : "",
      a.provider_ms != null && a.duration_ms ? ` (${a.provider_ms} ms at the provider)` : "",
      fieldErrors.length ? el("ul", {}, fieldErrors.map((t) => el("li", {}, t))) : null));
  }
  if (!job.history.length) timeline.append(el("li", { class: "muted" }, "no attempt yet"));
  parts.push(el("h3", {}, "Timeline"), timeline);
  parts.push(el("h3", {}, job.change ? "Change (emails masked)" : "Raw payload (emails masked)"),
    el("pre", { id: job.change ? "detail-change" : "detail-raw" },
      job.change ? JSON.stringify(job.change, null, 2) : (job.raw || "(not kept)")));
  box.replaceChildren(box.firstChild, ...parts);
}

// --- one client -------------------------------------------------------------------------------------
function clientView(view, clientId) {
  let limit = 100;
  const box = el("section", { id: "client", class: "panel", "data-client-id": clientId },
    el("h2", {}, el("button", { type: "button", class: "quiet", onclick: () => history.back() }, "← back"),
      " Client ", el("code", { id: "client-id" }, clientId)),
    el("p", { id: "client-summary" }),
    el("h3", {}, "At each provider"),
    table("client-providers", ["provider", "record", "last applied", "pending", "operator's answer"]),
    el("p", { id: "client-unknown", class: "muted" }),
    el("h3", {}, "Timeline ", el("span", { class: "muted" }, "(every change at every provider, newest first)")),
    table("client-timeline", ["updated", "provider", "event", "action", "state", "attempts", "outcome", "job"]),
    el("div", { class: "toolbar" }, el("button", { id: "client-more", type: "button", hidden: true, onclick: () => {
      limit = Math.min(MAX_LIMIT, limit + 100);
      refresh();
    } }, "Load more")));
  view.append(box);
  return async (live) => {
    let data;
    try {
      data = await api(`/monitor/clients/${enc(clientId)}?limit=${limit}`);
    } catch (err) {
      if (!live() || ![400, 404].includes(err.status)) throw err;
      box.replaceChildren(el("h2", {}, "Client ", el("code", {}, clientId)), el("p", { class: "error" }, err.message));
      return;
    }
    if (live() && changed("client", data)) renderClient(data, limit);
  };
}

function pendingText(p) {
  const out = [];
  if (p.intent) out.push(el("div", {}, `create pending (event ${p.intent.event_id}, since `, timeEl(p.intent.at), ")"));
  if (p.del_intent) out.push(el("div", {}, `delete pending (event ${p.del_intent.event_id}, since `, timeEl(p.del_intent.at), ")"));
  if (p.unsettled) {
    out.push(el("div", { class: p.unsettled.settled ? "muted" : "warn" },
      p.unsettled.settled ? "an unclear write has settled (at " : "an unclear write settles at ",
      timeEl(p.unsettled.settle_at), p.unsettled.settled ? ")" : ": nothing is sent to this client here before then"));
  }
  return out.length ? out : "none";
}

function renderClient(data, limit) {
  const jobsAt = {};
  const appliedAt = {}; // the newest succeeded job per provider: when its change was applied
  for (const j of data.jobs) {
    jobsAt[j.provider] = (jobsAt[j.provider] || 0) + 1;
    if (j.state === "succeeded" && !appliedAt[j.provider]) appliedAt[j.provider] = j.finished_at || j.updated_at;
  }
  const names = Object.keys(data.providers).filter((p) => data.providers[p].known || jobsAt[p]);
  const unknown = Object.keys(data.providers).filter((p) => !names.includes(p));
  fill("client-providers", names.map((name) => {
    const p = data.providers[name];
    const record = !p.known ? el("span", { class: "muted" }, "no record yet")
      : p.deleted ? el("span", { class: "state-discarded" }, "deleted", p.link ? ` (was ${p.link})` : "")
        : p.link ? el("span", {}, "linked to ", el("code", {}, p.link)) : el("span", { class: "muted" }, "not linked");
    const applied = p.changed_at || p.version !== null
      ? el("span", {}, p.version !== null ? `version ${p.version}` : "unversioned",
        p.changed_at ? el("span", {}, ", change of ", timeEl(p.changed_at)) : "",
        appliedAt[name] ? el("div", { class: "muted" }, "applied ", timeEl(appliedAt[name])) : "")
      : el("span", { class: "muted" }, "nothing applied yet");
    return el("tr", { "data-provider": name, "data-link": p.link || "", "data-deleted": p.deleted ? "1" : "0" },
      el("td", {}, el("a", { href: jobsHref({ provider: name, client_id: data.client_id }) }, name)),
      el("td", {}, record), el("td", {}, applied), el("td", {}, pendingText(p)),
      el("td", {}, resolutionText(p.resolution) || ""));
  }), 5, "no record at any provider");
  document.getElementById("client-unknown").textContent = unknown.length
    ? `No record and no job at: ${unknown.join(", ")}.` : "";
  const latest = names.map((n) => ({ n, p: data.providers[n] })).filter((x) => x.p.changed_at)
    .sort((a, b) => (a.p.changed_at < b.p.changed_at ? 1 : -1))[0];
  document.getElementById("client-summary").replaceChildren(
    `${data.jobs.length}${data.next_cursor ? "+" : ""} job(s) across ${Object.keys(jobsAt).length} provider(s). `,
    latest ? el("span", {}, "Newest change applied: the change of ", timeEl(latest.p.changed_at),
      latest.p.version !== null ? ` (version ${latest.p.version})` : "", `, at ${latest.n}.`) : "Nothing applied yet.");
  fill("client-timeline", data.jobs.map((job) => el("tr", { "data-job-id": job.id, "data-state": job.state },
    el("td", {}, timeEl(job.updated_at)), el("td", {}, job.provider), el("td", {}, job.event_id),
    el("td", {}, job.action), el("td", {}, badge(job.state)), el("td", { class: "num" }, job.attempts),
    el("td", { class: "error" }, outcomeText(job)), el("td", {}, jobLink(job)))), 8, "no job in the ledger");
  document.getElementById("client-more").hidden = !data.next_cursor || limit >= MAX_LIMIT;
}

// --- providers ----------------------------------------------------------------------------------------
const ACTION_TEXT = { pause: "Pause", resume: "Resume", probe: "Probe now" };

// Pause unless paused; resume what is not closed (paused, auth_failed, open); probe at any time.
function providerActions(state) {
  return [state !== "paused" ? "pause" : null, state !== "closed" ? "resume" : null, "probe"].filter(Boolean);
}

async function providerAction(name, action, button) {
  if (action === "pause" && !await askConfirm(
    `Pause ${name}? Its jobs wait, without spending attempts, until it is resumed.`, `Pause ${name}`)) {
    return;
  }
  button.disabled = true;
  try {
    const r = await post(`/monitor/providers/${enc(name)}/${action}`);
    banner(`${ACTION_TEXT[action]} ${name}: circuit ${r.before} → ${r.after}.`);
  } catch (err) {
    banner(`${ACTION_TEXT[action]} ${name} failed: ${err.message}`, true);
  }
  redraw();
}

function providersView(view) {
  view.append(
    section("Providers", el("p", { class: "muted" }, "Pause stops a provider's jobs without spending attempts; "
      + "resume lets them run; probe now lets the next job test the provider at once."),
    el("div", { id: "provider-controls", class: "cards" })),
    section("Audit (operator actions and automatic pauses, newest first)",
      table("audit", ["at", "provider", "action", "by", "circuit", "note"])));
  return async (live) => {
    const [summary, audit] = await Promise.all([api("/monitor/summary"), api("/monitor/audit?limit=100")]);
    if (!live()) return;
    noteSummary(summary);
    if (changed("providers", [summary.provider_names, summary.providers])) {
      const box = document.getElementById("provider-controls");
      box.replaceChildren();
      for (const name of summary.provider_names || Object.keys(summary.providers)) {
        const p = summary.providers[name] || { circuit: { state: "closed" }, rate_limit: { known: false }, counts: {} };
        const c = p.circuit;
        const facts = [c.failures !== undefined ? `${c.failures} failures` : null,
          c.paused_by ? `paused by ${c.paused_by}` : null].filter(Boolean).join(", ");
        box.append(el("div", { class: "card", "data-provider": name, "data-circuit": c.state },
          el("h3", {}, el("a", { href: jobsHref({ provider: name }) }, name), badge(c.state, "circuit")),
          facts ? el("p", { class: "muted" }, facts) : null,
          c.reopen_at ? el("p", { class: "muted" }, "retries after ", timeEl(c.reopen_at)) : null,
          c.opened_at ? el("p", { class: "muted" }, "opened ", timeEl(c.opened_at)) : null,
          el("p", { class: "muted" }, `rate limit: ${rateText(p.rate_limit)}`),
          el("p", { class: "muted" }, `${p.counts.dead || 0} dead, ${p.counts.retrying || 0} retrying, `
            + `${p.counts.queued || 0} queued`),
          el("div", { class: "actions" }, providerActions(c.state).map((action) => el("button", {
            type: "button", class: `provider-${action}`, "data-action": action, "data-provider": name,
            onclick: (e) => providerAction(name, action, e.currentTarget) }, ACTION_TEXT[action])))));
      }
    }
    if (changed("audit", audit)) {
      fill("audit", audit.entries.map((a) => el("tr", { "data-provider": a.provider, "data-action": a.action },
        el("td", {}, timeEl(a.at)), el("td", {}, a.provider), el("td", {}, a.action), el("td", {}, a.actor),
        el("td", {}, a.before && a.after ? `${a.before} → ${a.after}` : ""), el("td", {}, a.note || ""))), 6,
      "no operator action yet");
    }
  };
}

// --- search -------------------------------------------------------------------------------------------
async function search(text) {
  const q = text.trim();
  if (!q) return;
  banner("");
  try {
    if (q.includes(":")) { // a job id is "<provider>:<event id>"
      try {
        await api(`/monitor/jobs/${enc(q)}`);
        go(jobHref(q));
        return;
      } catch (err) {
        if (err.status !== 404) throw err;
      }
    }
    const [byClient, byEvent] = await Promise.all([
      api(`/monitor/jobs?client_id=${enc(q)}&limit=1`).catch(() => ({ jobs: [] })),
      api(`/monitor/jobs?event_id=${enc(q)}&limit=50`).catch(() => ({ jobs: [] })),
    ]);
    if (byClient.jobs.length) go(clientHref(q));
    else if (byEvent.jobs.length === 1) go(jobHref(byEvent.jobs[0].id));
    else if (byEvent.jobs.length) go(jobsHref({ event_id: q }));
    else {
      try {
        await api(`/monitor/clients/${enc(q)}`);
        go(clientHref(q));
      } catch (err) {
        banner(`Nothing found for "${q}": no job, event or client has that id.`, true);
      }
    }
  } catch (err) {
    banner(`Search failed: ${err.message}`, true);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("search").addEventListener("submit", (e) => {
    e.preventDefault();
    search(document.getElementById("search-input").value);
  });
  window.addEventListener("hashchange", () => { banner(""); render(); });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
  render();
});
