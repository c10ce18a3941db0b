// shoal console: plain JavaScript, no libraries, no build step. It talks only to the server that serves
// it (its Content-Security-Policy says 'self'). Every data request goes through api(), which sends the
// API key the operator typed (kept in this tab's sessionStorage) and turns a 401 into a clear alert.
"use strict";

const KEY_STORE = "shoal-console-api-key";
const LIVE_INTERVAL_MS = 1500;
const HISTORY_POINTS = 120; // 3 minutes of live reads
const $ = (id) => document.getElementById(id);
const state = { info: null, history: [], chat: [], controller: null, authNeeded: false };

// ---------- API and authentication ----------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { Authorization: "Bearer " + key } : {};
}

async function api(path, options = {}) {
  const headers = { ...authHeaders(), ...(options.headers || {}) };
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    showAuthNeeded(await errorMessage(response));
    throw new ApiError(401, "401 Unauthorized");
  }
  if (!response.ok) throw new ApiError(response.status, `${response.status}: ${await errorMessage(response)}`);
  return response;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (e) {
    return response.statusText;
  }
}

function showAuthNeeded(message) {
  state.authNeeded = true;
  document.body.dataset.auth = "needed";
  showAlert(`401 Unauthorized: this server needs an API key. Enter it in "API key" above and press ` +
    `"Use key". (${message})`);
  $("api-key").focus();
}

function showAlert(text) {
  const alert = $("alert");
  alert.textContent = text;
  alert.hidden = false;
}

function clearAlert() {
  $("alert").hidden = true;
  $("alert").textContent = "";
}

function onKeySubmit(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
  $("api-key").value = "";
  $("api-key").placeholder = key ? "key set for this tab" : "only if the server has keys";
  state.authNeeded = false;
  document.body.dataset.auth = key ? "key" : "";
  clearAlert();
  start();
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORE);
  $("api-key").placeholder = "only if the server has keys";
  document.body.dataset.auth = "";
}

// ---------- tabs ----------

function selectTab(button) {
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    const selected = tab === button;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    $(tab.getAttribute("aria-controls")).hidden = !selected;
  }
  const panel = button.getAttribute("aria-controls");
  if (panel === "models") loadModels().catch(report);
  if (panel === "deployments") loadDeployments().catch(report);
}

function onTabKey(event) {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  const i = tabs.indexOf(event.target);
  const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[event.key];
  if (next === undefined) return;
  event.preventDefault();
  const tab = tabs[(next + tabs.length) % tabs.length];
  tab.focus();
  selectTab(tab);
}

function report(error) {
  if (!(error instanceof ApiError && error.status === 401)) showAlert(String(error.message || error));
}

// ---------- playground ----------

function chatBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.chat);
  const body = {
    model: $("model").value,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    top_p: Number($("top_p").value),
    max_tokens: Number($("max_tokens").value),
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if ($("ignore_eos").checked) body.ignore_eos = true;
  return body;
}

function addMessage(role, text) {
  const item = document.createElement("li");
  item.className = role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const content = document.createElement("span");
  content.className = "content";
  content.textContent = text;
  item.append(label, content);
  $("conversation").append(item);
  return item;
}

function setStat(id, text) { $(id).textContent = text; }

async function send(event) {
  event.preventDefault();
  const text = $("message").value.trim();
  if (!text || state.controller) return;
  clearAlert();
  state.chat.push({ role: "user", content: text });
  addMessage("user", text);
  $("message").value = "";
  const answer = addMessage("assistant", "");
  answer.dataset.chunks = "0";
  answer.dataset.state = "streaming";
  for (const id of ["stat-ttft", "stat-tps", "stat-prompt", "stat-completion", "stat-finish"]) setStat(id, "…");
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  const result = { text: "", chunks: 0, start: performance.now(), first: null, last: null, usage: null, finish: null };
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(chatBody()),
      signal: state.controller.signal,
    });
    await readStream(response, (chunk) => onChunk(chunk, answer, result));
    answer.dataset.state = "done";
  } catch (error) {
    if (error.name === "AbortError") {
      answer.dataset.state = "stopped";
      answer.classList.add("stopped");
      result.finish = "stopped";
    } else {
      answer.dataset.state = "failed";
      report(error);
    }
  } finally {
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
  if (result.text) state.chat.push({ role: "assistant", content: result.text });
  showAnswerStats(result);
}

