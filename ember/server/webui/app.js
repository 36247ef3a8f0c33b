// ember's chat page: conversations in localStorage, replies streamed from /v1/chat/completions.
import { escapeHtml, renderMarkdown } from "/ui/markdown.js";

const $ = (id) => document.getElementById(id);
const KEYS = { conversations: "ember.conversations", current: "ember.current", settings: "ember.settings",
               apiKey: "ember.apiKey", model: "ember.model" };
const SAMPLING = ["temperature", "top_p", "top_k", "max_tokens", "seed"];
const DEFAULTS = { temperature: 0.7, top_p: 0.9, top_k: 40, max_tokens: 512, seed: "", system: "" };

function load(key, fallback) {
  try { return JSON.parse(localStorage.getItem(key)) ?? fallback; } catch { return fallback; }
}
const save = (key, value) => localStorage.setItem(key, JSON.stringify(value));

// A reply still streaming when the page closed was saved half-done: keep what arrived, as stopped.
let conversations = load(KEYS.conversations, []);
for (const message of conversations.flatMap((c) => c.messages)) {
  if (message.pending) { delete message.pending; message.stats = { stopped: true }; }
}
let currentId = load(KEYS.current, null);
const settings = { ...DEFAULTS, ...load(KEYS.settings, {}) };
let controller = null; // the AbortController of the reply being streamed

const current = () => conversations.find((c) => c.id === currentId);
const persist = () => { save(KEYS.conversations, conversations); save(KEYS.current, currentId); };
const setStatus = (text) => { $("status").textContent = text; };

// --- API -------------------------------------------------------------------------------------------------
function askKey() {
  return new Promise((resolve) => {
    const dialog = $("key-dialog");
    $("api-key").value = "";
    dialog.addEventListener("close", () => {
      localStorage.setItem(KEYS.apiKey, $("api-key").value.trim());
      resolve();
    }, { once: true });
    dialog.showModal();
  });
}

async function api(path, options = {}) {
  for (let attempt = 0; ; attempt++) {
    const key = localStorage.getItem(KEYS.apiKey);
    const headers = { ...(options.headers || {}), ...(key ? { Authorization: `Bearer ${key}` } : {}) };
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401 || attempt >= 3) return response;
    await askKey();
  }
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error?.message || body.error || JSON.stringify(body);
  } catch { return `HTTP ${response.status}`; }
}

// --- models ----------------------------------------------------------------------------------------------
async function loadModels() {
  const response = await api("/v1/models");
  if (!response.ok) { setStatus(`could not list models: ${await errorText(response)}`); return; }
  const select = $("model");
  select.replaceChildren();
  for (const card of (await response.json()).data) {
    const option = document.createElement("option");
    option.value = card.id;
    option.textContent = card.meta?.loaded === false ? card.id : `${card.id} (loaded)`;
    select.append(option);
  }
  const wanted = current()?.model || load(KEYS.model, null);
  if (wanted && [...select.options].some((o) => o.value === wanted)) select.value = wanted;
}

// --- rendering -------------------------------------------------------------------------------------------
function renderList() {
  const list = $("conversations");
  list.replaceChildren();
  for (const conv of [...conversations].sort((a, b) => b.updated - a.updated)) {
    const item = document.createElement("li");
    item.classList.toggle("active", conv.id === currentId);
    const title = document.createElement("button");
    title.className = "title";
    title.textContent = conv.title || "New chat";
    title.title = title.textContent;
    title.addEventListener("click", () => select(conv.id));
    const remove = document.createElement("button");
    remove.className = "delete";
    remove.textContent = "×";
    remove.setAttribute("aria-label", "Delete conversation");
    remove.addEventListener("click", () => removeConversation(conv.id));
    item.append(title, remove);
    list.append(item);
  }
}

function statsText(stats) {
  if (!stats) return "";
  const parts = [];
  if (stats.ttft_ms != null) parts.push(`TTFT ${Math.round(stats.ttft_ms)} ms`);
  if (stats.tokens != null) parts.push(`${stats.tokens} tokens`);
  if (stats.tokens_per_s != null) parts.push(`${stats.tokens_per_s.toFixed(1)} tok/s`);
  if (stats.stopped) parts.push("stopped");
  return parts.join(" · ");
}

function messageElement(message, index, isLast) {
  const box = document.createElement("div");
  box.className = `message ${message.role}${message.error ? " error" : ""}`;
  if (message.role === "user") {
    box.textContent = message.content;
    return box;
  }
  if (message.reasoning) {
    const details = document.createElement("details");
    details.className = "reasoning";
    details.innerHTML = `<summary>Reasoning</summary>${escapeHtml(message.reasoning)}`;
    box.append(details);
  }
  const content = document.createElement("div");
  content.className = "content";
  content.innerHTML = message.error ? escapeHtml(message.error) : renderMarkdown(message.content);
  box.append(content);
  if (!message.pending) {
    const meta = document.createElement("div");
    meta.className = "meta";
    const stats = document.createElement("span");
    stats.className = "stats";
    stats.textContent = [message.model, statsText(message.stats)].filter(Boolean).join(" · ");
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy";
    copy.textContent = "Copy";
    copy.addEventListener("click", () => copyText(message.content, copy));
    meta.append(stats, copy);
    if (isLast) {
      const again = document.createElement("button");
      again.type = "button";
      again.className = "regenerate";
      again.textContent = "Regenerate";
      again.addEventListener("click", () => regenerate(index));
      meta.append(again);
    }
    box.append(meta);
  }
  return box;
}

