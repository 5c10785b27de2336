// The chat page: sends the conversation to POST /v1/chat/completions with
// stream and chatpipe_stages on, parses the SSE reply from fetch()'s
// ReadableStream, and renders the answer as Markdown while it arrives.
"use strict";

const API_KEY_STORAGE = "chatpipe.apiKey";
const MAX_RESUMES = 3; // reconnects to /v1/jobs/{id}/events after a dropped stream
const NEAR_BOTTOM_PX = 48; // follow new text only when the reader is this close to the end

const elements = {
  messages: document.getElementById("messages"),
  emptyHint: document.getElementById("empty-hint"),
  composer: document.getElementById("composer"),
  input: document.getElementById("input"),
  send: document.getElementById("send"),
  stop: document.getElementById("stop"),
  apiKey: document.getElementById("api-key"),
  newChat: document.getElementById("new-chat"),
};

const conversation = []; // {role, content} of every finished turn, sent with each request
let active = null; // the answer being streamed: {controller, jobId, isStopped}
let isComposing = false; // an IME composition is open in the textarea

// ----- requests -----

function authHeaders() {
  const key = elements.apiKey.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function errorMessage(response) {
  let message = `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (err) {
    // the body was not JSON; keep the status line
  }
  const retryAfter = response.headers.get("Retry-After");
  return retryAfter ? `${message} (${t("retryAfter", { s: retryAfter })})` : message;
}

// Yield {id, data} for each SSE event of a fetch() response body; comment
// lines (keep-alives) are skipped.
async function* readEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let boundary;
    while ((boundary = buffer.search(/\r?\n\r?\n/)) !== -1) {
      const block = buffer.slice(0, boundary);
      buffer = buffer.slice(boundary).replace(/^\r?\n\r?\n/, "");
      const event = parseEventBlock(block);
      if (event) yield event;
    }
  }
}

function parseEventBlock(block) {
  let id = null;
  const data = [];
  for (const line of block.split(/\r?\n/)) {
    if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    else if (line.startsWith("id:")) id = line.slice(3).trim();
  }
  return data.length ? { id, data: data.join("\n") } : null;
}

// ----- one answer -----

function createAnswer() {
  const answer = {
    text: "",
    lastEventId: "0",
    isDone: false,
    startedAt: performance.now(),
    firstTokenAt: null,
    view: appendMessage("assistant"),
  };
  answer.view.timeline = document.createElement("ol");
  answer.view.timeline.className = "timeline";
  answer.view.meta = document.createElement("div");
  answer.view.meta.className = "meta";
  answer.view.root.append(answer.view.timeline, answer.view.meta);
  answer.view.root.classList.add("streaming");
  return answer;
}

// Apply one chunk (or error object) of the stream to the answer.
function applyChunk(answer, payload) {
  if (payload.error) throw new Error(payload.error.message || payload.error.code || "error");
  if (payload.chatpipe) {
    applyPipelineEvent(answer, payload.chatpipe);
    return;
  }
  for (const choice of payload.choices || []) {
    const content = choice.delta && choice.delta.content;
    if (content) {
      answer.firstTokenAt = answer.firstTokenAt ?? performance.now();
      answer.text += content;
      scheduleRender(answer);
    }
  }
}

function applyPipelineEvent(answer, event) {
  if (event.type === "stage" || event.type === "tool") {
    const item = document.createElement("li");
    if (event.type === "stage") {
      item.textContent = `${stageName(event.stage)} ${formatMs(event.duration_ms)}`;
    } else {
      item.textContent = `${t("tool")}: ${event.name}`;
      item.classList.add("tool");
    }
    answer.view.timeline.appendChild(item);
  } else if (event.type === "finish") {
    answer.view.meta.textContent = describeFinish(answer, event);
  }
}

function formatMs(ms) {
  if (typeof ms !== "number") return "";
  return ms >= 1000 ? `${(ms / 1000).toFixed(1)} s` : `${ms.toFixed(ms < 10 ? 1 : 0)} ms`;
}

// One line: route · model · TTFT · tokens/s · tokens. Tokens/s comes from the
// server's time per output token when present, else from this page's clock.
function describeFinish(answer, event) {
  const metrics = event.metrics || {};
  const usage = event.usage || {};
  const parts = [];
  if (event.route) parts.push(`${t("route")} ${event.route}`);
  if (event.model) parts.push(`${t("model")} ${event.model}`);
  // job_ttft_s counts from job creation; the engine's ttft_s leaves out the stages before it.
  const ttftSeconds = metrics.job_ttft_s ?? metrics.ttft_s;
  if (typeof ttftSeconds === "number") parts.push(`${t("ttft")} ${formatMs(ttftSeconds * 1000)}`);

  let tokensPerSecond = null;
  if (typeof metrics.tpot_s === "number" && metrics.tpot_s > 0) {
    tokensPerSecond = 1 / metrics.tpot_s;
  } else if (usage.completion_tokens > 1 && answer.firstTokenAt !== null) {
    const decodeSeconds = (performance.now() - answer.firstTokenAt) / 1000;
    if (decodeSeconds > 0) tokensPerSecond = (usage.completion_tokens - 1) / decodeSeconds;
  }
  if (tokensPerSecond !== null) parts.push(`${tokensPerSecond.toFixed(1)} ${t("tokensPerSecond")}`);
  if (typeof usage.completion_tokens === "number") parts.push(`${usage.completion_tokens} ${t("tokens")}`);
  return parts.join(" · ");
}

const renderPending = new Set();

// Render at most once per animation frame, however fast deltas arrive.
function scheduleRender(answer) {
  if (renderPending.has(answer)) return;
  renderPending.add(answer);
  requestAnimationFrame(() => {
    renderPending.delete(answer);
    renderAnswer(answer);
  });
}

function renderAnswer(answer) {
  const wasNearBottom = isNearBottom();
  patchMarkdown(answer.view.content, answer.text);
  if (wasNearBottom) scrollToBottom();
}

async function consumeStream(answer, response) {
  for await (const event of readEvents(response)) {
    if (event.id !== null) answer.lastEventId = event.id;
    if (event.data === "[DONE]") {
      answer.isDone = true;
      return;
    }
    applyChunk(answer, JSON.parse(event.data));
  }
}

// Re-open the job's stream after a dropped connection, from the last event id seen.
async function resumeStream(answer, signal) {
  const url = `/v1/jobs/${encodeURIComponent(active.jobId)}/events?chatpipe_stages=true`;
  const response = await fetch(url, { headers: { ...authHeaders(), "Last-Event-ID": answer.lastEventId }, signal });
  if (!response.ok) throw new Error(await errorMessage(response));
  await consumeStream(answer, response);
}

async function streamAnswer(answer, signal) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json", ...authHeaders() },
    body: JSON.stringify({ model: "chatpipe", messages: conversation, stream: true, chatpipe_stages: true }),
    signal,
  });
  if (!response.ok) throw new Error(await errorMessage(response));
  active.jobId = response.headers.get("X-Chatpipe-Job-Id");

  for (let attempt = 0; ; attempt++) {
    try {
      if (attempt === 0) await consumeStream(answer, response);
      else await resumeStream(answer, signal);
      if (answer.isDone) return;
    } catch (err) {
      // fetch() and reads fail with a TypeError when the network drops; only that is worth a resume.
      if (signal.aborted || !(err instanceof TypeError)) throw err;
    }
    if (attempt >= MAX_RESUMES || !active.jobId) throw new Error(t("connectionLost"));
    answer.view.meta.textContent = t("connectionLost");
  }
}

async function send() {
  const text = elements.input.value;
  if (!text.trim() || active) return;
  elements.input.value = "";

  conversation.push({ role: "user", content: text });
  const userView = appendMessage("user");
  userView.content.textContent = text;
  scrollToBottom();

  const answer = createAnswer();
  active = { controller: new AbortController(), jobId: null, isStopped: false };
  setBusy(true);
  try {
    await streamAnswer(answer, active.controller.signal);
  } catch (err) {
    if (!active.isStopped) showError(answer, err);
  } finally {
    renderAnswer(answer);
    answer.view.root.classList.remove("streaming");
    if (active.isStopped) appendNote(answer, t("stopped"));
    if (answer.text) conversation.push({ role: "assistant", content: answer.text });
    active = null;
    setBusy(false);
    elements.input.focus();
  }
}

function stop() {
  if (!active) return;
  active.isStopped = true;
  const jobId = active.jobId;
  active.controller.abort();
  if (jobId) {
    fetch(`/v1/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST", headers: authHeaders() }).catch(() => {});
  }
}