// Server-sent events: "data: {json}" lines separated by blank lines, ending with "data: [DONE]".
async function readStream(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

function onChunk(chunk, answer, result) {
  if (chunk.error) throw new ApiError(chunk.error.code || 500, chunk.error.message);
  if (chunk.usage) result.usage = chunk.usage;
  for (const choice of chunk.choices || []) {
    const delta = (choice.delta && choice.delta.content) || "";
    if (choice.finish_reason) result.finish = choice.finish_reason;
    if (!delta) continue;
    const now = performance.now();
    if (result.first === null) {
      result.first = now;
      setStat("stat-ttft", `${(now - result.start).toFixed(0)} ms`);
    }
    result.last = now;
    result.text += delta;
    result.chunks += 1;
    answer.querySelector(".content").textContent = result.text;
    answer.dataset.chunks = String(result.chunks);
  }
}

function showAnswerStats(result) {
  const completion = result.usage ? result.usage.completion_tokens : result.chunks;
  const approx = result.usage ? "" : " (chunks)";
  setStat("stat-ttft", result.first === null ? "–" : `${(result.first - result.start).toFixed(0)} ms`);
  const seconds = result.first !== null && result.last > result.first ? (result.last - result.first) / 1000 : 0;
  setStat("stat-tps", seconds > 0 ? ((completion - 1) / seconds).toFixed(1) : "–");
  setStat("stat-prompt", result.usage ? String(result.usage.prompt_tokens) : "–");
  setStat("stat-completion", String(completion) + approx);
  setStat("stat-finish", result.finish || "–");
}

function stop() {
  if (state.controller) state.controller.abort();
}

function newChat() {
  stop();
  state.chat = [];
  $("conversation").replaceChildren();
}

// ---------- live view ----------

const fmt = {
  num: (v, d = 0) => (v === null || v === undefined ? "–" : Number(v).toFixed(d)),
  ms: (s) => (s === null || s === undefined ? "–" : (s * 1000).toFixed(1)),
  pct: (v) => (v === null || v === undefined ? "–" : (v * 100).toFixed(1) + " %"),
};

async function pollLive() {
  if (state.authNeeded) return;
  try {
    const live = await (await api(liveUrl())).json();
    showLive(live);
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) $("live-updated").textContent = "(not updating: " + error.message + ")";
  }
}

function liveUrl() {
  const model = $("model").value;
  return state.info && state.info.kind === "fleet" && model ? "/ui/api/live?model=" + encodeURIComponent(model) : "/ui/api/live";
}

function showLive(live) {
  const phase = live.phase || (live.ready ? "ready" : "not ready");
  $("phase").textContent = phase;
  $("phase").className = "badge " + phase.replace(" ", "-");
  $("live-phase").textContent = phase;
  $("live-running").textContent = fmt.num(live.running);
  $("live-waiting").textContent = fmt.num(live.waiting);
  const recent = live.recent || {};
  $("live-batch").textContent = fmt.num(recent.mean_batch_size, 1);
  $("live-kv").textContent = fmt.pct(live.kv_cache_usage);
  $("live-tps-in").textContent = fmt.num(recent.prompt_tokens_per_s, 1);
  $("live-tps-out").textContent = fmt.num(recent.output_tokens_per_s, 1);
  $("live-requests").textContent = fmt.num(live.totals.requests);
  $("live-errors").textContent = fmt.num(live.rates.errors_per_s, 2);
  $("live-error-ratio").textContent = fmt.pct(live.rates.error_ratio);
  $("live-timeouts").textContent = fmt.num(live.rates.timeouts_per_s, 2);
  for (const kind of ["ttft", "tpot"]) {
    for (const p of ["p50", "p95", "p99"]) $(`${kind}-${p}`).textContent = fmt.ms((recent[kind + "_s"] || {})[p]);
  }
  $("latency-caption").textContent = `Latency over the last ${Math.round((recent.window_s || 300) / 60)} minutes (${recent.choices || 0} answers)`;
  $("live-updated").textContent = "Last update " + new Date(live.time * 1000).toLocaleTimeString();
  state.history.push({
    running: live.running, waiting: live.waiting, tps: recent.output_tokens_per_s || 0,
    kv: live.kv_cache_usage, ttft: ((recent.ttft_s || {}).p95 || 0) * 1000,
  });
  if (state.history.length > HISTORY_POINTS) state.history.shift();
  drawCharts();
}

