// The chat page: streams /v1/chat/completions over fetch, shows `reasoning_content` in a collapsible
// block above the answer, and keeps the conversation in memory (earlier turns go back as content only:
// the server refuses reasoning sent back, as DeepSeek's API does). Everything the model writes is shown
// as text, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const turns = [];  // {role, content} turns sent with each request
let modelId = null;
let controller = null;  // the AbortController of the reply being streamed

const SETTINGS = ["temperature", "top-p", "max-tokens", "seed", "system", "api-key"];

function saveSettings() {
  for (const id of SETTINGS) localStorage.setItem("pocketr1." + id, $(id).value);
}

function loadSettings() {
  for (const id of SETTINGS) {
    const value = localStorage.getItem("pocketr1." + id);
    if (value !== null) $(id).value = value;
  }
}

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error && body.error.message ? body.error.message : response.statusText;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", {headers: headers()});
    if (!response.ok) throw new Error(await errorText(response));
    const body = await response.json();
    modelId = body.data[0].id;
    $("model").textContent = modelId + " · context " + body.data[0].max_model_len;
    showError("");
  } catch (e) {
    $("model").textContent = "not connected";
    showError("Cannot list models: " + e.message + " (an API key may be needed: see Settings).");
  }
}

function addMessage(role) {
  $("empty").hidden = true;
  const div = document.createElement("div");
  div.className = "msg " + role;
  $("conversation").appendChild(div);
  return div;
}

function addAssistant() {
  const div = addMessage("assistant");
  const thinking = document.createElement("details");
  thinking.className = "thinking";
  thinking.open = true;
  const summary = document.createElement("summary");
  summary.textContent = "Thinking…";
  const thought = document.createElement("div");
  thought.className = "thought";
  thinking.append(summary, thought);
  const answer = document.createElement("div");
  answer.className = "answer";
  div.append(thinking, answer);
  return {div, thinking, summary, thought, answer};
}

function requestBody() {
  const body = {model: modelId, messages: [], stream: true, stream_options: {include_usage: true}};
  const system = $("system").value.trim();
  if (system) body.messages.push({role: "system", content: system});
  body.messages.push(...turns);
  const number = (id) => ($(id).value.trim() === "" ? null : Number($(id).value));
  const fields = {temperature: number("temperature"), top_p: number("top-p"),
                  max_tokens: number("max-tokens"), seed: number("seed")};
  for (const [name, value] of Object.entries(fields)) if (value !== null) body[name] = value;
  return body;
}

// Calls `onEvent` with each parsed `data:` payload of a server-sent event stream.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) onEvent(line.slice(6));  // ":" lines are keep-alive comments
      }
    }
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("input").disabled = busy;
}

async function send(text) {
  if (!modelId) await loadModel();
  if (!modelId) return;
  showError("");
  addMessage("user").textContent = text;
  turns.push({role: "user", content: text});
  const view = addAssistant();
  const started = performance.now();
  let thoughtEnd = null;  // when the answer began
  let answer = "", thoughtSeen = false, answerSeen = false, finish = null;
  const conversation = $("conversation");
  controller = new AbortController();
  setBusy(true);
  try {
    const response = await fetch("/v1/chat/completions", {method: "POST", headers: headers(),
      body: JSON.stringify(requestBody()), signal: controller.signal});
    if (!response.ok) throw new Error(await errorText(response));
    await readEvents(response, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        const delta = choice.delta || {};
        const thought = delta.reasoning_content || delta.reasoning;
        if (thought) {
          thoughtSeen = true;
          view.thought.textContent += thought;
        }
        if (delta.content) {
          if (!answerSeen) {  // the thinking is over: fold it away, the answer follows
            answerSeen = true;
            thoughtEnd = performance.now();
            view.thinking.open = false;
          }
          answer += delta.content;
          view.answer.textContent = answer;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      conversation.scrollTop = conversation.scrollHeight;
    });
  } catch (e) {
    if (e.name !== "AbortError") showError(e.message);
  } finally {
    controller = null;
    setBusy(false);
    $("input").focus();
  }
  const seconds = (((thoughtEnd || performance.now()) - started) / 1000).toFixed(1);
  view.summary.textContent = thoughtSeen ? `Thought for ${seconds} s` : "No thinking";
  if (!thoughtSeen) view.thinking.hidden = true;
  if (finish === "length") view.div.appendChild(note("[cut off at the token limit]"));
  if (finish === null) view.div.appendChild(note("[stopped]"));
  turns.push({role: "assistant", content: answer});
}

function note(text) {
  const span = document.createElement("p");
  span.className = "note muted";
  span.textContent = text;
  return span;
}

function newChat() {
  if (controller) controller.abort();
  turns.length = 0;
  for (const msg of document.querySelectorAll(".msg")) msg.remove();
  $("empty").hidden = false;
  showError("");
  $("input").focus();
}

document.addEventListener("DOMContentLoaded", () => {
  loadSettings();
  for (const id of SETTINGS) $(id).addEventListener("change", () => {
    saveSettings();
    if (id === "api-key") loadModel();
  });
  $("settings-toggle").addEventListener("click", () => {
    $("settings").hidden = !$("settings").hidden;
    $("settings-toggle").setAttribute("aria-expanded", String(!$("settings").hidden));
  });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("input").value.trim();
    if (!text || controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("new-chat").addEventListener("click", newChat);
  loadModel();
  $("input").focus();
});
