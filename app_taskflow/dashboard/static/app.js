// The app-taskflow dashboard: one ES module, no dependency and no build step.
//
// Every value that comes from the server (task names, arguments, logs, errors, tracebacks)
// reaches the page through textContent, createTextNode or setAttribute, never through
// innerHTML, so it is always shown as text. The page's Content-Security-Policy allows no
// inline script either.
//
// Data: GET <api>, <api>/{id}, <api>/metrics and <api>/metrics/throughput, where <api> is
// this page's path without "/dashboard", so the page works under any prefix or proxy path.
// Live updates: one EventSource on <api>/dashboard/events (see stream.py for its events).

const PAGE_SIZE = 50;
const RETRYABLE = new Set(["FAILED", "INTERRUPTED"]);
const COUNTED_STATUSES = ["PENDING", "RUNNING", "SUCCESS", "FAILED", "INTERRUPTED", "CANCELLED"];
const RELOAD_DELAY_MS = 400;
const OVERVIEW_INTERVAL_MS = 3000;
const THROUGHPUT_INTERVAL_MS = 10000;
const THROUGHPUT_REFRESH_MS = 60000;
const READY_TIMEOUT_MS = 3000;
const RECONNECTING_GRACE_MS = 4000;
const MAX_BULK_CALLS = 1000;

const apiBase = location.pathname.replace(/\/dashboard\/?$/, "");

const state = {
  filters: { status: "", name: "", search: "", order: "newest" },
  cursors: [null],
  page: 0,
  nextCursor: null,
  loadSequence: 0,
  selectedId: null,
  detailSequence: 0,
  detailLogKeys: new Set(),
  names: new Set(),
  loadedOnce: false,
};

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------- DOM helpers

/** Create an element; strings among the children become text nodes. */
function h(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  setAttributes(node, attributes);
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";

function svg(tag, attributes = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  setAttributes(node, attributes);
  node.append(...children);
  return node;
}

function setAttributes(node, attributes) {
  for (const [key, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = String(value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
}

function statusBadge(status) {
  return h("span", { class: `badge status-${status.toLowerCase()}`, text: status });
}

function toast(message, isError = false) {
  const box = $("toast");
  box.textContent = message;
  box.dataset.kind = isError ? "error" : "info";
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.hidden = true; }, isError ? 8000 : 4000);
}

// ---------------------------------------------------------------- formatting

const timeFormat = new Intl.DateTimeFormat(undefined, {
  hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false,
});
const dateTimeFormat = new Intl.DateTimeFormat(undefined, {
  year: "numeric", month: "2-digit", day: "2-digit",
  hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false,
});

function formatTime(iso) {
  if (!iso) return "–";
  const moment = new Date(iso);
  const today = new Date().toDateString() === moment.toDateString();
  return (today ? timeFormat : dateTimeFormat).format(moment);
}

function formatFullTime(iso) {
  return iso ? `${dateTimeFormat.format(new Date(iso))} (${iso})` : "–";
}

function formatDuration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 2 : 1)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
}

function formatRate(rate) {
  return rate === null || rate === undefined ? "–" : `${(rate * 100).toFixed(1)} %`;
}

function shortId(id) {
  return id.slice(0, 8);
}

function errorText(task) {
  if (!task.error_type && !task.error_message) return "";
  return [task.error_type, task.error_message].filter(Boolean).join(": ");
}

// ---------------------------------------------------------------- requests

async function request(path, { method = "GET", params = [] } = {}) {
  const url = new URL(apiBase + path, location.origin);
  for (const [key, value] of params) url.searchParams.append(key, value);
  const headers = { Accept: "application/json" };
  // The server rejects actions without this header, which another site cannot add.
  if (method !== "GET") headers["X-Taskflow-Request"] = "1";
  const response = await fetch(url, { method, headers, credentials: "same-origin", cache: "no-store" });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = body && body.detail;
    const message = typeof detail === "string" ? detail
      : Array.isArray(detail) ? detail.map((item) => item.msg).join("; ")
        : `${response.status} ${response.statusText}`;
    throw new Error(message);
  }
  return body;
}

function filterParams() {
  const { status, name, search, order } = state.filters;
  const params = [["order", order]];
  if (status) params.push(["status", status]);
  if (name) params.push(["name", name]);
  if (search) params.push(["search", search]);
  return params;
}

