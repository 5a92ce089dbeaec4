// Blackbird web console: plain ES module, no build step, no third-party code.
// Everything it shows comes from the HTTP API of the server that serves it (same origin).
// Views: sessions (list, live messages, quota gauges, post) and the tenant dashboard (admins).
// It survives a restart of `blackbird serve`: polls retry, streams reconnect with a fresh token
// and resume after the last event id they saw.

const KEY = "blackbird.key";
const POLL_MS = 3000;
const RETRY_MS = [500, 1000, 2000, 4000];
const KNOWN_CHANNELS = ["chat", "progress", "notification"];
const KEEP_MESSAGES = 1000; // shown per session; older ones leave the page
const KEEP_IDS = 10000; // event ids remembered to drop repeats

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

// ------------------------------------------------------------------ API

class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = body?.error?.code;
  }
}

function key() {
  return sessionStorage.getItem(KEY);
}

async function api(path, { method = "GET", body } = {}) {
  const headers = { Authorization: `Bearer ${key()}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

let online = null;
function setStatus(text, bad) {
  $("status").textContent = text;
  $("status").classList.toggle("bad", bad);
  $("status").classList.toggle("ok", text === "connected");
}

function setOnline(ok) {
  if (ok === online) return;
  online = ok;
  setStatus(ok ? "connected" : "server unreachable, retrying", !ok);
}

// A fetch that failed to reach the server (network error, or a 5xx while it restarts) marks the
// console offline; an ApiError from a live server is the caller's to show.
function reachable(error) {
  return error instanceof ApiError && error.status < 500;
}

// A poller runs fn every `every` ms while started, never two at once, and keeps going on errors.
function poller(fn, every = POLL_MS) {
  let timer = null;
  let running = false;
  async function tick() {
    if (!running) return;
    try {
      await fn();
      setOnline(true);
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) return signOut("the key was refused");
      if (!reachable(error)) setOnline(false);
    }
    if (running) timer = setTimeout(tick, every);
  }
  return {
    start() { if (!running) { running = true; tick(); } },
    stop() { running = false; clearTimeout(timer); },
    now() { clearTimeout(timer); tick(); },
  };
}

// ------------------------------------------------------------------ formatting

function shortId(id) {
  return id && id.length > 12 ? `${id.slice(0, 8)}…` : id || "";
}

function when(seconds) {
  if (!seconds) return "";
  return new Date(seconds * 1000).toLocaleTimeString();
}

function number(value) {
  if (value === null || value === undefined || !Number.isFinite(Number(value))) return "∞";
  const n = Number(value);
  if (Math.abs(n) >= 1e9) return `${(n / 1e9).toFixed(1)}G`;
  if (Math.abs(n) >= 1e6) return `${(n / 1e6).toFixed(1)}M`;
  if (Math.abs(n) >= 1e4) return `${(n / 1e3).toFixed(1)}k`;
  return String(Math.round(n * 100) / 100);
}

function percent(entry) {
  if (entry.usage_percentage !== undefined && entry.usage_percentage !== null) return Number(entry.usage_percentage);
  const limit = Number(entry.limit);
  return limit > 0 && Number.isFinite(limit) ? (100 * Number(entry.used || 0)) / limit : 0;
}

// A gauge: a labelled bar with role=meter, its fill coloured by how full it is.
function gauge(label, entry) {
  const pct = Math.max(0, Math.min(100, percent(entry)));
  const level = pct >= 90 ? "high" : pct >= 70 ? "mid" : "low";
  const text = `${number(entry.used)} / ${number(entry.limit)}`;
  return el("div", { class: "gauge", "data-quota": label },
    el("span", { class: "gauge-label", text: label }),
    el("span", {
      class: `gauge-track ${level}`, role: "meter", "aria-label": `${label} used`,
      "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": pct.toFixed(1),
      "aria-valuetext": `${text} (${pct.toFixed(1)}%)`,
    }, el("span", { class: "gauge-fill", style: `width:${pct}%` })),
    el("span", { class: "gauge-value", text }),
  );
}

// Quotas come as {tokens: {used, limit, remaining, usage_percentage, ...}, ...}; limit null: unlimited.
function quotaEntries(quotas) {
  return Object.entries(quotas || {}).filter(([, v]) => v && typeof v === "object" && "used" in v);
}

function listOf(data, name) {
  return Array.isArray(data?.[name]) ? data[name] : [];
}

// ------------------------------------------------------------------ sessions view

const state = { sessions: [], selected: null, stream: null, quotaPoll: null };

const sessionsPoll = poller(async () => {
  const data = await api("/v1/sessions");
  state.sessions = listOf(data, "sessions");
  renderSessions();
});

function renderSessions() {
  const filter = $("session-filter").value.trim().toLowerCase();
  const list = $("session-list");
  const shown = state.sessions.filter((s) =>
    !filter || [s.session_id, s.user_id, s.tier, s.status].some((v) => String(v || "").toLowerCase().includes(filter)));
  list.replaceChildren(...shown.map((s) => el("li", {},
    el("a", {
      href: `#/sessions/${encodeURIComponent(s.session_id)}`, class: "session-link",
      "aria-current": s.session_id === state.selected ? "true" : null, "data-session": s.session_id,
    },
    el("span", { class: "mono", text: shortId(s.session_id), title: s.session_id }),
    el("span", { text: s.user_id || "" }),
    el("span", { class: `pill ${s.status === "active" || s.is_active ? "ok" : "muted"}`, text: s.status || (s.is_active ? "active" : "") }),
    el("span", { class: "muted", text: s.tier || "" })))));
  $("sessions-empty").hidden = state.sessions.length > 0;
}

