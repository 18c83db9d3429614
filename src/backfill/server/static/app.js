// backfill dashboard: sign in with a token, then poll the API and redraw in place (no reloads).
// Every value from the API goes into the page as text (textContent), never as HTML.
"use strict";

const state = { token: sessionStorage.getItem("backfill-token"), me: null, timer: null, jobId: null, showDead: false };
const $ = id => document.getElementById(id);

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  Object.entries(props || {}).forEach(([k, v]) => {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v);
  });
  children.flat().forEach(c => node.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c))));
  return node;
}

async function api(path, options) {
  options = options || {};
  const headers = Object.assign({ Authorization: "Bearer " + state.token }, options.body ? { "Content-Type": "application/json" } : {});
  const resp = await fetch(path, Object.assign({}, options, { headers }));
  if (resp.status === 401) { signOut("Your token was not accepted; sign in again."); throw new Error("unauthorised"); }
  if (!resp.ok) {
    let detail = resp.statusText;
    try { const body = await resp.json(); detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail); } catch (e) { /* not JSON */ }
    throw new Error(detail);
  }
  return options.raw ? resp : resp.status === 204 ? null : resp.json();
}

function toast(message, bad) {
  const t = $("toast");
  t.textContent = message; t.className = bad ? "bad" : ""; t.hidden = false;
  clearTimeout(toast.timer); toast.timer = setTimeout(() => (t.hidden = true), 4000);
}

const money = v => v == null ? "–" : "$" + (v < 1 ? v.toFixed(4) : v.toFixed(2));
const num = v => v == null ? "–" : Math.round(v).toLocaleString("en-US");
function duration(s) {
  if (s == null || !isFinite(s)) return "–";
  if (s < 90) return Math.round(s) + " s";
  if (s < 5400) return Math.round(s / 60) + " min";
  return (s / 3600).toFixed(1) + " h";
}
function progressBar(job) {
  const pct = job.rows_total ? (100 * (job.rows_ok + job.rows_failed)) / job.rows_total : 0;
  const bar = el("div", { class: "bar" }, el("div"));
  bar.firstChild.style.width = pct.toFixed(1) + "%";
  return bar;
}
const badge = status => el("span", { class: "badge " + status }, status);

// --- routing ---------------------------------------------------------------------------

function show(view) {
  document.querySelectorAll(".view").forEach(v => (v.hidden = v.id !== "view-" + view));
  document.querySelectorAll("nav a").forEach(a => a.classList.toggle("active", a.getAttribute("href") === "#/" + view));
}

async function route() {
  clearTimeout(state.timer);
  if (!state.token) { show("signin"); return; }
  if (!state.me) {
    try { state.me = await api("/me"); } catch (e) { return; }
    $("whoami").textContent = state.me.name + " (" + state.me.role + ")";
    $("nav").hidden = false; $("signout").hidden = false;
    $("nav-operator").hidden = state.me.role !== "operator";
  }
  const parts = (location.hash || "#/jobs").slice(2).split("/");
  if (parts[0] === "job" && parts[1]) { state.jobId = parts[1]; state.showDead = false; show("job"); loop(refreshJob, 1000); }
  else if (parts[0] === "operator" && state.me.role === "operator") { show("operator"); loop(refreshOperator, 2000); }
  else { show("jobs"); loop(refreshJobs, 2000); }
}

function loop(fn, every) {
  const tick = async () => {
    try { await fn(); } catch (e) { if (e.message !== "unauthorised") toast(e.message, true); }
    state.timer = setTimeout(tick, every);
  };
  tick();
}

function signOut(message) {
  sessionStorage.removeItem("backfill-token");
  state.token = null; state.me = null;
  $("nav").hidden = true; $("signout").hidden = true; $("whoami").textContent = "";
  $("signin-error").textContent = message || "";
  show("signin");
}

$("signin-form").addEventListener("submit", async ev => {
  ev.preventDefault();
  state.token = $("token").value.trim();
  state.me = null;
  try {
    await api("/me");
    sessionStorage.setItem("backfill-token", state.token);
    $("token").value = "";
    location.hash = "#/jobs";
    route();
  } catch (e) { if (e.message !== "unauthorised") $("signin-error").textContent = e.message; }
});
$("signout").addEventListener("click", () => signOut());
window.addEventListener("hashchange", route);

// --- my jobs -----------------------------------------------------------------------------

