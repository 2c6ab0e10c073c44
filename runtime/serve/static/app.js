// gptedge's chat page: /v1/models for the list, /v1/chat/completions streamed (Server-Sent Events over fetch).
"use strict";
const $ = (id) => document.getElementById(id);
const history = [];
let controller = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function add(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

async function loadModels() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
    $("model").replaceChildren(...body.data.map((m) => new Option(m.id, m.id)));
    $("status").textContent = body.data.length + " model(s) ready";
  } catch (err) {
    $("status").textContent = "cannot list models: " + err.message;
    setTimeout(loadModels, 2000); // still loading, or a key is needed
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  add("user", text);
  const out = add("assistant", "");
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  const started = performance.now();
  let first = 0, tokens = 0, answer = "", finish = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({
        model: $("model").value, messages: history, stream: true, stream_options: { include_usage: true },
        temperature: Number($("temperature").value),
        max_tokens: $("max-tokens").value ? Number($("max-tokens").value) : undefined, // empty: until the context is full
      }),
    });
    if (!response.ok) {
      const body = await response.json();
      throw new Error(body.error ? body.error.message : response.statusText);
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const event = JSON.parse(line.slice(6));
        if (event.error) throw new Error(event.error.message);
        if (event.usage) tokens = event.usage.completion_tokens;
        for (const choice of event.choices) {
          if (choice.delta && choice.delta.content) {
            if (!first) first = performance.now();
            answer += choice.delta.content;
            out.textContent = answer;
            $("log").scrollTop = $("log").scrollHeight;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
    const seconds = (performance.now() - (first || started)) / 1000;
    $("status").textContent = `${tokens} tokens, ${(tokens > 1 ? (tokens - 1) / seconds : 0).toFixed(1)} tokens/s, ` +
      `first token after ${((first || performance.now()) - started).toFixed(0)} ms (${finish})`;
  } catch (err) {
    if (err.name === "AbortError") {
      $("status").textContent = "stopped";
      out.dataset.stopped = "true";
    } else {
      out.className = "message error";
      out.textContent = answer + (answer ? "\n" : "") + "error: " + err.message;
      $("status").textContent = "error";
    }
  } finally {
    history.push({ role: "assistant", content: answer });
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => { history.length = 0; $("log").replaceChildren(); });
$("api-key").addEventListener("change", loadModels);
loadModels();