async function openSession(sessionId) {
  if (state.selected === sessionId) return;
  closeSession();
  state.selected = sessionId;
  renderSessions();
  $("session-title").textContent = `Session ${shortId(sessionId)}`;
  $("session-body").hidden = false;
  $("messages").replaceChildren();
  $("session-meta").replaceChildren();
  api(`/v1/sessions/${encodeURIComponent(sessionId)}`).then((s) => {
    if (state.selected !== sessionId || !s) return;
    const rows = [["id", s.session_id], ["user", s.user_id], ["tier", s.tier], ["status", s.status], ["tenant", s.tenant],
      ["created", when(s.created_at)], ["last activity", when(s.last_activity)]];
    $("session-meta").replaceChildren(...rows.filter(([, v]) => v).flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: String(v) })]));
  }).catch(() => {});
  state.quotaPoll = poller(async () => {
    const data = await api(`/v1/sessions/${encodeURIComponent(sessionId)}/quota`);
    if (state.selected === sessionId) $("session-quota").replaceChildren(...quotaEntries(data).map(([k, v]) => gauge(k, v)));
  });
  state.quotaPoll.start();
  state.stream = followSession(sessionId, {
    onEvent: (channel, event) => addMessage(channel, event),
    onGap: (data) => addGap(data),
    onState: (text) => { $("stream-state").textContent = text; },
  });
}

function closeSession() {
  state.stream?.close();
  state.quotaPoll?.stop();
  state.stream = state.quotaPoll = null;
  state.selected = null;
  $("session-title").textContent = "Pick a session";
  $("session-body").hidden = true;
}

function channelShown(channel) {
  const boxes = [...document.querySelectorAll("input[name=ch]")];
  const value = KNOWN_CHANNELS.includes(channel) ? channel : "other";
  return boxes.find((b) => b.value === value)?.checked ?? true;
}

function addMessage(channel, event) {
  const item = el("li", { class: `msg ch-${KNOWN_CHANNELS.includes(channel) ? channel : "other"}`, "data-id": event.id, "data-channel": channel },
    el("span", { class: "pill", text: channel }),
    el("time", { text: when(event.at), datetime: event.at ? new Date(event.at * 1000).toISOString() : null }),
    el("span", { class: "text", text: event.text ?? JSON.stringify(event) }));
  item.hidden = !channelShown(channel);
  const list = $("messages");
  list.append(item);
  while (list.children.length > KEEP_MESSAGES) list.firstElementChild.remove();
  item.scrollIntoView?.({ block: "nearest" });
}

// `event: gap`: the stream resumed after a point older than what the log still holds.
function addGap(data) {
  const { requested, first } = data?.metadata || data || {};
  const text = first !== undefined
    ? `Part of the history is gone: resumed after #${requested}, the log now starts at #${first}.`
    : "Part of the history is gone (gap).";
  $("messages").append(el("li", { class: "msg gap", role: "note", text }));
}