function renderMessages() {
  const area = $("messages");
  const messages = current()?.messages || [];
  area.replaceChildren(...messages.map((m, i) => messageElement(m, i, i === messages.length - 1)));
  area.scrollTop = area.scrollHeight;
}

let frame = 0;
function renderSoon() { // at most one re-render per animation frame while tokens stream in
  if (!frame) frame = requestAnimationFrame(() => { frame = 0; renderMessages(); });
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch { // no clipboard API outside secure contexts (http on another host): the old way
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1200);
}

// --- conversations ---------------------------------------------------------------------------------------
function newConversation() {
  const conv = { id: crypto.randomUUID?.() || String(Date.now()), title: "", model: $("model").value,
                 messages: [], updated: Date.now() };
  conversations.push(conv);
  currentId = conv.id;
  persist();
  renderList();
  renderMessages();
  $("input").focus();
  return conv;
}

function select(id) {
  if (controller) return;
  currentId = id;
  const conv = current();
  if (conv?.model && [...$("model").options].some((o) => o.value === conv.model)) $("model").value = conv.model;
  persist();
  renderList();
  renderMessages();
  document.body.classList.remove("show-sidebar");
}

function removeConversation(id) {
  if (controller && id === currentId) return;
  conversations = conversations.filter((c) => c.id !== id);
  if (currentId === id) currentId = conversations.at(-1)?.id ?? null;
  persist();
  renderList();
  renderMessages();
}

// --- chat ------------------------------------------------------------------------------------------------
function requestBody(conv) {
  const messages = conv.messages.filter((m) => !m.pending && !m.error)
    .map((m) => ({ role: m.role, content: m.content }));
  if (settings.system.trim()) messages.unshift({ role: "system", content: settings.system });
  const body = { model: conv.model, messages, stream: true, stream_options: { include_usage: true } };
  for (const name of SAMPLING) {
    if (settings[name] !== "" && settings[name] != null) body[name] = Number(settings[name]);
  }
  return body;
}

function setStreaming(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
}

async function reply(conv) {
  const answer = { role: "assistant", content: "", reasoning: "", model: conv.model, pending: true };
  const body = requestBody(conv);
  conv.messages.push(answer);
  renderMessages();
  setStreaming(true);
  controller = new AbortController();
  const started = performance.now();
  let first = null;
  let tokens = null;
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      signal: controller.signal });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) tokens = chunk.usage.completion_tokens;
          const delta = chunk.choices?.[0]?.delta || {};
          if (delta.content || delta.reasoning_content) first ??= performance.now();
          if (delta.reasoning_content) answer.reasoning += delta.reasoning_content;
          if (delta.content) answer.content += delta.content;
          renderSoon();
        }
      }
    }
  } catch (err) {
    if (err.name === "AbortError") answer.stopped = true;
    else answer.error = String(err.message || err);
  }
  const ended = performance.now();
  // Decode speed: the tokens after the first over the time after the first (the usage chunk counts them;
  // a stopped reply has none, so no speed is shown for it).
  answer.stats = {
    ttft_ms: first == null ? null : first - started,
    tokens,
    tokens_per_s: tokens > 1 && first != null && ended > first ? (tokens - 1) / ((ended - first) / 1000) : null,
    stopped: !!answer.stopped,
  };
  delete answer.pending;
  controller = null;
  setStreaming(false);
  conv.updated = Date.now();
  persist();
  renderList();
  renderMessages();
}

async function send() {
  const text = $("input").value;
  if (!text.trim() || controller) return;
  const conv = current() || newConversation();
  conv.model = $("model").value;
  if (!conv.title) conv.title = text.trim().slice(0, 60);
  conv.messages.push({ role: "user", content: text });
  conv.updated = Date.now();
  $("input").value = "";
  persist();
  renderList();
  await reply(conv);
}

async function regenerate(index) {
  const conv = current();
  if (!conv || controller) return;
  conv.messages.splice(index);
  conv.model = $("model").value;
  await reply(conv);
}

// --- settings --------------------------------------------------------------------------------------------
function bindSettings() {
  for (const name of [...SAMPLING, "system"]) {
    const field = $(name);
    field.value = settings[name];
    field.addEventListener("change", () => { settings[name] = field.value; save(KEYS.settings, settings); });
  }
  $("toggle-settings").addEventListener("click", () => {
    const panel = $("settings");
    panel.hidden = !panel.hidden;
    $("toggle-settings").setAttribute("aria-expanded", String(!panel.hidden));
  });
}

function bind() {
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", () => controller?.abort());
  $("new-chat").addEventListener("click", () => { if (!controller) newConversation(); });
  $("toggle-sidebar").addEventListener("click", () => document.body.classList.toggle("show-sidebar"));
  $("model").addEventListener("change", () => {
    save(KEYS.model, $("model").value);
    const conv = current();
    if (conv && !controller) { conv.model = $("model").value; persist(); }
  });
  bindSettings();
}

bind();
renderList();
renderMessages();
loadModels().then(() => { document.body.dataset.ready = "1"; });
