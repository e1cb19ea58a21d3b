// Order-tracking demo on the official supabase-js client, served by Tidings at /demo/orders.
//
// Live updates come over the WebSocket: Postgres Changes on public.orders when the server offers
// them (GET /api/config), broadcast on the channel `order:<id>` always (the buttons below publish
// there through REST). While the WebSocket is unavailable, or its heartbeat round trip is poor,
// the page long-polls the channel's history (GET /api/channels/order:<id>/messages) and goes back
// to the WebSocket alone when it is healthy again. Every broadcast carries meta.seq, so messages
// seen through both paths are applied once and in order.
//
// Postgres Changes recover the same way (Tidings' change log): the channel config carries
// `postgres_changes_options.resume`, which supabase-js sends with every join as it is, and the
// page keeps the position of the last change in it (realtime-js passes it to the callback as its
// second argument). A rejoin after a cut therefore gets every update it missed before live ones,
// and the `system` message after them says `recovered`. While polling, the page asks
// GET /api/changes from the same position.
import { createClient } from "@supabase/supabase-js";

const STATUSES = ["pending", "confirmed", "preparing", "shipped", "delivered"];
const HEARTBEAT_MS = 5000; // supabase-js reports the round trip of every heartbeat
const POLL_TIMEOUT_S = 10; // long-poll: the server answers as soon as a message arrives
const QUALITY_SAMPLES = 5;
const LOG_LINES = 12;
const CONNECT_GRACE_MS = 4000;

const params = new URLSearchParams(location.search);
const orderId = (params.get("order") || "1001").replace(/[^\w-]/g, "") || "1001";
const topic = `order:${orderId}`;
const apikey = params.get("apikey") || "tidings-demo"; // any key works on a server without JWT_SECRET

const state = {
  status: null,
  seq: 0, // highest broadcast sequence number applied
  connecting: true, // until the first subscribe outcome (or CONNECT_GRACE_MS)
  subscribed: false,
  latencies: [],
  polling: false,
  pollAbort: null,
  postgres: false,
  position: "", // the last Postgres change applied (positions compare as strings)
  recovery: "", // what the last rejoin said: "recovered", or why not
  note: "",
};

// Sent with every join of the channel (supabase-js keeps a reference to it): the rejoin after a
// cut resumes after `since`.
const resume = {};

const $ = (id) => document.getElementById(id);

// -- rendering ------------------------------------------------------------------------------

function quality() {
  if (!state.subscribed) return "disconnected";
  if (!state.latencies.length) return "measuring";
  const avg = state.latencies.reduce((a, b) => a + b, 0) / state.latencies.length;
  if (avg < 100) return "excellent";
  if (avg < 300) return "good";
  return "poor";
}

function mode() {
  if (state.connecting) return "connecting";
  if (!state.subscribed) return "polling";
  return state.polling ? "websocket+polling" : "websocket";
}

function render() {
  const q = quality();
  const m = mode();
  const statusEl = $("status");
  statusEl.textContent = state.status || "unknown";
  statusEl.dataset.status = state.status || "";
  statusEl.dataset.seq = String(state.seq);
  const at = STATUSES.indexOf(state.status);
  document.querySelectorAll("#steps li").forEach((li, i) => {
    li.className = i < at ? "done" : i === at ? "current" : "";
  });
  const transport = $("transport");
  transport.dataset.mode = m;
  const live = state.postgres ? "Postgres Changes + broadcast" : "broadcast";
  transport.textContent =
    m === "connecting"
      ? "connecting…"
      : m === "websocket"
      ? `WebSocket (${live})`
      : m === "websocket+polling"
        ? `WebSocket (${live}) + HTTP polling`
        : "HTTP polling (WebSocket unavailable)";
  const qualityEl = $("quality");
  qualityEl.dataset.quality = q;
  const last = state.latencies[state.latencies.length - 1];
  qualityEl.textContent = last === undefined ? q : `${q} · ${Math.round(last)} ms`;
  const banner = $("banner");
  banner.hidden = m === "websocket" || m === "connecting";
  banner.textContent =
    m === "polling"
      ? "Live connection lost: following the order by polling until it is back."
      : "Connection quality degraded: polling as well.";
  $("note").textContent = state.note;
  const recovery = $("recovery");
  recovery.hidden = !state.recovery;
  recovery.dataset.recovery = state.recovery.startsWith("recovered") ? "recovered" : "incomplete";
  recovery.textContent = state.recovery;
}

function log(text, source) {
  const li = document.createElement("li");
  li.dataset.source = source;
  const time = document.createElement("time");
  time.textContent = new Date().toLocaleTimeString();
  li.append(time, ` ${text} `);
  const tag = document.createElement("span");
  tag.className = `tag ${source}`;
  tag.textContent = source;
  li.append(tag);
  const list = $("log");
  list.prepend(li);
  while (list.children.length > LOG_LINES) list.lastChild.remove();
}