function report(error) {
  toast(error instanceof Error ? error.message : String(error), true);
}

// ---------------------------------------------------------------- task table

async function loadTasks() {
  const sequence = ++state.loadSequence;
  const params = [...filterParams(), ["limit", String(PAGE_SIZE)]];
  const cursor = state.cursors[state.page];
  if (cursor) params.push(["cursor", cursor]);
  const page = await request("", { params });
  if (sequence !== state.loadSequence) return; // A newer load has started since.
  state.nextCursor = page.next_cursor;
  state.loadedOnce = true;
  renderRows(page.items);
}

function renderRows(tasks) {
  $("task-rows").replaceChildren(...tasks.map(taskRow));
  $("empty").hidden = tasks.length > 0;
  $("page-number").textContent = `page ${state.page + 1}`;
  $("page-first").disabled = state.page === 0;
  $("page-previous").disabled = state.page === 0;
  $("page-next").disabled = !state.nextCursor;
}

function taskRow(task) {
  const error = errorText(task);
  const row = h(
    "tr",
    {
      "data-task-id": task.id,
      "data-status": task.status,
      class: task.id === state.selectedId ? "selected" : null,
      tabindex: "0",
    },
    h("td", {}, statusBadge(task.status)),
    h("td", { class: "name", title: task.name, text: task.name }),
    h("td", { class: "col-id mono", title: task.id, text: shortId(task.id) }),
    h("td", { class: "nowrap", title: formatFullTime(task.created_at), text: formatTime(task.created_at) }),
    h("td", { class: "num nowrap", text: formatDuration(task.duration) }),
    h("td", { class: "num col-attempts", text: `${task.attempts}/${task.max_attempts}` }),
    h("td", { class: "col-error", title: error || null, text: error }),
  );
  row.addEventListener("click", () => openTask(task.id));
  row.addEventListener("keydown", (event) => {
    if (event.key === "Enter") openTask(task.id);
  });
  return row;
}

function findRow(taskId) {
  return $("task-rows").querySelector(`tr[data-task-id="${CSS.escape(taskId)}"]`);
}

function matchesFilters(task) {
  const { status, name } = state.filters;
  return (!status || task.status === status) && (!name || task.name === name);
}

let reloadTimer = null;

/** Reload the current page soon, once, however many changes ask for it meanwhile. */
function scheduleReload() {
  if (reloadTimer !== null) return;
  reloadTimer = setTimeout(() => {
    reloadTimer = null;
    loadTasks().catch(report);
  }, RELOAD_DELAY_MS);
}

function applySummary(task) {
  rememberName(task.name);
  const row = findRow(task.id);
  if (row) {
    row.replaceWith(taskRow(task));
    if (!matchesFilters(task)) scheduleReload();
  } else if (state.page === 0 && matchesFilters(task)) {
    // Shown at once; the reload then brings the page and its cursor in line with the store.
    if (!state.filters.search && state.filters.order === "newest") {
      $("task-rows").prepend(taskRow(task));
      $("empty").hidden = true;
    }
    scheduleReload();
  }
  if (task.id === state.selectedId) scheduleDetail();
}

// ---------------------------------------------------------------- overview

let overviewTimer = null;
let overviewLast = 0;

function scheduleOverview() {
  if (overviewTimer !== null) return;
  const wait = Math.max(0, overviewLast + OVERVIEW_INTERVAL_MS - Date.now());
  overviewTimer = setTimeout(() => {
    overviewTimer = null;
    loadOverview().catch(report);
  }, wait);
}

async function loadOverview() {
  overviewLast = Date.now();
  const metrics = await request("/metrics");
  renderCounts(metrics);
  renderNames(metrics.by_name);
}