async function refreshJobs() {
  const jobs = await api("/jobs");
  const operator = state.me.role === "operator";
  $("jobs-title").textContent = operator ? "All jobs" : "My jobs";
  document.querySelectorAll(".owner-col").forEach(c => (c.hidden = !operator));
  $("jobs-empty").hidden = jobs.length > 0;
  $("jobs-body").replaceChildren(...jobs.map(j => {
    const row = el("tr", { class: "clickable", dataset: { job: j.id }, onclick: () => (location.hash = "#/job/" + j.id) },
      el("td", { class: "mono" }, j.id),
      el("td", { class: "owner-col" }, j.owner),
      el("td", {}, badge(j.status), j.reason ? el("div", { class: "muted" }, j.reason) : ""),
      el("td", {}, j.model),
      el("td", {}, progressBar(j)),
      el("td", { class: "num" }, num(j.rows_ok)),
      el("td", { class: "num" }, num(j.rows_failed)),
      el("td", { class: "num" }, money(j.cost_usd)),
      el("td", { class: "num" }, j.status === "running" ? duration(j.eta_s) : "–"));
    row.children[1].hidden = !operator;
    return row;
  }));
}

// --- one job ----------------------------------------------------------------------------------

async function refreshJob() {
  const id = state.jobId;
  const job = await api("/jobs/" + encodeURIComponent(id) + "/progress");
  $("job-id").textContent = job.id;
  const st = $("job-status"); st.textContent = job.status; st.className = "badge " + job.status;
  $("job-reason").textContent = job.reason || "";
  $("job-meta").textContent = job.model + " · owner " + job.owner + (job.credential ? " · credential " + job.credential : " · built-in simulator") + " · priority " + job.priority +
    (job.cache === "shared" ? " · cache shared with the team" : " · cache private to " + job.owner);
  const done = job.rows_ok + job.rows_failed;
  $("job-bar").style.width = (job.rows_total ? (100 * done) / job.rows_total : 0).toFixed(1) + "%";
  $("rows-ok").textContent = num(job.rows_ok);
  $("rows-of").textContent = "of " + num(job.rows_total) + " (" + (job.rows_total ? ((100 * done) / job.rows_total).toFixed(1) : "0") + "% settled)";
  $("rows-failed").textContent = num(job.rows_failed);
  $("requests").textContent = num(job.requests_sent);
  $("req-rate").textContent = job.requests_per_s.toFixed(1) + " req/s · " + num(job.rate_limited) + " × 429";
  $("tpm").textContent = num(job.tokens_per_min);
  $("tpm-limit").textContent = job.tpm_limit ? "limit " + num(job.tpm_limit) + " (" + ((100 * job.tokens_per_min) / job.tpm_limit).toFixed(0) + "%)" : "limit unknown";
  $("cost").textContent = money(job.cost_usd);
  $("cost-projected").textContent = job.projected_cost_usd != null ? "projected " + money(job.projected_cost_usd) : "";
  $("eta").textContent = job.status === "running" ? duration(job.eta_s) : job.status === "succeeded" ? "done" : "–";
  $("inflight").textContent = job.in_flight + " in flight";
  $("btn-pause").disabled = !["queued", "running"].includes(job.status);
  $("btn-resume").disabled = !["paused", "failed"].includes(job.status);
  $("btn-cancel").disabled = ["succeeded", "failed", "cancelled"].includes(job.status);
  $("btn-download").disabled = job.status !== "succeeded";

  const pts = job.series, rows = [], tokens = [], limit = [];
  for (let i = 1; i < pts.length; i++) {
    const a = pts[i - 1], b = pts[i], dt = Math.max(b.t - a.t, 1e-3);
    rows.push([b.t, Math.max(0, (b.rows_done - a.rows_done) / dt)]);
    tokens.push([b.t, Math.max(0, ((b.tokens - a.tokens) / dt) * 60)]);
    if (b.tpm_limit) limit.push([b.t, b.tpm_limit]);
  }
  drawChart($("chart-throughput"), [{ points: smooth(rows, 3), color: "#2f6fdb", label: "rows/s" }]);
  drawChart($("chart-tokens"), [
    { points: smooth(tokens, 3), color: "#1f9d55", label: "tokens/min" },
    { points: limit, color: "#d64545", label: "limit", dashed: true },
  ]);
  if (state.showDead) await refreshDeadLetters();
}

function smooth(points, n) {
  return points.map((p, i) => {
    const part = points.slice(Math.max(0, i - n + 1), i + 1);
    return [p[0], part.reduce((s, q) => s + q[1], 0) / part.length];
  });
}