// ----- view -----

function appendMessage(role) {
  elements.emptyHint.hidden = true;
  const root = document.createElement("article");
  root.className = `message ${role}`;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role === "user" ? t("you") : t("assistant");
  const content = document.createElement("div");
  content.className = "content";
  root.append(label, content);
  elements.messages.appendChild(root);
  return { root, content };
}

function appendNote(answer, text) {
  const note = document.createElement("div");
  note.className = "note";
  note.textContent = text;
  answer.view.root.appendChild(note);
}

function showError(answer, err) {
  const note = document.createElement("div");
  note.className = "note error";
  note.textContent = `${t("errorPrefix")}: ${err.message}`;
  answer.view.root.appendChild(note);
}

function setBusy(isBusy) {
  elements.send.hidden = isBusy;
  elements.stop.hidden = !isBusy;
}

function isNearBottom() {
  const root = document.scrollingElement;
  return root.scrollHeight - root.scrollTop - root.clientHeight < NEAR_BOTTOM_PX;
}

function scrollToBottom() {
  const root = document.scrollingElement;
  root.scrollTop = root.scrollHeight;
}

function newChat() {
  if (active) stop();
  conversation.length = 0;
  for (const message of elements.messages.querySelectorAll(".message")) message.remove();
  elements.emptyHint.hidden = false;
  elements.input.focus();
}

// ----- input -----

// Enter sends and Shift+Enter inserts a newline. Enter that confirms an IME
// candidate (isComposing, or keyCode 229 in browsers that fire keydown
// after compositionend) must not send.
function onKeyDown(event) {
  if (event.key !== "Enter" || event.shiftKey) return;
  if (event.isComposing || isComposing || event.keyCode === 229) return;
  event.preventDefault();
  send();
}

function init() {
  applyTranslations(document);
  elements.apiKey.value = localStorage.getItem(API_KEY_STORAGE) || "";
  elements.apiKey.addEventListener("change", () => {
    const key = elements.apiKey.value.trim();
    if (key) localStorage.setItem(API_KEY_STORAGE, key);
    else localStorage.removeItem(API_KEY_STORAGE);
  });
  elements.input.addEventListener("compositionstart", () => { isComposing = true; });
  elements.input.addEventListener("compositionend", () => { isComposing = false; });
  elements.input.addEventListener("keydown", onKeyDown);
  elements.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  elements.stop.addEventListener("click", stop);
  elements.newChat.addEventListener("click", newChat);
  elements.input.focus();
}

init();