function renderCounts(metrics) {
  const total = Object.values(metrics.counts).reduce((sum, count) => sum + count, 0);
  const cards = COUNTED_STATUSES.map((status) => h(
    "button",
    {
      type: "button",
      class: `count status-${status.toLowerCase()}${state.filters.status === status ? " active" : ""}`,
      "data-status": status,
      title: `Show ${status} tasks`,
      onclick: () => setFilters({ status: state.filters.status === status ? "" : status }),
    },
    h("span", { class: "count-value", text: (metrics.counts[status] ?? 0).toLocaleString() }),
    h("span", { class: "count-label", text: status.toLowerCase() }),
  ));
  cards.push(
    h("div", { class: "count summary" },
      h("span", { class: "count-value", text: formatRate(metrics.success_rate) }),
      h("span", { class: "count-label", text: "success rate" })),
    h("div", { class: "count summary" },
      h("span", { class: "count-value", text: total.toLocaleString() }),
      h("span", { class: "count-label", text: "tasks" })),
  );
  $("counts").replaceChildren(...cards);
}

function renderNames(byName) {
  const names = Object.keys(byName).sort();
  names.forEach(rememberName);
  const rows = names.map((name) => {
    const metrics = byName[name];
    const total = Object.values(metrics.counts).reduce((sum, count) => sum + count, 0);
    return h(
      "tr",
      {},
      h("td", { class: "name" },
        h("button", {
          type: "button", class: "link", text: name, title: `Show ${name} tasks`,
          onclick: () => setFilters({ name }),
        })),
      h("td", { class: "num", text: total.toLocaleString() }),
      h("td", { class: "num", text: formatRate(metrics.success_rate) }),
      h("td", { class: "num nowrap", text: formatDuration(metrics.duration.p50) }),
      h("td", { class: "num nowrap", text: formatDuration(metrics.duration.p95) }),
    );
  });
  if (rows.length === 0) rows.push(h("tr", {}, h("td", { colspan: "5", class: "note", text: "No task yet." })));
  $("names").replaceChildren(...rows);
}

function rememberName(name) {
  if (state.names.has(name)) return;
  state.names.add(name);
  const select = $("filter-name");
  const options = [...state.names].sort().map((known) => h("option", { value: known, text: known }));
  select.replaceChildren(h("option", { value: "", text: "all" }), ...options);
  select.value = state.filters.name;
}

// ---------------------------------------------------------------- throughput chart

let throughputTimer = null;
let throughputLast = 0;

function scheduleThroughput() {
  if (throughputTimer !== null) return;
  const wait = Math.max(0, throughputLast + THROUGHPUT_INTERVAL_MS - Date.now());
  throughputTimer = setTimeout(() => {
    throughputTimer = null;
    loadThroughput().catch(report);
  }, wait);
}

async function loadThroughput() {
  throughputLast = Date.now();
  renderThroughput(await request("/metrics/throughput", { params: [["minutes", "60"]] }));
}

function niceCeiling(value) {
  const magnitude = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) {
    if (value <= step * magnitude) return step * magnitude;
  }
  return 10 * magnitude;
}

function renderThroughput(data) {
  const width = 600;
  const height = 150;
  const left = 36;
  const right = 6;
  const top = 8;
  const bottom = 20;
  const plotWidth = width - left - right;
  const plotHeight = height - top - bottom;
  const buckets = data.buckets;
  const highest = Math.max(1, ...buckets.map((bucket) => bucket.succeeded + bucket.failed));
  const ceiling = niceCeiling(highest);
  const y = (count) => top + plotHeight - (count / ceiling) * plotHeight;
  const slot = plotWidth / buckets.length;
  const barWidth = Math.max(1, slot - 1.5);

  let succeeded = 0;
  let failed = 0;
  const bars = buckets.map((bucket, index) => {
    succeeded += bucket.succeeded;
    failed += bucket.failed;
    const x = left + index * slot;
    const label = `${formatTime(bucket.start)}: ${bucket.succeeded} succeeded, ${bucket.failed} failed`;
    return svg(
      "g",
      { class: "bar" },
      svg("title", { text: label }),
      svg("rect", { class: "hit", x, y: top, width: slot, height: plotHeight }),
      svg("rect", {
        class: "succeeded", x, width: barWidth,
        y: y(bucket.succeeded), height: plotHeight + top - y(bucket.succeeded),
      }),
      svg("rect", {
        class: "failed", x, width: barWidth,
        y: y(bucket.succeeded + bucket.failed), height: y(bucket.succeeded) - y(bucket.succeeded + bucket.failed),
      }),
    );
  });

  const grid = [0, ceiling / 2, ceiling].map((value) => svg(
    "g",
    { class: "grid" },
    svg("line", { x1: left, x2: width - right, y1: y(value), y2: y(value) }),
    svg("text", { x: left - 4, y: y(value) + 4, "text-anchor": "end", text: String(value) }),
  ));
  const axis = [[0, "−60 min", "start"], [0.5, "−30 min", "middle"], [1, "now", "end"]].map(
    ([fraction, text, anchor]) => svg("text", {
      class: "axis", x: left + fraction * plotWidth, y: height - 4, "text-anchor": anchor, text,
    }),
  );
  const chart = svg(
    "svg",
    {
      viewBox: `0 0 ${width} ${height}`,
      role: "img",
      "aria-label": `Last hour: ${succeeded} tasks succeeded, ${failed} failed`,
    },
    ...grid,
    ...bars,
    ...axis,
  );
  $("throughput").replaceChildren(chart);
  $("throughput-note").textContent = data.complete
    ? `${succeeded.toLocaleString()} succeeded, ${failed.toLocaleString()} failed in the last hour.`
    : `Counted from the ${data.scanned.toLocaleString()} most recent finished tasks only.`;
}

