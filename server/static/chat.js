// Dovetail's chat page: the server's own OpenAI API from the browser, no library.
// POST /v1/chat/completions with `stream: true`, read as server-sent events; with
// `stream_options.include_speculation` (a Dovetail extension, docs/api.md) each chunk
// also says where its tokens came from, which colours the reply.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "dovetail-api-key";
const state = { messages: [], controller: null };

function apiKey() { return $("api-key").value.trim(); }

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey()) h.Authorization = "Bearer " + apiKey();
  return h;
}

async function showStatus() {
  const parts = [];
  try {
    const health = await (await fetch("/health")).json();
    const models = await fetch("/v1/models", { headers: headers() });
    if (models.ok) parts.push("model " + (await models.json()).data[0].id);
    if (health.draft) parts.push("draft " + health.draft);
    if (health.verifies) parts.push("verifies " + health.verifies);
    if (health.threads) parts.push(health.threads + " threads");
    if (health.status !== "ok") parts.push(health.status);
  } catch (error) {
    parts.push("server unreachable");
  }
  $("status").textContent = parts.join(" · ");
}

function addMessage(role) {
  const element = document.createElement("div");
  element.className = "message " + role;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("div");
  body.className = "body";
  element.append(label, body);
  $("conversation").appendChild(element);
  return body;
}

// Where ``` fences are in the text: [start, end) ranges to leave out, an opening fence with
// the rest of its line (the language's name).
function fenceRanges(text) {
  const ranges = [];
  let open = false;
  for (let at = text.indexOf("```"); at >= 0; at = text.indexOf("```", ranges[ranges.length - 1][1])) {
    let end = at + 3;
    if (!open) {
      const newline = text.indexOf("\n", end);
      end = newline < 0 ? text.length : newline + 1;
    }
    ranges.push([at, end]);
    open = !open;
  }
  return ranges;
}

// The reply as coloured spans, the text between fences in <pre> blocks. A fence may be split
// over tokens, so the walk goes by character offsets into the whole text.
function render(body, pieces) {
  const ranges = fenceRanges(pieces.map((piece) => piece.text).join(""));
  body.textContent = "";
  let container = body, next = 0, offset = 0;
  for (const piece of pieces) {
    let start = 0;
    while (start < piece.text.length) {
      const range = ranges[next];
      if (range && offset + start >= range[0]) {  // inside a fence: skip it
        start = Math.min(range[1] - offset, piece.text.length);
        if (offset + start >= range[1]) {
          next += 1;
          container = container === body ? body.appendChild(document.createElement("pre")) : body;
        }
        continue;
      }
      const end = range ? Math.min(piece.text.length, range[0] - offset) : piece.text.length;
      const span = document.createElement("span");
      span.className = "tok-" + piece.source;
      span.textContent = piece.text.slice(start, end);
      container.appendChild(span);
      start = end;
    }
    offset += piece.text.length;
  }
  $("conversation").scrollTop = $("conversation").scrollHeight;
}

function showError(text) {
  addMessage("error").textContent = text;
}

function updateStats(pieces, steps, seconds) {
  const drafted = pieces.filter((p) => p.source !== "target").length;
  $("rate").textContent = seconds > 0 ? (pieces.length / seconds).toFixed(1) : "–";
  const total = steps.reduce((a, b) => a + b, 0);
  $("tau").textContent = steps.length ? (total / steps.length).toFixed(2) : "–";
  $("accepted").textContent = pieces.length ? Math.round((100 * drafted) / pieces.length) + "%" : "–";
  const recent = steps.slice(-60);
  const top = Math.max(2, ...recent);
  const points = recent.map((n, i) => `${(i * 120) / Math.max(recent.length - 1, 1)},${24 - (n / top) * 22}`);
  $("sparkline").innerHTML = recent.length ? `<polyline points="${points.join(" ")}"/>` : "";
}

function requestBody() {
  const system = $("system").value.trim();
  return {
    model: "dovetail",
    messages: (system ? [{ role: "system", content: system }] : []).concat(state.messages),
    stream: true,
    stream_options: { include_usage: true, include_speculation: true },
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
  };
}

async function errorText(response) {
  let message = response.statusText;
  try { message = (await response.json()).error.message; } catch (error) { /* not JSON */ }
  if (response.status === 401) {
    $("settings").open = true;
    $("api-key").focus();
    return "This server needs an API key (Settings): " + message;
  }
  return `Error ${response.status}: ${message}`;
}

async function send(text) {
  state.messages.push({ role: "user", content: text });
  addMessage("user").textContent = text;
  const body = addMessage("assistant");
  const pieces = [], steps = [];
  let content = "";
  const started = performance.now();
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()),
      signal: state.controller.signal,
    });
    if (!response.ok) {
      body.parentElement.remove();
      state.messages.pop();
      showError(await errorText(response));
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const event of events) {
        const data = event.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) { showError("Error: " + chunk.error.message); continue; }
        const delta = (chunk.choices && chunk.choices[0] && chunk.choices[0].delta) || {};
        if (delta.content) content += delta.content;
        if (chunk.speculation) {
          pieces.push(...chunk.speculation.tokens);
          steps.push(...chunk.speculation.steps);
        } else if (delta.content) {
          pieces.push({ text: delta.content, source: "target" });
        }
        render(body, pieces);
        updateStats(pieces, steps, (performance.now() - started) / 1000);
      }
    }
  } catch (error) {
    if (error.name === "AbortError") {
      const note = document.createElement("div");
      note.className = "role";
      note.textContent = "stopped";
      body.parentElement.appendChild(note);
    } else {
      showError("Error: " + error.message);
    }
  } finally {
    if (content) state.messages.push({ role: "assistant", content });
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

function main() {
  $("api-key").value = localStorage.getItem(KEY_STORE) || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem(KEY_STORE, apiKey());
    showStatus();
  });
  $("show-speculation").addEventListener("change", (event) => {
    $("conversation").classList.toggle("plain-view", !event.target.checked);
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || state.controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  showStatus();
}

main();
