// Playground: one prompt streamed under two choices side by side, over /v1 like any client.
import { api, banner, el, errorText } from "./dom.js";

let controllers = [];

async function loadModels() {
  const response = await api("/v1/models");
  if (!response.ok) {
    if (response.status !== 401) banner(`Models: ${await errorText(response)}`);
    return;
  }
  const ids = (await response.json()).data.map((m) => m.id);
  for (const select of document.querySelectorAll(".side .model")) {
    const keep = select.value;
    select.replaceChildren(...ids.map((id) => el("option", { value: id, text: id })));
    if (ids.includes(keep)) select.value = keep;
  }
}

// The request one side sends: shared prompt and limits, the side's model, preset and extra fields.
function requestOf(side) {
  const mode = document.getElementById("pg-mode").value;
  const prompt = document.getElementById("pg-prompt").value;
  const fieldset = document.getElementById(`side-${side}`);
  let extra = {};
  const raw = fieldset.querySelector(".extra").value.trim();
  if (raw) extra = JSON.parse(raw);
  // Plain objects only: an array, string or number would be spread into the body as nonsense fields.
  if (extra === null || typeof extra !== "object" || Array.isArray(extra)) {
    const kind = extra === null ? "null" : Array.isArray(extra) ? "an array" : `a ${typeof extra}`;
    throw new TypeError(`side ${side.toUpperCase()}: got ${kind}`);
  }
  const body = {
    model: fieldset.querySelector(".model").value,
    max_tokens: Number(document.getElementById("pg-max").value),
    temperature: Number(document.getElementById("pg-temp").value),
  };
  if (mode === "chat") body.messages = [{ role: "user", content: prompt }];
  else body.prompt = prompt;
  const preset = fieldset.querySelector(".preset").value.trim();
  if (preset) body.decoding_preset = preset;
  Object.assign(body, extra);
  return { path: mode === "chat" ? "/v1/chat/completions" : "/v1/completions", body, mode };
}

function stats(column, s) {
  const parts = [
    `finish_reason: ${s.finish ?? "–"}`, `stop_reason: ${s.stop ?? "–"}`, `tokens: ${s.tokens ?? "–"}`,
    `TTFT: ${s.ttft === null ? "–" : `${s.ttft.toFixed(0)} ms`}`,
    `tokens/s: ${s.rate === null ? "–" : s.rate.toFixed(1)}`,
  ];
  column.querySelector(".stats").textContent = parts.join(" · ");
}

// Reads the SSE stream: `data: {json}` events, `data: [DONE]` last.
async function stream(side, request, signal) {
  const column = document.getElementById(`col-${side}`);
  const output = column.querySelector(".output");
  output.replaceChildren();
  column.dataset.state = "running";
  delete column.dataset.stopReason;
  delete column.dataset.finishReason;
  const s = { finish: null, stop: null, tokens: null, ttft: null, rate: null };
  stats(column, s);
  const body = { ...request.body, stream: true, stream_options: { include_usage: true } };
  const started = performance.now();
  let first = null;
  let pieces = 0;
  let failed = false; // an error event ended the stream
  const response = await api(request.path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal,
  });
  if (!response.ok) {
    output.append(el("span", { class: "error", text: await errorText(response) }));
    column.dataset.state = "error";
    return;
  }
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
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) {
          failed = true;
          output.append(el("span", { class: "error", text: `\nerror: ${chunk.error.message}` }));
          continue;
        }
        if (chunk.usage) s.tokens = chunk.usage.completion_tokens;
        for (const choice of chunk.choices || []) {
          const text = request.mode === "chat" ? choice.delta?.content : choice.text;
          if (text) {
            if (first === null) first = performance.now();
            pieces += 1;
            output.append(text);
          }
          if (choice.finish_reason) s.finish = choice.finish_reason;
          if (choice.stop_reason !== undefined && choice.stop_reason !== null) s.stop = choice.stop_reason;
        }
      }
    }
  }
  const ended = performance.now();
  if (s.tokens === null) s.tokens = pieces;
  if (first !== null) {
    s.ttft = first - started;
    if (ended > first && s.tokens > 1) s.rate = (s.tokens - 1) / ((ended - first) / 1000);
  }
  // The loop cut ends the text where it fired: marked there.
  if (s.stop === "loop_detected") output.append(el("mark", { class: "cut", title: "the loop cut fired here", text: "✂ loop cut" }));
  column.dataset.stopReason = String(s.stop ?? "");
  column.dataset.finishReason = String(s.finish ?? "");
  column.dataset.state = failed ? "error" : "done";
  stats(column, s);
}