async function refreshDeadLetters() {
  const dead = await api("/jobs/" + encodeURIComponent(state.jobId) + "/dead-letters?limit=500");
  $("deadletters").hidden = dead.length === 0;
  $("deadletters-empty").hidden = dead.length > 0;
  $("deadletters-body").replaceChildren(...dead.map(d => el("tr", {}, el("td", { class: "mono" }, d.row_id), el("td", { class: "num" }, d.chunk_index), el("td", {}, d.reason))));
}

$("btn-deadletters").addEventListener("click", async () => {
  state.showDead = !state.showDead;
  $("btn-deadletters").textContent = state.showDead ? "Hide dead letters" : "Show dead letters";
  if (state.showDead) await refreshDeadLetters();
  else { $("deadletters").hidden = true; $("deadletters-empty").hidden = true; }
});

async function control(id, action) {
  try {
    const r = await api("/jobs/" + encodeURIComponent(id) + "/" + action, { method: "POST" });
    toast("job " + id + ": " + r.status);
  } catch (e) { if (e.message !== "unauthorised") toast(e.message, true); }
}
$("btn-pause").addEventListener("click", () => control(state.jobId, "pause"));
$("btn-resume").addEventListener("click", () => control(state.jobId, "resume"));
$("btn-cancel").addEventListener("click", () => { if (confirm("Cancel job " + state.jobId + "?")) control(state.jobId, "cancel"); });
$("btn-download").addEventListener("click", async () => {
  const resp = await api("/jobs/" + encodeURIComponent(state.jobId) + "/output", { raw: true });
  const name = (resp.headers.get("content-disposition") || "").match(/filename="?([^";]+)/);
  const a = el("a", { href: URL.createObjectURL(await resp.blob()), download: name ? name[1] : state.jobId });
  document.body.append(a); a.click(); a.remove();
});

// --- operator ------------------------------------------------------------------------------------

async function refreshOperator() {
  const [ov, jobs] = await Promise.all([api("/overview"), api("/jobs?limit=500")]);
  $("op-queue").textContent = num(ov.queue_depth);
  $("op-running").textContent = num(ov.jobs_by_status.running || 0);
  $("op-succeeded").textContent = num(ov.jobs_by_status.succeeded || 0);
  $("op-failed").textContent = num(ov.jobs_by_status.failed || 0);
  $("op-spend").textContent = money(ov.users.reduce((s, u) => s + u.spent_today_usd, 0));
  renderLanes(ov.lanes);
  renderUsers(ov.users);
  renderAllJobs(jobs);
}

// Cards and rows with inputs are built once per key and then only updated, so typing is never lost.
function keyed(container, items, keyOf, create, update) {
  const seen = new Set();
  for (const item of items) {
    const key = keyOf(item);
    seen.add(key);
    let node = container.querySelector('[data-key="' + CSS.escape(key) + '"]');
    if (!node) { node = create(item); node.dataset.key = key; container.append(node); }
    update(node, item);
  }
  [...container.children].forEach(n => { if (!seen.has(n.dataset.key)) n.remove(); });
}