// ---------------------------------------------------------------- task detail

let detailTimer = null;

function scheduleDetail() {
  if (detailTimer !== null) return;
  detailTimer = setTimeout(() => {
    detailTimer = null;
    if (state.selectedId) loadDetail(state.selectedId).catch(report);
  }, 250);
}

function openTask(taskId) {
  state.selectedId = taskId;
  for (const row of $("task-rows").querySelectorAll("tr.selected")) row.classList.remove("selected");
  const row = findRow(taskId);
  if (row) row.classList.add("selected");
  $("detail").hidden = false;
  if (window.matchMedia("(max-width: 900px)").matches) $("detail").scrollIntoView();
  writeHash();
  loadDetail(taskId).catch(report);
}

function closeTask() {
  state.selectedId = null;
  state.detailSequence++;
  $("detail").hidden = true;
  for (const row of $("task-rows").querySelectorAll("tr.selected")) row.classList.remove("selected");
  writeHash();
}

async function loadDetail(taskId) {
  const sequence = ++state.detailSequence;
  let task;
  try {
    task = await request(`/${encodeURIComponent(taskId)}`);
  } catch (error) {
    if (sequence !== state.detailSequence) return;
    $("detail-title").textContent = "Task not found";
    $("detail-body").replaceChildren(h("p", { class: "note", text: error.message }));
    return;
  }
  if (sequence !== state.detailSequence) return;
  renderDetail(task);
}

function field(label, value, { mono = false } = {}) {
  return [h("dt", { text: label }), h("dd", { class: mono ? "mono" : null, text: value })];
}

/** Return the tags as a dt and a dd with one text line "key: value" per tag. */
function tagFields(tags) {
  const entries = Object.entries(tags ?? {});
  if (entries.length === 0) return [];
  return [
    h("dt", { text: "tags" }),
    h("dd", { class: "tags" }, ...entries.map(([key, value]) => h("div", { class: "tag", text: `${key}: ${value}` }))),
  ];
}

function originText(origin) {
  return `${origin.method} ${origin.path}`;
}

