// The playground: a chat through the public API, as any client would call it
// (POST /v1/chat/completions, stream, stream_options.include_usage), with the stop
// reason, usage and cached_tokens of each reply. A JSON schema or tools pasted in are sent
// as response_format / tools, so the output shown is the one the server enforced.

import { ApiError, getJSON, request } from "./api.js";
import { $, el, fmtSeconds, setText } from "./dom.js";

export class Playground {
  constructor(root) {
    this.root = root;
    this.messages = []; // the conversation so far, as sent to the API
    this.controller = null;
    this.ui = {};
    for (const id of ["model", "system", "max-tokens", "temperature", "schema", "tools", "tool-choice", "log", "input", "send", "stop", "clear", "meta", "error", "form", "reload"]) {
      this.ui[id] = $(`#pg-${id}`, root);
    }
    this.ui.form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.send();
    });
    this.ui.input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        this.send();
      }
    });
    this.ui.stop.addEventListener("click", () => this.controller?.abort());
    this.ui.clear.addEventListener("click", () => this.reset());
    this.ui.reload.addEventListener("click", () => this.loadModels());
  }

  show() {
    if (!this.ui.model.options.length) this.loadModels();
  }

  async loadModels() {
    try {
      const list = await getJSON("v1/models");
      const previous = this.ui.model.value;
      this.ui.model.replaceChildren(
        ...list.data.map((m) => el("option", { value: m.id }, `${m.id} (${m.state === "loaded" ? "ready" : m.state})`)),
      );
      const ids = list.data.map((m) => m.id);
      const ready = list.data.find((m) => m.state === "loaded");
      this.ui.model.value = ids.includes(previous) ? previous : ready ? ready.id : ids[0] ?? "";
      this.error("");
    } catch (err) {
      this.error(err.message);
    }
  }

  reset() {
    this.controller?.abort();
    this.messages = [];
    this.ui.log.replaceChildren();
    this.ui.meta.replaceChildren();
    this.error("");
  }

  error(text) {
    setText(this.ui.error, text);
  }

  /** The request body, or an Error naming the field that is not valid JSON. */
  body() {
    const body = {
      model: this.ui.model.value,
      messages: [...(this.ui.system.value.trim() ? [{ role: "system", content: this.ui.system.value }] : []), ...this.messages],
      stream: true,
      stream_options: { include_usage: true },
    };
    if (this.ui["max-tokens"].value) body.max_tokens = Number(this.ui["max-tokens"].value);
    if (this.ui.temperature.value !== "") body.temperature = Number(this.ui.temperature.value);
    const schema = parseField(this.ui.schema.value, "JSON schema");
    if (schema !== undefined) {
      body.response_format = { type: "json_schema", json_schema: { name: "playground", schema, strict: true } };
    }
    const tools = parseField(this.ui.tools.value, "Tools");
    if (tools !== undefined) {
      body.tools = (Array.isArray(tools) ? tools : [tools]).map((t) => (t.type ? t : { type: "function", function: t }));
      body.tool_choice = this.ui["tool-choice"].value;
    }
    return body;
  }

  async send() {
    if (this.controller) return; // one reply at a time
    const text = this.ui.input.value;
    if (!text.trim()) return;
    this.error("");
    this.messages.push({ role: "user", content: text });
    let body;
    try {
      body = this.body();
    } catch (err) {
      this.messages.pop();
      this.error(err.message);
      return;
    }
    this.ui.input.value = "";
    this.ui.log.append(el("div", { class: "msg user" }, el("span", { class: "role" }, "user"), el("div", { class: "text" }, text)));
    const reply = new Reply(this.ui.log);
    this.controller = new AbortController();
    this.ui.send.disabled = true;
    this.ui.stop.disabled = false;
    const started = performance.now();
    try {
      const response = await request("v1/chat/completions", { method: "POST", body, signal: this.controller.signal });
      reply.cache = response.headers.get("x-mlxtg-cache");
      for await (const data of events(response)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(chunk.error.code ?? 500, chunk.error.message);
        reply.add(chunk, performance.now() - started);
      }
      this.messages.push(reply.message());
    } catch (err) {
      if (err.name === "AbortError") {
        reply.finish = "stopped here (request aborted)";
        this.messages.push(reply.message());
      } else {
        this.messages.pop(); // the failed turn is not part of the conversation
        reply.fail(err.message);
        this.error(err.message);
      }
    } finally {
      this.controller = null;
      this.ui.send.disabled = false;
      this.ui.stop.disabled = true;
    }
    this.ui.meta.replaceChildren(...reply.facts((performance.now() - started) / 1000, "response_format" in body));
  }
}