function renderLanes(lanes) {
  $("lanes-empty").hidden = lanes.length > 0;
  keyed($("lanes"), lanes, l => l.key, lane => {
    const rpm = el("input", { class: "small", type: "number", min: "1", step: "any", placeholder: "rpm", "data-testid": "lane-rpm-" + lane.key, "aria-label": "requests per minute" });
    const tpm = el("input", { class: "small", type: "number", min: "1", step: "any", placeholder: "tpm", "data-testid": "lane-tpm-" + lane.key, "aria-label": "tokens per minute" });
    const mif = el("input", { class: "small", type: "number", min: "1", step: "1", placeholder: "in flight", "data-testid": "lane-inflight-" + lane.key, "aria-label": "max in flight" });
    const form = el("form", {}, "Set limits: ", rpm, tpm, mif,
      el("button", { type: "submit", class: "primary mini", "data-testid": "lane-apply-" + lane.key }, "Apply"),
      el("button", { type: "button", class: "mini", onclick: () => setLane(lane.key, null, null, null) }, "Use the jobs' own"));
    form.addEventListener("submit", ev => {
      ev.preventDefault();
      const v = i => (i.value === "" ? null : Number(i.value));
      setLane(lane.key, v(rpm), v(tpm), v(mif));
    });
    return el("div", { class: "card lane", "data-testid": "lane" },
      el("div", {}, el("b", { class: "lane-name" }), el("dl", { class: "facts" }), form),
      el("canvas", { height: "170" }));
  }, (node, lane) => {
    node.querySelector(".lane-name").textContent = lane.name;
    const facts = [
      ["requests/min limit", num(lane.rpm) + (lane.override_rpm != null ? " (set by operator)" : "")],
      ["tokens/min limit", num(lane.tpm)],
      ["utilisation", lane.utilisation == null ? "–" : (100 * lane.utilisation).toFixed(0) + "%"],
      ["in flight / waiting", lane.in_flight + " / " + lane.waiting + " (cap " + num(lane.max_in_flight) + ")"],
      ["requests / 429s", num(lane.requests_total) + " / " + num(lane.rate_limited_total)],
      ["jobs on it", lane.jobs.length ? lane.jobs.join(", ") : "none"],
    ];
    node.querySelector(".facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
    const s = lane.series;
    drawChart(node.querySelector("canvas"), [
      { points: smooth(s.map(p => [p.t, p.requests_per_min]), 3), color: "#2f6fdb", label: "requests/min" },
      { points: s.filter(p => p.rpm_limit).map(p => [p.t, p.rpm_limit]), color: "#8a94a6", label: "limit", dashed: true },
      { points: s.map(p => [p.t, p.rate_limited_per_min]), color: "#d64545", label: "429s/min" },
    ], { empty: "no traffic yet" });
  });
}

async function setLane(key, rpm, tpm, maxInFlight) {
  try {
    const lane = await api("/lanes/" + encodeURIComponent(key) + "/limits", { method: "PUT", body: JSON.stringify({ rpm, tpm, max_in_flight: maxInFlight }) });
    toast("lane " + lane.name + ": " + num(lane.rpm) + " requests/min");
    await refreshOperator();
  } catch (e) { if (e.message !== "unauthorised") toast(e.message, true); }
}

function renderUsers(users) {
  keyed($("users-body"), users, u => u.name, u => {
    const weight = el("input", { class: "small", type: "number", min: "0.01", step: "any", "data-testid": "weight-" + u.name, "aria-label": "weight of " + u.name });
    weight.value = u.weight;
    const save = el("button", { class: "mini", "data-testid": "weight-save-" + u.name, onclick: async () => {
      try { await api("/users/" + encodeURIComponent(u.name), { method: "PATCH", body: JSON.stringify({ weight: Number(weight.value) }) }); toast(u.name + ": weight " + weight.value); }
      catch (e) { if (e.message !== "unauthorised") toast(e.message, true); }
    } }, "Save");
    return el("tr", {}, el("td"), el("td"), el("td", { class: "num" }), el("td", { class: "num" }), el("td", { class: "num" }), el("td", { class: "num" }), el("td"), el("td", {}, weight, " ", save));
  }, (row, u) => {
    const c = row.children;
    c[0].textContent = u.name; c[1].textContent = u.role; c[2].textContent = u.running; c[3].textContent = u.queued;
    c[4].textContent = money(u.spent_today_usd); c[5].textContent = money(u.spent_month_usd);
    const q = [];
    if (u.max_jobs != null) q.push(u.max_jobs + " jobs at once");
    if (u.usd_per_day != null) q.push(money(u.usd_per_day) + "/day");
    if (u.usd_per_month != null) q.push(money(u.usd_per_month) + "/month");
    c[6].textContent = q.join(", ") || "none";
  });
}

function renderAllJobs(jobs) {
  const byUser = {};
  jobs.forEach(j => (byUser[j.owner] = byUser[j.owner] || []).push(j));
  const rows = [];
  Object.keys(byUser).sort().forEach(owner => {
    rows.push(el("tr", {}, el("td", { class: "group", colspan: "6" }, owner + " — " + byUser[owner].length + " job(s)")));
    byUser[owner].forEach(j => {
      const active = !["succeeded", "failed", "cancelled"].includes(j.status);
      rows.push(el("tr", { dataset: { job: j.id } },
        el("td", {}, ""),
        el("td", {}, el("a", { href: "#/job/" + j.id, class: "mono" }, j.id)),
        el("td", {}, badge(j.status), j.reason ? el("div", { class: "muted" }, j.reason) : ""),
        el("td", {}, progressBar(j)),
        el("td", { class: "num" }, money(j.cost_usd)),
        el("td", {},
          active ? el("button", { class: "mini", onclick: () => control(j.id, "pause") }, "Pause") : "", " ",
          active ? el("button", { class: "mini danger", onclick: () => control(j.id, "cancel") }, "Cancel") : "")));
    });
  });
  $("all-jobs-body").replaceChildren(...rows);
}

route();