function renderDetail(task) {
  $("detail-title").textContent = task.name;
  const actions = h("div", { class: "actions" });
  if (RETRYABLE.has(task.status)) {
    actions.append(h("button", { type: "button", id: "action-retry", text: "Retry", onclick: () => retryTask(task) }));
  }
  if (task.status === "PENDING" || task.status === "RUNNING") {
    const label = task.status === "PENDING" ? "Cancel" : "Stop";
    actions.append(h("button", { type: "button", id: "action-cancel", class: "danger", text: label, onclick: () => cancelTask(task) }));
  }

  const facts = h(
    "dl",
    { class: "facts" },
    ...field("status", task.status),
    ...field("id", task.id, { mono: true }),
    ...field("attempts", `${task.attempts} of ${task.max_attempts}`),
    ...field("created", formatFullTime(task.created_at)),
    ...field("started", formatFullTime(task.started_at)),
    ...field("finished", formatFullTime(task.finished_at)),
    ...(task.scheduled_at ? field("next attempt", formatFullTime(task.scheduled_at)) : []),
    ...field("duration", formatDuration(task.duration)),
    ...field("instance", task.owner ?? "–", { mono: true }),
    ...(task.idempotency_key ? field("idempotency key", task.idempotency_key, { mono: true }) : []),
    ...(task.cancel_requested ? field("cancel", "requested") : []),
    ...tagFields(task.tags),
    ...(task.origin ? field("added by", originText(task.origin)) : []),
    ...(task.origin?.request_id ? field("request id", task.origin.request_id, { mono: true }) : []),
    ...(task.trace_parent ? field("trace parent", task.trace_parent, { mono: true }) : []),
  );

  const sections = [
    h("div", { class: "detail-status" }, statusBadge(task.status), actions),
    facts,
    h("h3", { text: "Arguments" }),
    h("pre", { class: "code arguments", text: JSON.stringify({ args: task.args, kwargs: task.kwargs }, null, 2) }),
  ];
  const error = errorText(task);
  if (error) sections.push(h("h3", { text: "Error" }), h("pre", { class: "code error-text", text: error }));
  if (task.traceback) {
    const traceback = h("pre", { class: "code traceback", text: task.traceback });
    sections.push(
      h("div", { class: "section-head" },
        h("h3", { text: "Traceback" }),
        h("button", { type: "button", class: "secondary copy", text: "Copy", onclick: (event) => copyText(traceback, event.currentTarget) })),
      traceback,
    );
  }
  sections.push(h("h3", { text: `Attempts (${task.attempt_history.length})` }), attemptsTable(task.attempt_history));

  const logList = h("ol", { class: "logs", id: "detail-logs" });
  state.detailLogKeys = new Set();
  for (const entry of task.logs) appendLogEntry(logList, entry);
  sections.push(h("h3", { text: "Log" }), logList);
  if (task.logs.length === 0) logList.append(h("li", { class: "note empty-log", text: "No log entry." }));

  $("detail-body").replaceChildren(...sections);
}

function attemptsTable(attempts) {
  if (attempts.length === 0) return h("p", { class: "note", text: "Not started yet." });
  const rows = attempts.map((attempt) => {
    const seconds = attempt.finished_at
      ? (new Date(attempt.finished_at) - new Date(attempt.started_at)) / 1000
      : null;
    const error = [attempt.error_type, attempt.error_message].filter(Boolean).join(": ");
    return h(
      "tr",
      {},
      h("td", { class: "num", text: String(attempt.number) }),
      h("td", {}, statusBadge(attempt.status)),
      h("td", { class: "nowrap", title: formatFullTime(attempt.started_at), text: formatTime(attempt.started_at) }),
      h("td", { class: "nowrap", title: formatFullTime(attempt.finished_at), text: formatTime(attempt.finished_at) }),
      h("td", { class: "num nowrap", text: formatDuration(seconds) }),
      h("td", { class: "wrap", text: error }),
    );
  });
  return h(
    "div",
    { class: "table-scroll" },
    h("table", { class: "attempts" },
      h("thead", {}, h("tr", {}, ...["#", "status", "start", "end", "took", "error"].map((text) => h("th", { scope: "col", text })))),
      h("tbody", {}, ...rows)),
  );
}

function appendLogEntry(list, entry) {
  const key = `${entry.timestamp}|${entry.level}|${entry.attempt}|${entry.message}`;
  if (state.detailLogKeys.has(key)) return;
  state.detailLogKeys.add(key);
  list.querySelector(".empty-log")?.remove();
  list.append(h(
    "li",
    { class: `log level-${entry.level.toLowerCase()}` },
    h("time", { datetime: entry.timestamp, title: formatFullTime(entry.timestamp), text: formatTime(entry.timestamp) }),
    h("span", { class: "level", text: entry.level }),
    entry.attempt ? h("span", { class: "attempt", title: "attempt", text: `#${entry.attempt}` }) : null,
    h("span", { class: "message", text: entry.message }),
  ));
}

function applyLog(taskId, entry) {
  if (taskId !== state.selectedId) return;
  const list = document.getElementById("detail-logs");
  if (list) appendLogEntry(list, entry);
}