// -- updates from any path ------------------------------------------------------------------

function apply(payload, meta, source) {
  const seq = meta && typeof meta.seq === "number" ? meta.seq : null;
  if (seq !== null) {
    if (seq <= state.seq) return; // already applied through the other path
    state.seq = seq;
  }
  const status = payload && payload.status;
  if (typeof status !== "string") return;
  const changed = status !== state.status;
  state.status = status;
  if (source !== "history" || changed) log(`status: ${status}`, source);
  render();
}

async function history(sinceSeq, timeout, signal) {
  const url =
    `/api/channels/${encodeURIComponent(topic)}/messages` +
    `?since_seq=${sinceSeq}&limit=100&timeout=${timeout}`;
  const r = await fetch(url, { headers: { apikey }, cache: "no-store", signal });
  if (!r.ok) throw new Error(`HTTP ${r.status}`);
  return r.json();
}

// -- Postgres Changes from any path (WebSocket, replay after a rejoin, polling) -----------------

function applyChange(data, position, source) {
  if (typeof position === "string" && position) {
    if (position <= state.position) return; // already applied through the other path
    state.position = position;
    resume.since = position;
  }
  apply({ status: data && data.status }, null, source);
}

async function changes(timeout, signal) {
  const query = new URLSearchParams({ schema: "public", table: "orders", event: "UPDATE", filter: `id=eq.${orderId}`, timeout: String(timeout) });
  if (state.position) query.set("since", state.position);
  if (resume.epoch) query.set("epoch", resume.epoch);
  const r = await fetch(`/api/changes?${query}`, { headers: { apikey }, cache: "no-store", signal });
  if (!r.ok) throw new Error(`HTTP ${r.status}`);
  return r.json();
}

async function pollChanges() {
  let failures = 0;
  while (state.polling && state.postgres) {
    const ctrl = new AbortController();
    state.changesAbort = ctrl;
    try {
      const body = await changes(state.position ? POLL_TIMEOUT_S : 0, ctrl.signal);
      if (body.epoch) resume.epoch = body.epoch;
      for (const c of body.changes) applyChange(c.data.record, c.data.position, "polling");
      if (!state.position && body.position) state.position = resume.since = body.position;
      else if (body.position > state.position && !body.more) state.position = resume.since = body.position;
      if (body.recovered === false) state.recovery = `not recovered: ${body.reason || "changes may be missing"}`;
      failures = 0;
    } catch (err) {
      if (ctrl.signal.aborted) break;
      failures += 1;
      await sleep(Math.min(10000, 500 * 2 ** failures) * (0.75 + Math.random() * 0.5));
    }
  }
  state.changesAbort = null;
}

function onSystem(payload) {
  // After a join with `resume`: the replay (if any) was delivered before this message.
  if (!payload || payload.extension !== "postgres_changes" || !("recovered" in payload)) return;
  if (payload.epoch) resume.epoch = payload.epoch;
  if (typeof payload.position === "string" && payload.position > state.position) {
    state.position = resume.since = payload.position;
  }
  if (state.joinedOnce) {
    state.recovery = payload.recovered
      ? `recovered (${payload.replayed} update${payload.replayed === 1 ? "" : "s"} replayed)`
      : "not recovered: some updates may be missing";
    log(state.recovery, "recovered");
  }
  state.joinedOnce = true;
  render();
}

async function catchUp(source) {
  try {
    const body = await history(state.seq, 0);
    for (const m of body.messages) if (m.event === "status") apply(m.payload, m.meta, source);
  } catch (err) {
    console.warn("history", err);
  }
}

// -- fallback to polling and back -----------------------------------------------------------

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function pollLoop() {
  let failures = 0;
  while (state.polling) {
    const ctrl = new AbortController();
    state.pollAbort = ctrl;
    try {
      const body = await history(state.seq, POLL_TIMEOUT_S, ctrl.signal);
      for (const m of body.messages) if (m.event === "status") apply(m.payload, m.meta, "polling");
      failures = 0;
    } catch (err) {
      if (ctrl.signal.aborted) break;
      failures += 1;
      // The HTTP path is down too: back off (jittered, capped) instead of hammering it.
      await sleep(Math.min(10000, 500 * 2 ** failures) * (0.75 + Math.random() * 0.5));
    }
  }
  state.pollAbort = null;
}

function reconsider() {
  const q = quality();
  const needPolling = !state.connecting && (!state.subscribed || q === "poor");
  if (needPolling && !state.polling) {
    state.polling = true;
    pollLoop();
    if (state.postgres) pollChanges();
  } else if (!needPolling && state.polling) {
    state.polling = false;
    if (state.pollAbort) state.pollAbort.abort();
    if (state.changesAbort) state.changesAbort.abort();
    catchUp("websocket"); // anything published between the last poll and the rejoin
  }
  render();
}

