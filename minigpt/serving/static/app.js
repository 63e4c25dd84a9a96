// minigpt's page: talks to this server's OpenAI-compatible API and shows each token's
// probability. Plain JavaScript, no framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const output = $("output"), prompt = $("prompt"), statusLine = $("status"), tip = $("tip");
let messages = [];        // the chat so far, as the API wants it
let controller = null;    // aborts the request in flight (the Stop button)
let modelName = "minigpt";

// --- settings ------------------------------------------------------------------------------

function settings() {
  const topK = Number($("top-k").value), topP = Number($("top-p").value);
  const body = { model: modelName, temperature: Number($("temperature").value),
                 max_tokens: Number($("max-tokens").value) || 64, stream: true };
  if (topK > 0) body.top_k = topK;       // top_k is this server's extension of the API
  if (topP < 1) body.top_p = topP;
  return body;
}

function showSliders() {
  $("temperature-value").textContent = Number($("temperature").value).toFixed(2);
  $("top-k-value").textContent = Number($("top-k").value) > 0 ? $("top-k").value : "off";
  $("top-p-value").textContent = Number($("top-p").value).toFixed(2);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("api-key").value) h.Authorization = "Bearer " + $("api-key").value;
  return h;
}

const chatMode = () => $("mode-chat").checked;

// --- tokens and their tooltips ---------------------------------------------------------------

// One token: its text, shaded from red (unlikely) to green (likely), with the alternatives.
// `text` is what the token adds to the answer; `token` its own text (they differ when a
// character spans two tokens).
function tokenSpan(text, token, logprob, top) {
  const span = document.createElement("span");
  const p = Math.exp(logprob);
  span.className = "tok";
  span.textContent = text;
  span.style.background = `hsl(${Math.round(120 * p)} 75% 85%)`;
  span.dataset.prob = String(p);
  span.tokenInfo = { token, p, top };
  return span;
}

function showTip(span) {
  const { token, p, top } = span.tokenInfo;
  const rows = top.map(([other, lp]) => {
    const q = Math.exp(lp), chosen = other === token ? " class=\"chosen\"" : "";
    return `<tr${chosen}><td>${escapeHtml(JSON.stringify(other))}</td><td>${(100 * q).toFixed(1)}%</td>` +
           `<td><span class="bar" style="width:${Math.max(1, Math.round(60 * q))}px"></span></td></tr>`;
  }).join("");
  tip.innerHTML = `<div>chosen ${escapeHtml(JSON.stringify(token))}: ${(100 * p).toFixed(1)}%</div>` +
                  `<table>${rows}</table>`;
  const box = span.getBoundingClientRect();
  tip.style.left = `${window.scrollX + box.left}px`;
  tip.style.top = `${window.scrollY + box.bottom + 6}px`;
  tip.hidden = false;
  document.querySelectorAll(".tok.active").forEach((s) => s.classList.remove("active"));
  span.classList.add("active");
}

function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;", "'": "&#39;" })[c]);
}

output.addEventListener("mouseover", (e) => { if (e.target.classList.contains("tok")) showTip(e.target); });
output.addEventListener("click", (e) => { if (e.target.classList.contains("tok")) showTip(e.target); });
output.addEventListener("mouseleave", () => { tip.hidden = true; });

// --- the API ---------------------------------------------------------------------------------

// POST a streamed request; call onChunk with each parsed server-sent event.
async function stream(path, body, onChunk) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body),
                                       signal: controller.signal });
  if (!response.ok) {
    const error = await response.json().catch(() => ({}));
    throw new Error((error.error && error.error.message) || `HTTP ${response.status}`);
  }
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") return;
      onChunk(JSON.parse(data));
    }
  }
}

function turn(who, text) {
  const div = document.createElement("div");
  div.className = `turn ${who}`;
  div.innerHTML = `<span class="who">${who === "user" ? "you" : "model"}</span>`;
  if (text) div.append(text);
  output.append(div);
  return div;
}

async function chat(text) {
  messages.push({ role: "user", content: text });
  turn("user", text);
  const target = turn("assistant");
  let answer = "";
  try {
    await stream("/v1/chat/completions", { ...settings(), messages, logprobs: true, top_logprobs: 5 }, (chunk) => {
      const choice = chunk.choices[0];
      if (!choice) return;
      const content = (choice.delta && choice.delta.content) || "";
      answer += content;
      const lp = choice.logprobs && choice.logprobs.content && choice.logprobs.content[0];
      const top = lp ? lp.top_logprobs.map((t) => [t.token, t.logprob]) : [];
      if (lp) target.append(tokenSpan(content, lp.token, lp.logprob, top));
      else if (content) target.append(content);
      if (choice.finish_reason) statusLine.textContent = `finished: ${choice.finish_reason}`;
    });
  } finally {
    messages.push({ role: "assistant", content: answer.trim() });
  }
}

async function complete(text) {
  const target = document.createElement("div");
  target.className = "turn";
  target.innerHTML = `<span class="prompt-text"></span>`;
  target.firstChild.textContent = text;
  output.replaceChildren(target);
  await stream("/v1/completions", { ...settings(), prompt: text, logprobs: 5 }, (chunk) => {
    const choice = chunk.choices[0];
    const lp = choice.logprobs;
    if (lp && lp.tokens.length) {
      const top = Object.entries(lp.top_logprobs[0]).sort((a, b) => b[1] - a[1]);
      target.append(tokenSpan(choice.text, lp.tokens[0], lp.token_logprobs[0], top));
    } else if (choice.text) target.append(choice.text);
    if (choice.finish_reason) statusLine.textContent = `finished: ${choice.finish_reason}`;
  });
}

// --- the form --------------------------------------------------------------------------------

async function send(event) {
  event.preventDefault();
  const text = prompt.value;
  if (!text.trim() || controller) return;
  controller = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  statusLine.textContent = "writing…"; statusLine.className = ""; output.dataset.state = "busy";
  tip.hidden = true;
  if (chatMode()) prompt.value = "";
  try {
    await (chatMode() ? chat(text) : complete(text));
  } catch (err) {
    statusLine.textContent = err.name === "AbortError" ? "stopped" : `error: ${err.message}`;
    statusLine.className = err.name === "AbortError" ? "" : "error";
  } finally {
    controller = null;
    $("send").disabled = false; $("stop").disabled = true;
    output.dataset.state = "done";
    output.scrollTop = output.scrollHeight;
  }
}

function clear() {
  messages = [];
  output.replaceChildren();
  output.dataset.state = "idle";
  statusLine.textContent = "";
  tip.hidden = true;
}

$("form").addEventListener("submit", send);
$("stop").addEventListener("click", () => controller && controller.abort());
$("reset").addEventListener("click", clear);
prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
});
for (const id of ["temperature", "top-k", "top-p"]) $(id).addEventListener("input", showSliders);
for (const id of ["mode-chat", "mode-complete"]) $(id).addEventListener("change", () => {
  clear();
  prompt.placeholder = chatMode() ? "Write a message (Enter sends, Shift+Enter: new line)" : "Text to continue";
  $("send").textContent = chatMode() ? "Send" : "Generate";
});

fetch("/v1/models", { headers: headers() }).then((r) => r.json()).then((models) => {
  modelName = models.data[0].id;
  $("model-name").textContent = `${modelName} · context ${models.data[0].context_length} tokens`;
}).catch(() => { $("model-name").textContent = "(the API key is needed to see the model)"; });
showSliders();