async function copyText(source, button) {
  const text = source.textContent;
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // Without the clipboard API (a page served over plain HTTP to another host), select it.
    const range = document.createRange();
    range.selectNodeContents(source);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    document.execCommand("copy");
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

// ---------------------------------------------------------------- actions

function confirmAction(message, confirmLabel) {
  const dialog = $("confirm");
  $("confirm-message").textContent = message;
  $("confirm-ok").textContent = confirmLabel;
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
  });
}

async function retryTask(task) {
  const question = `Run task ${task.name} (${shortId(task.id)}) again, with a new set of attempts?`;
  if (!(await confirmAction(question, "Retry"))) return;
  try {
    await request(`/${encodeURIComponent(task.id)}/retry`, { method: "POST" });
    toast(`Task ${shortId(task.id)} queued again.`);
  } catch (error) {
    report(error);
  }
  scheduleDetail();
}

async function cancelTask(task) {
  const question = task.status === "PENDING"
    ? `Cancel task ${task.name} (${shortId(task.id)})? It will not run.`
    : `Ask running task ${task.name} (${shortId(task.id)}) to stop?`;
  if (!(await confirmAction(question, task.status === "PENDING" ? "Cancel task" : "Stop task"))) return;
  try {
    await request(`/${encodeURIComponent(task.id)}/cancel`, { method: "POST" });
    toast(task.status === "PENDING" ? `Task ${shortId(task.id)} cancelled.` : `Task ${shortId(task.id)} asked to stop.`);
  } catch (error) {
    report(error);
  }
  scheduleDetail();
}

function describeFilters() {
  const { status, name, search } = state.filters;
  const parts = [];
  if (name) parts.push(`named ${name}`);
  if (search) parts.push(`matching "${search}"`);
  const which = status || "FAILED and INTERRUPTED";
  return `every ${which} task${parts.length ? " " + parts.join(", ") : ""}`;
}

async function retryMatches() {
  const { status, name, search } = state.filters;
  if (!(await confirmAction(`Retry ${describeFilters()}?`, "Retry all"))) return;
  const params = [];
  if (status) params.push(["status", status]);
  if (name) params.push(["name", name]);
  if (search) params.push(["search", search]);

  let retried = 0;
  let skipped = 0;
  let cursor = null;
  try {
    // Each call handles one bounded batch, so no single request keeps the server busy long.
    for (let call = 0; call < MAX_BULK_CALLS; call++) {
      const batch = cursor ? [...params, ["cursor", cursor]] : params;
      const result = await request("/retry", { method: "POST", params: batch });
      retried += result.retried;
      skipped += result.skipped;
      cursor = result.next_cursor;
      if (!cursor) break;
    }
    toast(`${retried} task${retried === 1 ? "" : "s"} queued again${skipped ? `, ${skipped} skipped` : ""}.`);
  } catch (error) {
    report(error);
  }
}

// ---------------------------------------------------------------- filters, pages, URL

function setFilters(changes) {
  Object.assign(state.filters, changes);
  state.cursors = [null];
  state.page = 0;
  syncFilterInputs();
  writeHash();
  loadTasks().catch(report);
  for (const card of $("counts").querySelectorAll("button.count")) {
    card.classList.toggle("active", card.dataset.status === state.filters.status);
  }
}

function syncFilterInputs() {
  const { status, name, search, order } = state.filters;
  if (name) rememberName(name);
  $("filter-status").value = status;
  $("filter-name").value = name;
  if ($("filter-search").value !== search) $("filter-search").value = search;
  $("filter-order").value = order;
  $("retry-all").disabled = Boolean(status) && !RETRYABLE.has(status);
}

function writeHash() {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(state.filters)) {
    if (value && !(key === "order" && value === "newest")) params.set(key, value);
  }
  if (state.selectedId) params.set("task", state.selectedId);
  const hash = params.toString();
  history.replaceState(null, "", hash ? `#${hash}` : location.pathname + location.search);
}

function readHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  const status = params.get("status") ?? "";
  state.filters = {
    status: COUNTED_STATUSES.includes(status) ? status : "",
    name: params.get("name") ?? "",
    search: params.get("search") ?? "",
    order: params.get("order") === "oldest" ? "oldest" : "newest",
  };
  return params.get("task");
}