function quote(text) {
  return `'${text.replaceAll("'", "'\\''")}'`;
}

function python(value, indent = "") {
  if (value === null) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (Array.isArray(value)) return `[${value.map((v) => python(v, indent)).join(", ")}]`;
  if (typeof value === "object") return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${python(v, indent)}`).join(", ")}}`;
  return JSON.stringify(value);
}

const OPENAI_CHAT = ["model", "messages", "max_tokens", "temperature", "stop", "seed", "top_p", "n"];
const OPENAI_COMPLETION = ["model", "prompt", "max_tokens", "temperature", "stop", "seed", "top_p", "n"];

function snippet(side, kind) {
  const request = requestOf(side);
  const body = { ...request.body, stream: true };
  if (kind === "curl") {
    return `curl -N ${location.origin}${request.path} \\\n  -H 'Content-Type: application/json' \\\n` +
      `  -H "Authorization: Bearer $GOVERNOR_API_KEY" \\\n  -d ${quote(JSON.stringify(body))}`;
  }
  const known = request.mode === "chat" ? OPENAI_CHAT : OPENAI_COMPLETION;
  const args = Object.entries(body).filter(([k]) => known.includes(k) || k === "stream").map(([k, v]) => `    ${k}=${python(v)},`);
  const extra = Object.fromEntries(Object.entries(body).filter(([k]) => !known.includes(k) && k !== "stream"));
  if (Object.keys(extra).length) args.push(`    extra_body=${python(extra)},`);
  const call = request.mode === "chat" ? "client.chat.completions.create" : "client.completions.create";
  const piece = request.mode === "chat" ? "chunk.choices[0].delta.content or \"\"" : "chunk.choices[0].text";
  return ["import os", "", "from openai import OpenAI", "",
    `client = OpenAI(base_url="${location.origin}/v1", api_key=os.environ.get("GOVERNOR_API_KEY", "none"))`,
    `stream = ${call}(`, ...args, ")", "for chunk in stream:", "    if chunk.choices:",
    `        print(${piece}, end="", flush=True)`, "print()"].join("\n");
}

async function copy(side, kind) {
  const column = document.getElementById(`col-${side}`);
  const pre = column.querySelector(".snippet");
  try {
    pre.textContent = snippet(side, kind);
  } catch (error) {
    banner(`Side ${side.toUpperCase()}: ${error}`);
    return;
  }
  pre.hidden = false;
  pre.dataset.kind = kind;
  try {
    await navigator.clipboard.writeText(pre.textContent);
  } catch {
    // no clipboard (plain http on another host): the snippet is shown to copy by hand
  }
}

async function run(event) {
  event.preventDefault();
  for (const c of controllers) c.abort();
  banner("");
  let requests;
  try {
    requests = ["a", "b"].map((side) => [side, requestOf(side)]);
  } catch (error) {
    banner(`Extra fields must be a JSON object: ${error}`);
    return;
  }
  controllers = requests.map(() => new AbortController());
  await Promise.all(requests.map(([side, request], i) => stream(side, request, controllers[i].signal).catch((error) => {
    const column = document.getElementById(`col-${side}`);
    column.querySelector(".output").append(el("span", { class: "error", text: ` [${error.name === "AbortError" ? "stopped" : error}]` }));
    column.dataset.state = "error";
  })));
}

export function startPlayground() {
  document.getElementById("pg-form").addEventListener("submit", run);
  document.getElementById("pg-stop").addEventListener("click", () => controllers.forEach((c) => c.abort()));
  for (const side of ["a", "b"]) {
    const column = document.getElementById(`col-${side}`);
    column.querySelector(".copy-curl").addEventListener("click", () => copy(side, "curl"));
    column.querySelector(".copy-py").addEventListener("click", () => copy(side, "python"));
  }
  loadModels().then(() => { document.body.dataset.modelsLoaded = "1"; });
}