// Follows a session's messages over SSE. Before every (re)connect it asks for a fresh stream
// token (EventSource cannot send an Authorization header) and resumes after the last event it
// saw; events are deduplicated by their id, so a replay after a reconnect is harmless.
export function followSession(sessionId, { onEvent, onGap, onState }) {
  const seen = new Set();
  let lastId = null;
  let source = null;
  let closed = false;
  let attempt = 0;
  let timer = null;

  function handle(message) {
    if (message.lastEventId) lastId = message.lastEventId;
    let data;
    try { data = JSON.parse(message.data); } catch { return; }
    if (message.type === "gap" || data.channel === "gap") return onGap(data);
    const id = data.id ?? message.lastEventId;
    if (id && seen.has(id)) return;
    if (id) seen.add(id);
    if (seen.size > KEEP_IDS) seen.delete(seen.values().next().value);
    onEvent(data.channel || message.type, data);
  }

  async function connect() {
    if (closed) return;
    onState("connecting");
    let url;
    try {
      const issued = await api(`/v1/sessions/${encodeURIComponent(sessionId)}/stream-token`, { method: "POST", body: {} });
      url = new URL(issued.url || `/v1/sessions/${encodeURIComponent(sessionId)}/events`, location.href);
      url.searchParams.set("token", issued.token);
      setOnline(true);
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) return signOut("the key was refused");
      if (!reachable(error)) setOnline(false);
      return retry();
    }
    if (lastId) url.searchParams.set("after", lastId);
    url.searchParams.set("events", "message");  // every channel reaches onmessage (the channel is in the data)
    if (closed) return;
    source = new EventSource(url);
    source.onopen = () => { attempt = 0; onState("live"); };
    source.onmessage = handle;
    source.onerror = () => {
      // A fresh token for every reconnect: the old one may have expired, and a restarted server
      // may answer 401 to it, which would close the EventSource for good.
      source.close();
      source = null;
      retry();
    };
  }

  function retry() {
    if (closed) return;
    onState("reconnecting");
    timer = setTimeout(connect, RETRY_MS[Math.min(attempt++, RETRY_MS.length - 1)]);
  }

  connect();
  return {
    close() { closed = true; clearTimeout(timer); source?.close(); onState("closed"); },
  };
}

// ------------------------------------------------------------------ tenant dashboard

const dashboard = { events: null, alerts: new Set(), refusals: null };

const statsPoll = poller(async () => {
  try {
    const stats = await api("/v1/tenant/stats");
    $("dashboard-error").textContent = "";
    renderStats(stats || {});
  } catch (error) {
    if (error instanceof ApiError && error.status === 403) $("dashboard-error").textContent = "The dashboard is for admin and service keys.";
    throw error;
  }
}, 3000);

// GET /v1/tenant/stats: {active_sessions, total_sessions, total_users, refusals, alerts,
// sessions: [{session_id, user_id, tier, quotas}], users: [{user_id, sessions, resource_usage}],
// usage_per_minute: [{minute, records, amounts}]}.
function renderStats(stats) {
  const sessions = listOf(stats, "sessions");
  $("active-count").textContent = String(typeof stats.active_sessions === "number" ? stats.active_sessions : sessions.length);
  $("totals").replaceChildren(...[
    ["sessions", stats.total_sessions], ["users", stats.total_users],
    ["rate and quota denials", Object.values(stats.refusals || {}).reduce((a, b) => a + b, 0)], ["abuse alerts", stats.alerts],
  ].filter(([, v]) => v !== undefined).flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: number(v) })]));
  $("active-sessions").replaceChildren(...sessions.map((s) => el("tr", { "data-session": s.session_id },
    el("td", {}, el("a", { href: `#/sessions/${encodeURIComponent(s.session_id)}`, class: "mono", text: shortId(s.session_id), title: s.session_id })),
    el("td", { text: s.user_id || "" }),
    el("td", { text: s.tier || "" }),
    el("td", {}, el("div", { class: "gauges compact" }, ...quotaEntries(s.quotas).filter(([, v]) => v.limit !== null).map(([k, v]) => gauge(k, v)))))));
  // A user's quota use: what their active sessions used of what those sessions may use.
  const perUser = new Map();
  for (const s of sessions) {
    const mine = perUser.get(s.user_id) || {};
    for (const [kind, q] of quotaEntries(s.quotas)) {
      if (q.limit === null) continue;
      const sum = mine[kind] || { used: 0, limit: 0 };
      mine[kind] = { used: sum.used + Number(q.used), limit: sum.limit + Number(q.limit) };
    }
    perUser.set(s.user_id, mine);
  }
  const users = listOf(stats, "users");
  $("user-gauges").replaceChildren(...users.map((u) => {
    const kinds = Object.entries(perUser.get(u.user_id) || {});
    const totals = Object.entries(u.resource_usage || {}).map(([k, v]) => `${k} ${number(v)}`).join(", ");
    return el("div", { class: "user", "data-user": u.user_id },
      el("h4", { text: `${u.user_id} · ${u.active_sessions ?? 0}/${u.sessions ?? 0} sessions active` }),
      ...kinds.map(([k, v]) => gauge(k, v)),
      el("p", { class: "hint", text: totals ? `all time: ${totals}` : "no usage yet" }));
  }));
  $("usage-chart").replaceChildren(chart(listOf(stats, "usage_per_minute")));
  noteRefusals(stats.refusals || {});
}