function bindControls() {
  $("filters").addEventListener("submit", (event) => event.preventDefault());

  $("filter-status").addEventListener("change", (event) => setFilters({ status: event.target.value }));
  $("filter-name").addEventListener("change", (event) => setFilters({ name: event.target.value }));
  $("filter-order").addEventListener("change", (event) => setFilters({ order: event.target.value }));
  let searchTimer = null;
  $("filter-search").addEventListener("input", (event) => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => setFilters({ search: event.target.value.trim() }), 300);
  });
  $("retry-all").addEventListener("click", retryMatches);

  $("page-next").addEventListener("click", () => {
    if (!state.nextCursor) return;
    state.cursors[state.page + 1] = state.nextCursor;
    state.page += 1;
    loadTasks().catch(report);
  });
  $("page-previous").addEventListener("click", () => {
    if (state.page === 0) return;
    state.page -= 1;
    loadTasks().catch(report);
  });
  $("page-first").addEventListener("click", () => {
    state.page = 0;
    loadTasks().catch(report);
  });

  $("detail-close").addEventListener("click", closeTask);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !$("confirm").open && state.selectedId) closeTask();
  });
  for (const button of $("confirm").querySelectorAll("button")) {
    button.addEventListener("click", (event) => {
      event.preventDefault();
      $("confirm").close(button.value);
    });
  }
}

// ---------------------------------------------------------------- live updates

function reloadAll() {
  loadTasks().catch(report);
  loadOverview().catch(report);
  loadThroughput().catch(report);
  if (state.selectedId) loadDetail(state.selectedId).catch(report);
}

const pendingSummaries = new Map();
let flushTimer = null;

/** Apply summaries in batches, at most one per task each 100 ms. */
function queueSummary(task) {
  pendingSummaries.set(task.id, task);
  if (flushTimer !== null) return;
  flushTimer = setTimeout(() => {
    flushTimer = null;
    const tasks = [...pendingSummaries.values()];
    pendingSummaries.clear();
    let finished = false;
    for (const summary of tasks) {
      applySummary(summary);
      finished ||= summary.finished_at !== null;
    }
    scheduleOverview();
    if (finished) scheduleThroughput();
  }, 100);
}

function setConnection(connectionState, text) {
  const badge = $("connection");
  badge.dataset.state = connectionState;
  badge.textContent = text;
}

let source = null;
let reconnectingTimer = null;
let plannedReconnect = false;
let retryDelay = 1000;

function showReconnecting() {
  setConnection("reconnecting", "Reconnecting…");
}

function connect() {
  source = new EventSource(`${apiBase}/dashboard/events`);
  source.addEventListener("ready", (event) => {
    clearTimeout(reconnectingTimer);
    plannedReconnect = false;
    retryDelay = 1000;
    setConnection("live", "Live");
    if (!JSON.parse(event.data).resumed || !state.loadedOnce) reloadAll();
  });
  source.addEventListener("task", (event) => queueSummary(JSON.parse(event.data)));
  source.addEventListener("log", (event) => {
    const { task_id: taskId, entry } = JSON.parse(event.data);
    applyLog(taskId, entry);
  });
  source.addEventListener("resync", reloadAll);
  source.addEventListener("reconnect", () => {
    plannedReconnect = true;
  });
  source.addEventListener("error", () => {
    if (source.readyState === EventSource.CLOSED) {
      // The server refused the stream (an error status): the browser gives up, so retry here.
      showReconnecting();
      source.close();
      setTimeout(connect, retryDelay);
      retryDelay = Math.min(retryDelay * 2, 30000);
    } else if (plannedReconnect) {
      // The server ends each stream after a while and the browser resumes at once, so
      // "reconnecting" shows only if that takes long or fails.
      plannedReconnect = false;
      reconnectingTimer = setTimeout(showReconnecting, RECONNECTING_GRACE_MS);
    } else {
      showReconnecting();
    }
  });
}

function start() {
  const openId = readHash();
  bindControls();
  syncFilterInputs();
  connect();
  // Without a stream (a proxy that buffers it, say), the page still loads its data.
  setTimeout(() => { if (!state.loadedOnce) reloadAll(); }, READY_TIMEOUT_MS);
  setInterval(() => loadThroughput().catch(report), THROUGHPUT_REFRESH_MS);
  if (openId) openTask(openId);
}

start();