// -- the WebSocket ----------------------------------------------------------------------------

const supabase = createClient(location.origin, apikey, {
  auth: { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false },
  realtime: {
    heartbeatIntervalMs: HEARTBEAT_MS,
    // Jittered exponential backoff, 1 s doubling to 10 s: many pages never reconnect in lockstep.
    reconnectAfterMs: (tries) => Math.min(10000, 1000 * 2 ** Math.max(0, tries - 1)) * (0.75 + Math.random() * 0.5),
    heartbeatCallback: (status, latency) => {
      if (status === "ok" && typeof latency === "number") {
        state.latencies.push(latency);
        if (state.latencies.length > QUALITY_SAMPLES) state.latencies.shift();
      } else if (status === "timeout" || status === "disconnected" || status === "error") {
        state.latencies = [];
        if (status !== "timeout") state.subscribed = false;
      }
      reconsider();
    },
  },
});

let channel = null;

function subscribe(withPostgres) {
  state.postgres = withPostgres;
  const config = { broadcast: { self: true } };
  if (withPostgres) config.postgres_changes_options = { resume };
  const ch = supabase.channel(topic, { config });
  ch.on("broadcast", { event: "status" }, (msg) => apply(msg.payload, msg.meta, "websocket"));
  if (withPostgres) {
    ch.on(
      "postgres_changes",
      { event: "UPDATE", schema: "public", table: "orders", filter: `id=eq.${orderId}` },
      // The second argument: the change's position (Tidings, for a channel that resumes).
      (change, position) => applyChange(change.new, position, "postgres"),
    );
    ch.on("system", {}, onSystem);
  }
  ch.subscribe((status, err) => {
    if (ch !== channel) return;
    state.connecting = false;
    if (status === "SUBSCRIBED") {
      state.subscribed = true;
    } else {
      state.subscribed = false;
      const reason = err ? String(err.message || err) : "";
      if (withPostgres && /postgres|table|relation|publication|binding/i.test(reason)) {
        // No orders table (or no rights on it): keep following the order through broadcast.
        state.note = `Postgres Changes unavailable (${reason}); following broadcasts only.`;
        channel = null;
        supabase.removeChannel(ch).finally(() => subscribe(false));
      }
    }
    reconsider();
  });
  channel = ch;
}

// -- changing the order (REST broadcast) ------------------------------------------------------

async function setStatus(status) {
  const r = await fetch("/api/broadcast", {
    method: "POST",
    headers: { "Content-Type": "application/json", apikey, Authorization: `Bearer ${apikey}` },
    body: JSON.stringify({
      messages: [
        { topic, event: "status", payload: { order_id: orderId, status, updated_at: new Date().toISOString() } },
      ],
    }),
  });
  if (!r.ok) state.note = `Could not change the status: HTTP ${r.status}`;
  render();
}

function buildControls() {
  const box = $("controls");
  for (const status of STATUSES) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = status;
    b.dataset.status = status;
    b.addEventListener("click", () => setStatus(status));
    box.append(b);
  }
  $("next").addEventListener("click", () => {
    const at = STATUSES.indexOf(state.status);
    setStatus(STATUSES[(at + 1) % STATUSES.length]);
  });
  $("order").textContent = orderId;
  const steps = $("steps");
  for (const status of STATUSES) {
    const li = document.createElement("li");
    li.textContent = status;
    steps.append(li);
  }
}

async function main() {
  buildControls();
  render();
  let config = {};
  try {
    config = await (await fetch("/api/config", { cache: "no-store" })).json();
  } catch (err) {
    console.warn("config", err);
  }
  if (config.authRequired && !params.get("apikey")) {
    state.note = "This server requires a JWT: open this page with ?apikey=<token> (mint one with `tidings token`).";
  } else if (config.postgresChanges) {
    state.note = `Postgres Changes: UPDATE orders SET status = 'shipped' WHERE id = ${orderId}; shows here live.`;
  }
  await catchUp("history"); // the current status, from the channel's history
  subscribe(Boolean(config.postgresChanges));
  setTimeout(() => {
    state.connecting = false;
    reconsider();
  }, CONNECT_GRACE_MS);
  // supabase-js reports a dropped socket to channels, but check too: the fallback must not wait.
  setInterval(() => {
    if (state.subscribed && !supabase.realtime.isConnected()) {
      state.subscribed = false;
      reconsider();
    }
  }, 1000);
  window.tidingsDemo = { state, quality, mode, resume }; // for tests and curious developers
}

main();