// Denials come live on the tenant stream (one entry each); the stats keep their counts.
function noteRefusals(refusals) {
  dashboard.refusals = { ...refusals };
}

// An inline SVG line chart: one line per resource type over the buckets' times.
function chart(points) {
  const NS = "http://www.w3.org/2000/svg";
  const svg = (tag, attrs = {}) => {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    return node;
  };
  const rows = points.map((p) => ({
    at: Number(p.minute ?? p.at),
    values: p.amounts || {},
  })).filter((r) => Number.isFinite(r.at)).sort((a, b) => a.at - b.at);
  if (!rows.some((r) => Object.keys(r.values).length)) return el("p", { class: "hint", text: "No usage in the last hour." });
  const series = [...new Set(rows.flatMap((r) => Object.keys(r.values)))];
  const W = 480, H = 180, L = 44, B = 22;
  const t0 = rows[0].at, t1 = Math.max(rows[rows.length - 1].at, t0 + 1);
  const max = Math.max(1, ...rows.flatMap((r) => Object.values(r.values).map(Number)));
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - 8);
  const y = (v) => H - B - (v / max) * (H - B - 8);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `Usage over time: ${series.join(", ")}` });
  root.append(svg("line", { x1: L, y1: H - B, x2: W - 4, y2: H - B, class: "axis" }));
  root.append(svg("line", { x1: L, y1: 4, x2: L, y2: H - B, class: "axis" }));
  const top = svg("text", { x: L - 4, y: 12, "text-anchor": "end", class: "tick" }); top.textContent = number(max); root.append(top);
  const start = svg("text", { x: L, y: H - 6, class: "tick" }); start.textContent = when(t0); root.append(start);
  const end = svg("text", { x: W - 4, y: H - 6, "text-anchor": "end", class: "tick" }); end.textContent = when(t1); root.append(end);
  const legend = el("ul", { class: "legend" });
  series.forEach((name, i) => {
    const d = rows.map((r, j) => `${j ? "L" : "M"}${x(r.at).toFixed(1)},${y(Number(r.values[name] ?? 0)).toFixed(1)}`).join(" ");
    root.append(svg("path", { d, class: `series s${i % 6}` }));
    legend.append(el("li", { class: `s${i % 6}`, text: name }));
  });
  return el("figure", {}, root, legend);
}

// The admin stream (GET /v1/events) needs the Authorization header, which EventSource cannot
// send: it is read with fetch and parsed here, resuming with Last-Event-ID after a drop.
function followTenant({ onEvent, onState }) {
  let closed = false;
  let lastId = null;
  let controller = null;
  let attempt = 0;

  async function run() {
    while (!closed) {
      onState("connecting");
      controller = new AbortController();
      try {
        const headers = { Authorization: `Bearer ${key()}`, Accept: "text/event-stream" };
        if (lastId) headers["Last-Event-ID"] = lastId;
        const response = await fetch("/v1/events?channels=alert,denial", { headers, signal: controller.signal });
        if (response.status === 401) return signOut("the key was refused");
        if (response.status === 403) { onState("admins only"); return; }
        if (response.status === 404) { onState("not served"); return; }
        if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
        onState("live");
        setOnline(true);
        attempt = 0;
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value.replace(/\r\n?/g, "\n");
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            const event = { type: "message", data: [], id: null };
            for (const line of block.split("\n")) {
              if (!line || line.startsWith(":")) continue;
              const colon = line.indexOf(":");
              const field = colon < 0 ? line : line.slice(0, colon);
              const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
              if (field === "event") event.type = val;
              else if (field === "data") event.data.push(val);
              else if (field === "id") event.id = val;
            }
            if (event.id) lastId = event.id;
            if (!event.data.length) continue;
            let data;
            try { data = JSON.parse(event.data.join("\n")); } catch { data = { text: event.data.join("\n") }; }
            onEvent(event.type, data);
          }
        }
      } catch (error) {
        if (closed) return;
        setOnline(false);
      }
      if (closed) return;
      onState("reconnecting");
      await new Promise((r) => setTimeout(r, RETRY_MS[Math.min(attempt++, RETRY_MS.length - 1)]));
    }
  }
  run();
  return { close() { closed = true; controller?.abort(); onState("closed"); } };
}