function drawCharts() {
  const h = state.history;
  const column = (key) => h.map((p) => p[key]);
  drawSpark($("chart-requests"), [column("running"), column("waiting")]);
  drawSpark($("chart-tps"), [column("tps")]);
  drawSpark($("chart-kv"), [column("kv")], 1);
  drawSpark($("chart-ttft"), [column("ttft")]);
}

// A line chart on a canvas: each series scaled to the largest value (or `max`), the newest point right.
function drawSpark(canvas, series, max) {
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  const top = max || Math.max(1e-9, ...series.flat());
  ctx.fillStyle = "#57606a";
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillText(top < 1e-6 ? "0" : top < 10 ? top.toPrecision(2) : top.toFixed(0), 4, 12);
  series.forEach((values, i) => {
    ctx.beginPath();
    ctx.setLineDash(i ? [4, 3] : []);
    ctx.strokeStyle = i ? "#bf8700" : "#0969da";
    ctx.lineWidth = 2;
    values.forEach((v, j) => {
      const x = width - (values.length - 1 - j) * (width / (HISTORY_POINTS - 1));
      const y = height - 2 - (v / top) * (height - 16);
      if (j) ctx.lineTo(x, y); else ctx.moveTo(x, y);
    });
    ctx.stroke();
  });
}

// ---------- models ----------

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.append(td);
  return td;
}

function bytes(n) {
  if (!n) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

async function loadModels() {
  const body = await (await api("/ui/api/models")).json();
  const tbody = $("models-table").querySelector("tbody");
  tbody.replaceChildren();
  for (const m of body.models) {
    const row = document.createElement("tr");
    const name = document.createElement("th");
    name.scope = "row";
    name.textContent = m.id;
    row.append(name);
    cell(row, m.state);
    cell(row, [m.dtype, m.quantization].filter(Boolean).join(" / ") || "–");
    cell(row, bytes(m.memory_bytes || m.resident_memory_bytes));
    cell(row, m.keep_alive_left_s === null || m.keep_alive_left_s === undefined ? "–" : `${m.keep_alive_left_s.toFixed(0)} s`);
    const actions = cell(row, "");
    if (body.admin) {
      actions.append(adminButton("Load", m.id, "load", m.state !== "unloaded"));
      actions.append(adminButton("Unload", m.id, "unload", m.state !== "loaded"));
    }
    if (m.quant_eval) {
      const show = document.createElement("button");
      show.textContent = "Quantization results";
      show.addEventListener("click", () => showQuantEval(m.id).catch(report));
      actions.append(show);
    }
    tbody.append(row);
  }
}

function adminButton(label, model, action, disabled) {
  const button = document.createElement("button");
  button.textContent = label;
  button.disabled = disabled;
  button.addEventListener("click", async () => {
    button.disabled = true;
    button.textContent = label + "ing…";
    try {
      await api(`/v1/admin/models/${encodeURIComponent(model)}/${action}`, { method: "POST" });
    } catch (error) {
      report(error);
    }
    await loadModels().catch(report);
  });
  return button;
}

async function showQuantEval(model) {
  const base = `/ui/api/models/${encodeURIComponent(model)}/quant_eval`;
  const result = await (await api(base + ".json")).json();
  const box = $("quant-eval");
  box.replaceChildren();
  const heading = document.createElement("h3");
  heading.textContent = `shoal quant eval: ${model}`;
  box.append(heading, quantTable(result.rows || []));
  for (const s of result.skipped || []) {
    const p = document.createElement("p");
    p.textContent = "skipped: " + JSON.stringify(s);
    box.append(p);
  }
  try {
    const blob = await (await api(base + ".png")).blob();
    const img = document.createElement("img");
    img.className = "plot";
    img.alt = "Perplexity ratio against linear-weight memory ratio, one point per method";
    img.src = URL.createObjectURL(blob);
    box.append(img);
  } catch (error) {
    if (error.status !== 404) report(error);
  }
}

function quantTable(rows) {
  const table = document.createElement("table");
  const columns = [...new Set(rows.flatMap((r) => Object.keys(r)))];
  const head = table.createTHead().insertRow();
  for (const c of columns) {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = c;
    head.append(th);
  }
  const tbody = table.createTBody();
  for (const r of rows) {
    const row = tbody.insertRow();
    for (const c of columns) {
      const v = r[c];
      cell(row, typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toPrecision(4)) : v === null || v === undefined ? "–" : String(v));
    }
  }
  return table;
}