/** A field's JSON, undefined when it is empty; an Error naming the field otherwise. */
function parseField(text, name) {
  if (!text.trim()) return undefined;
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new Error(`${name}: not valid JSON (${err.message})`);
  }
}

/** The data of each server-sent event of a streamed response. */
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield data; // ": keep-alive" comments have no data
    }
  }
}

/** One assistant reply as it streams in. */
class Reply {
  constructor(log) {
    this.content = "";
    this.reasoning = "";
    this.calls = [];
    this.finish = null;
    this.usage = null;
    this.cache = null;
    this.firstTokenMs = null;
    this.chunks = 0;
    this.text = el("div", { class: "text" });
    this.thinking = el("pre", { class: "reasoning" });
    this.thinkingBox = el("details", { hidden: true }, el("summary", {}, "reasoning"), this.thinking);
    this.tools = el("pre", { class: "tool-calls", hidden: true });
    this.node = el("div", { class: "msg assistant" }, el("span", { class: "role" }, "assistant"), this.thinkingBox, this.text, this.tools);
    log.append(this.node);
  }

  add(chunk, elapsedMs) {
    this.chunks += 1;
    this.node.dataset.chunks = String(this.chunks); // how many events arrived (tests read it)
    if (chunk.usage) this.usage = chunk.usage;
    for (const choice of chunk.choices || []) {
      const d = choice.delta || {};
      if (this.firstTokenMs === null && (d.content || d.reasoning_content || d.tool_calls)) this.firstTokenMs = elapsedMs;
      if (d.content) this.content += d.content;
      const thought = d.reasoning_content ?? d.reasoning;
      if (thought) this.reasoning += thought;
      for (const call of d.tool_calls || []) {
        const slot = (this.calls[call.index ?? 0] ??= { id: "", type: "function", function: { name: "", arguments: "" } });
        if (call.id) slot.id = call.id;
        if (call.function?.name) slot.function.name += call.function.name;
        if (call.function?.arguments) slot.function.arguments += call.function.arguments;
      }
      if (choice.finish_reason) this.finish = choice.finish_reason;
    }
    setText(this.text, this.content);
    setText(this.thinking, this.reasoning);
    this.thinkingBox.hidden = !this.reasoning;
    this.tools.hidden = !this.calls.length;
    setText(this.tools, this.calls.map((c) => `${c.function.name}(${c.function.arguments})`).join("\n"));
    this.node.scrollIntoView({ block: "end" });
  }

  fail(message) {
    this.node.classList.add("failed");
    this.node.append(el("div", { class: "error" }, message));
  }

  message() {
    const message = { role: "assistant", content: this.content };
    if (this.calls.length) message.tool_calls = this.calls.filter(Boolean);
    return message;
  }

  /** finish_reason, usage, cached_tokens and timings, as labelled spans. */
  facts(seconds, schema) {
    const u = this.usage || {};
    const completion = u.completion_tokens;
    const items = [
      ["finish_reason", this.finish ?? "–"],
      ["prompt_tokens", u.prompt_tokens ?? "–"],
      ["completion_tokens", completion ?? "–"],
      ["cached_tokens", u.prompt_tokens_details?.cached_tokens ?? "–"],
    ];
    const reasoning = u.completion_tokens_details?.reasoning_tokens;
    if (reasoning) items.push(["reasoning_tokens", reasoning]);
    if (this.firstTokenMs !== null) items.push(["time to first token", fmtSeconds(this.firstTokenMs / 1000)]);
    if (completion) items.push(["tokens/s", (completion / seconds).toFixed(1)]);
    if (this.cache) items.push(["x-mlxtg-cache", this.cache]);
    if (schema && this.finish) items.push(["JSON", validJSON(this.content) ? "valid" : "not valid (cut short?)"]);
    return items.map(([k, v]) => el("span", { class: "fact", "data-fact": k }, el("b", {}, `${k}: `), String(v)));
  }
}

function validJSON(text) {
  try {
    JSON.parse(text);
    return true;
  } catch {
    return false;
  }
}