// An alert of GET /v1/events: {id, session_id, user_id, channel: "alert", text: its detail,
// metadata: {kind, value, threshold}, at}; gap events say the history was cut.
function onTenantEvent(type, data) {
  if (type === "gap") return addAlert("gap", { text: `alerts before #${data.first} are gone`, metadata: { kind: "gap" } });
  if (type !== "alert" && type !== "denial") return;
  if (data.id && dashboard.alerts.has(data.id)) return;
  if (data.id) dashboard.alerts.add(data.id);
  if (type === "denial") return addAlert("denial", { ...data, metadata: { kind: data.metadata?.type || "denial" } });
  addAlert("alert", data);
}

function addAlert(type, data) {
  const what = data.metadata?.kind || type;
  const detail = data.text || "";
  const who = [data.user_id && `user ${data.user_id}`, data.session_id && `session ${shortId(data.session_id)}`].filter(Boolean).join(", ");
  const item = el("li", { class: `alert ${type === "alert" ? "abuse" : "denial"}`, "data-type": type, "data-kind": what },
    el("time", { text: when(data.at) || new Date().toLocaleTimeString() }),
    el("strong", { text: what }),
    el("span", { text: [detail, who].filter(Boolean).join(" — ") }));
  $("alerts").prepend(item);
  while ($("alerts").children.length > 200) $("alerts").lastElementChild.remove();
  $("alerts-empty").hidden = true;
}

// ------------------------------------------------------------------ routing and sign-in

function show(view) {
  for (const id of ["login", "sessions", "dashboard"]) $(id).hidden = id !== view;
  for (const link of document.querySelectorAll("nav a[data-view]")) {
    link.setAttribute("aria-current", link.dataset.view === view ? "page" : "false");
  }
}

function route() {
  if (!key()) {
    sessionsPoll.stop(); statsPoll.stop(); closeSession();
    dashboard.events?.close(); dashboard.events = null;
    show("login");
    $("forget-key").hidden = true;
    $("api-key").focus();
    return;
  }
  $("forget-key").hidden = false;
  const [, view = "sessions", id] = location.hash.split("/");
  if (view === "dashboard") {
    show("dashboard");
    statsPoll.start();
    dashboard.events ??= followTenant({
      onEvent: onTenantEvent,
      onState: (text) => { $("events-state").textContent = text; },
    });
  } else {
    show("sessions");
    statsPoll.stop();
    dashboard.events?.close(); dashboard.events = null;
    sessionsPoll.start();
    if (id) openSession(decodeURIComponent(id));
    else closeSession();
  }
}

function signOut(reason) {
  sessionStorage.removeItem(KEY);
  $("login-error").textContent = reason || "";
  online = null;
  setStatus("signed out", false);
  route();
}

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const value = $("api-key").value.trim();
  if (!value) return;
  sessionStorage.setItem(KEY, value);
  $("api-key").value = "";
  $("login-error").textContent = "";
  if (!location.hash) location.hash = "#/sessions";
  route();
});

$("forget-key").addEventListener("click", () => signOut(""));
$("session-filter").addEventListener("input", renderSessions);
for (const box of document.querySelectorAll("input[name=ch]")) {
  box.addEventListener("change", () => {
    for (const item of $("messages").children) {
      if (item.dataset.channel) item.hidden = !channelShown(item.dataset.channel);
    }
  });
}

$("post-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("post-text").value;
  if (!state.selected || !text) return;
  $("post-error").textContent = "";
  try {
    await api(`/v1/sessions/${encodeURIComponent(state.selected)}/messages`, {
      method: "POST", body: { channel: $("post-channel").value, text },
    });
    $("post-text").value = "";
  } catch (error) {
    $("post-error").textContent = error.message;
  }
});

window.addEventListener("hashchange", route);
route();