// ---------- deployments ----------

async function loadDeployments() {
  const box = $("deployments-body");
  if (!state.info || !state.info.gateway) {
    box.innerHTML = "<p>No gateway configured. Start the server with <code>shoal serve --gateway-url URL</code> to see its backends, canaries and shadows here.</p>";
    return;
  }
  const body = await (await api("/ui/api/deployments")).json();
  box.replaceChildren();
  const p = document.createElement("p");
  p.textContent = "Gateway: " + body.gateway;
  box.append(p, objectTable("Backends", body.backends || [],
    ["url", "healthy", "saturated", "waiting", "kv_cache_usage", "in_flight", "last_error", "last_probe_age_s"]));
  for (const [name, model] of Object.entries(body.models || {})) {
    const h = document.createElement("h3");
    h.textContent = `${name} (${model.routing})`;
    box.append(h);
    box.append(objectTable("Weights", Object.entries(model.weights || {}).map(([version, weight]) => ({ version, weight })), ["version", "weight"]));
    if (model.canary) {
      const c = model.canary;
      box.append(objectTable(`Canary: ${c.state}, step ${c.step} of ${(c.steps || []).length}`,
        [{ side: "canary", ...c.canary }, { side: "stable", ...c.stable }], ["side", "requests", "error_rate", "p95_s"]));
      box.append(objectTable("Canary gates", [c.gates], Object.keys(c.gates || {})));
    }
    if (model.shadow) box.append(objectTable("Shadow agreement", [model.shadow], Object.keys(model.shadow)));
  }
}

function objectTable(caption, rows, columns) {
  const table = quantTable(rows.map((r) => Object.fromEntries(columns.map((c) => [c, r[c]]))));
  table.createCaption().textContent = caption;
  return table;
}

// ---------- start ----------

async function start() {
  try {
    state.info = await (await api("/ui/api/info")).json();
  } catch (error) {
    report(error);
    return;
  }
  $("server-model").textContent = state.info.models.join(", ");
  $("server-version").textContent = "shoal " + state.info.version;
  const select = $("model");
  const chosen = select.value;
  select.replaceChildren(...state.info.models.map((m) => new Option(m, m, false, m === chosen)));
  if (state.info.max_model_len) $("max_tokens").max = state.info.max_model_len;
  pollLive();
}

function init() {
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", onTabKey);
  }
  $("key-form").addEventListener("submit", onKeySubmit);
  $("forget-key").addEventListener("click", forgetKey);
  $("chat-form").addEventListener("submit", send);
  $("message").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("chat-form").requestSubmit();
  });
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", newChat);
  if (sessionStorage.getItem(KEY_STORE)) $("api-key").placeholder = "key set for this tab";
  setInterval(pollLive, LIVE_INTERVAL_MS);
  start();
}

init();
