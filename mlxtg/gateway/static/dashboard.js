// The dashboard: polls GET /admin/status and /metrics (and /admin/cache, less often) and
// updates one card per configured model in place. Rates and recent percentiles come from
// the differences between successive polls, kept in this page for the last few minutes.

import { getJSON, getText, postJSON } from "./api.js";
import { lineChart, progressBar } from "./charts.js";
import { $, el, fmtBytes, fmtHitRate, fmtRate, fmtSeconds, setText } from "./dom.js";
import { count, histograms, parseMetrics, quantile, since } from "./prom.js";

const POLL_MS = 2000;
const CACHE_EVERY = 5; // polls between two GET /admin/cache (it lists folders on disk)
const SPAN_S = 300; // history kept for charts, rates and recent percentiles
// The supervisor's states, as the issue names them.
const STATE_LABELS = { loaded: "ready", loading: "loading", draining: "evicting" };
// The load phases of GET /admin/status's `progress`; an unknown one is shown as it comes.
const PHASE_LABELS = {
  starting: "starting the worker",
  download: "downloading",
  quantize: "quantizing",
  load: "loading weights",
  warmup: "warming up",
};

const clock = () => Date.now() / 1000;

export class Dashboard {
  constructor(root, setConnection) {
    this.root = root;
    this.setConnection = setConnection;
    this.cards = new Map(); // model name -> ModelCard
    this.history = new Map(); // model name -> [{t, worker, tokens, tps, running, queued}]
    this.snapshots = []; // [{t, ttft, itl}]: latency histograms per model
    this.cache = null;
    this.polls = 0;
    this.running = false;
    this.timer = null;
    $("#clear-all", root).addEventListener("click", () => ($("#clear-all-confirm", root).hidden = false));
    $("#clear-all-no", root).addEventListener("click", () => ($("#clear-all-confirm", root).hidden = true));
    $("#clear-all-yes", root).addEventListener("click", () => this.clearAll());
  }

  start() {
    if (this.running) return;
    this.running = true;
    this.tick();
  }

  stop() {
    this.running = false;
    clearTimeout(this.timer);
  }

  async tick() {
    clearTimeout(this.timer);
    if (!this.running) return;
    if (!document.hidden) await this.refresh();
    if (this.running) this.timer = setTimeout(() => this.tick(), POLL_MS);
  }

  async refresh() {
    try {
      const [status, metrics] = await Promise.all([
        getJSON("admin/status"),
        getText("metrics").catch(() => ""),
      ]);
      if (this.polls % CACHE_EVERY === 0) this.cache = await getJSON("admin/cache").catch(() => this.cache);
      this.polls += 1;
      this.render(status, parseMetrics(metrics));
      this.setConnection(true, `live · updated ${new Date().toLocaleTimeString()}`);
    } catch (err) {
      if (err.status === 401) this.stop(); // the page asks for the key
      else this.setConnection(false, err.message);
    }
  }

  render(status, samples) {
    const now = clock();
    this.record(status, samples, now);
    setText($("#summary", this.root), summary(status, samples));
    const container = $("#models", this.root);
    const names = new Set();
    for (const model of status.models) {
      names.add(model.name);
      let card = this.cards.get(model.name);
      if (!card) {
        card = new ModelCard(model.name, this);
        this.cards.set(model.name, card);
        container.append(card.node);
      }
      card.update(model, {
        now,
        serverTime: status.gateway?.time ?? now,
        history: this.history.get(model.name) || [],
        latency: this.latency(model.name),
        misses: (status.gateway?.cache_misses || []).filter((m) => m.model === model.name),
      });
    }
    for (const [name, card] of this.cards) {
      if (!names.has(name)) {
        card.node.remove();
        this.cards.delete(name);
      }
    }
    renderMisses($("#misses", this.root), status.gateway?.cache_misses || [], status.gateway?.time ?? now);
    if (this.cache) renderDisk($("#disk", this.root), this.cache.on_disk || []);
  }

  /** Keep this poll's counters; drop what is older than the span. */
  record(status, samples, now) {
    for (const model of status.models) {
      const list = this.history.get(model.name) || [];
      const stats = model.worker?.stats;
      list.push({
        t: now,
        worker: model.worker?.worker_id ?? null,
        tokens: stats?.tokens_generated ?? null,
        tps: stats?.tokens_per_s ?? 0,
        running: stats?.running ?? 0,
        queued: stats?.queued ?? 0,
      });
      while (list.length && now - list[0].t > SPAN_S + 10) list.shift();
      this.history.set(model.name, list);
    }
    this.snapshots.push({
      t: now,
      ttft: histograms(samples, "mlxtg_time_to_first_token_seconds"),
      itl: histograms(samples, "mlxtg_inter_token_seconds"),
    });
    while (this.snapshots.length > 1 && now - this.snapshots[0].t > SPAN_S) this.snapshots.shift();
  }

  /** {ttft, itl}: each {recent, all} buckets of one model. */
  latency(name) {
    const last = this.snapshots[this.snapshots.length - 1];
    const first = this.snapshots[0];
    const pick = (kind) => {
      const all = last?.[kind][name] || [];
      // A histogram missing from the first snapshot had no observations then.
      let recent = since(all, first === last ? all : first?.[kind][name]);
      if (recent.some(([, n]) => n < 0)) recent = all; // the gateway restarted
      return { all, recent, seconds: Math.max(0, (last?.t ?? 0) - (first?.t ?? 0)) };
    };
    return { ttft: pick("ttft"), itl: pick("itl") };
  }

  async act(card, label, call, describe) {
    card.setBusy(true);
    card.say(`${label}…`);
    try {
      card.say(describe(await call()));
    } catch (err) {
      card.say(err.message, true);
    } finally {
      card.setBusy(false);
      this.tick(); // show the new state now
    }
  }

  load(card) {
    this.act(card, "Loading", () => postJSON("admin/load", { model: card.name }), (r) => `load: ${r.state}`);
  }

  evict(card) {
    this.act(
      card,
      "Evicting",
      () => postJSON("admin/evict", { model: card.name }),
      (r) => (r.models && r.models[card.name]) || "nothing to evict: not loaded",
    );
  }

  clearCache(card) {
    this.act(card, "Clearing", () => postJSON("admin/cache/clear", { model: card.name }), cleared);
  }

  async clearAll() {
    const message = $("#clear-all-message", this.root);
    $("#clear-all-confirm", this.root).hidden = true;
    try {
      setText(message, cleared(await postJSON("admin/cache/clear", {})));
      this.polls = 0; // refresh the disk table at the next poll
    } catch (err) {
      setText(message, err.message);
    }
  }
}

function cleared(reply) {
  const n = (reply.removed || []).length;
  return n ? `cleared ${n} cache${n === 1 ? "" : "s"}` : "nothing to clear";
}

function summary(status, samples) {
  const c = status.counters || {};
  const requests = samples
    .filter((s) => s.name === "mlxtg_requests_total")
    .map((s) => `${s.labels.status} ${s.value}`)
    .join(", ");
  return (
    `mlxtg ${status.version} · up ${fmtSeconds(status.supervisor?.uptime)} · ` +
    `loads ${c.model_loads ?? 0}, evictions ${c.evictions ?? 0}, restarts ${c.worker_restarts ?? 0}, ` +
    `hangs ${c.worker_hangs ?? 0}, load failures ${c.load_failures ?? 0}` +
    (requests ? ` · requests by status: ${requests}` : "")
  );
}

/** "p50 40 ms · p95 90 ms · p99 0.2 s (12 samples, last 2 min 10 s)": the recent window
 * is what this page has seen, up to SPAN_S; before it saw any, the totals since start. */
function fmtLatency({ recent, all, seconds }) {
  const line = (buckets) =>
    ["p50", "p95", "p99"].map((p) => `${p} ${fmtSeconds(quantile(Number(p.slice(1)) / 100, buckets))}`).join(" · ");
  if (!count(all)) return "no samples yet";
  if (!count(recent)) return `${line(all)} (since the gateway started)`;
  return `${line(recent)} (${count(recent)} samples, last ${fmtSeconds(seconds)})`;
}

function rateOver(history, worker, seconds, now) {
  const mine = history.filter((h) => h.worker === worker && h.tokens !== null && now - h.t <= seconds);
  if (mine.length < 2) return null;
  const [a, b] = [mine[0], mine[mine.length - 1]];
  return b.t > a.t ? (b.tokens - a.tokens) / (b.t - a.t) : null;
}

class ModelCard {
  constructor(name, dashboard) {
    this.name = name;
    this.fields = {};
    const row = (label, key) => {
      this.fields[key] = el("dd", { "data-field": key });
      return [el("dt", {}, label), this.fields[key]];
    };
    this.state = el("span", { class: "state" });
    this.pinned = el("span", { class: "badge", hidden: true }, "pinned");
    this.idle = el("span", { class: "idle" });
    this.meta = el("p", { class: "meta" });
    this.progress = el("div", { class: "progress", hidden: true });
    this.charts = el("div", { class: "charts" });
    this.loadButton = el("button", { type: "button", "data-action": "load", onclick: () => dashboard.load(this) }, "Load");
    this.evictButton = el("button", { type: "button", "data-action": "evict", onclick: () => dashboard.evict(this) }, "Evict");
    this.confirm = el(
      "span",
      { class: "confirm", hidden: true },
      `Delete the prompt cache of ${name}, in RAM and on disk? `,
      el("button", { type: "button", class: "danger", "data-action": "confirm-clear", onclick: () => {
        this.confirm.hidden = true;
        dashboard.clearCache(this);
      } }, "Clear"),
      el("button", { type: "button", onclick: () => (this.confirm.hidden = true) }, "Cancel"),
    );
    this.clearButton = el(
      "button",
      { type: "button", "data-action": "clear-cache", onclick: () => (this.confirm.hidden = false) },
      "Clear cache…",
    );
    this.message = el("span", { class: "message", role: "status" });
    this.node = el(
      "article",
      { class: "card", "data-model": name },
      el("header", {}, el("h3", {}, name), this.state, this.pinned, this.idle),
      this.meta,
      this.progress,
      el(
        "dl",
        {},
        row("Requests", "requests"),
        row("Tokens/s", "tps"),
        row("Time to first token", "ttft"),
        row("Inter-token latency", "itl"),
        row("Prompt cache, RAM", "ram"),
        row("Prompt cache, disk", "disk"),
        row("Memory", "memory"),
        row("Last cache misses", "misses"),
      ),
      this.charts,
      el("div", { class: "actions" }, this.loadButton, this.evictButton, this.clearButton, this.confirm, this.message),
    );
  }

  setBusy(busy) {
    for (const b of [this.loadButton, this.evictButton, this.clearButton]) b.disabled = busy;
  }

  say(text, error = false) {
    setText(this.message, text);
    this.message.classList.toggle("error", error);
  }

  update(m, { now, serverTime, history, latency, misses }) {
    const f = this.fields;
    const worker = m.worker;
    const stats = worker?.stats || {};
    const state = STATE_LABELS[m.state] || m.state;
    setText(this.state, state);
    this.state.dataset.state = state;
    this.pinned.hidden = !m.pinned;
    const busy = (stats.running || 0) + (stats.queued || 0) + (worker?.inflight || 0) > 0;
    setText(
      this.idle,
      !worker || state !== "ready" ? "" : busy ? "busy" : stats.last_step ? `idle ${fmtSeconds(Math.max(0, serverTime - stats.last_step))}` : "",
    );
    setText(
      this.meta,
      `${m.source} · quant ${m.quant} · context ${m.context_length ?? "?"}` +
        (worker ? ` · worker pid ${worker.pid}, up ${fmtSeconds(worker.uptime)}` : ""),
    );
    this.showProgress(m.progress);
    setText(
      f.requests,
      worker || m.waiting
        ? `${stats.running ?? 0} running · ${stats.queued ?? 0} queued` +
            (m.waiting ? ` · ${m.waiting} waiting for the model to load` : "")
        : "–",
    );
    const id = worker?.worker_id;
    setText(
      f.tps,
      worker
        ? `${fmtRate(stats.tokens_per_s)} now · ${fmtRate(rateOver(history, id, 60, now))} over 1 min · ` +
            `${fmtRate(rateOver(history, id, SPAN_S, now))} over 5 min`
        : "–",
    );
    setText(f.ttft, fmtLatency(latency.ttft));
    setText(f.itl, fmtLatency(latency.itl));
    const ram = stats.prefix_cache;
    setText(f.ram, ram ? `${fmtHitRate(ram.hits, ram.misses)} lookups · ${ram.entries} entries, ${fmtBytes(ram.bytes)}` : "–");
    const disk = stats.disk_cache;
    setText(
      f.disk,
      !worker ? "–" : !disk ? "off" : disk.disabled ? `disabled: ${disk.disabled}` :
        `${fmtHitRate(disk.hits, disk.misses)} lookups past RAM · ${disk.slots} slots, ${fmtBytes(disk.bytes)}` +
          (disk.corrupt ? ` · ${disk.corrupt} corrupt` : ""),
    );
    setText(
      f.memory,
      worker
        ? `RSS ${fmtBytes(worker.rss_bytes)} · MLX active ${fmtBytes(stats.mlx_active_bytes)}, peak ` +
            `${fmtBytes(stats.mlx_peak_bytes)}, buffer cache ${fmtBytes(stats.mlx_cache_bytes)} · KV ${fmtBytes(stats.kv_bytes)}`
        : "–",
    );
    f.misses.replaceChildren(
      ...(misses.length
        ? misses.slice(0, 3).map((x) => el("div", {}, `${x.reason} · ${x.cached_tokens}/${x.prompt_tokens} cached · ${fmtSeconds(serverTime - x.time)} ago`))
        : ["none seen by this gateway"]),
    );
    this.loadButton.hidden = Boolean(worker);
    this.evictButton.hidden = !worker || m.state === "draining";
    this.charts.replaceChildren(
      el("figure", {}, lineChart([{ points: history.map((h) => [h.t, h.tps]), cls: "tps", label: "tokens/s" }], { now, span: SPAN_S, unit: " tok/s" }), el("figcaption", {}, "tokens/s")),
      el(
        "figure",
        {},
        lineChart(
          [
            { points: history.map((h) => [h.t, h.running]), cls: "running", label: "running" },
            { points: history.map((h) => [h.t, h.queued]), cls: "queued", label: "queued" },
          ],
          { now, span: SPAN_S },
        ),
        el("figcaption", {}, el("span", { class: "key running" }, "running"), " ", el("span", { class: "key queued" }, "queued")),
      ),
    );
  }

  /** Load progress while the model loads (GET /admin/status, `progress` of the model):
   * the phase, a bar and the percent when known, the count done, the time spent in the phase. */
  showProgress(p) {
    this.progress.hidden = !p;
    if (!p) {
      delete this.progress.dataset.phase;
      return;
    }
    this.progress.dataset.phase = p.phase;
    const known = (x) => x !== null && x !== undefined;
    const parts = [PHASE_LABELS[p.phase] || p.phase];
    if (known(p.percent)) parts.push(`${Math.floor(p.percent)}%`); // 100% only when done
    if (known(p.done)) parts.push(fmtAmount(p.done, p.total, p.unit));
    parts.push(`${fmtSeconds(p.elapsed_s)} in this phase`); // elapsed_s restarts with each phase
    this.progress.replaceChildren(
      ...(known(p.percent) ? [progressBar(p.percent / 100, { label: parts[0] })] : []),
      el("span", { "data-field": "progress" }, parts.join(" · ")),
    );
  }
}

/** "17/40 layers", "1.2 GB of 4.5 GB" (a count in bytes), "3 files". */
function fmtAmount(done, total, unit = "") {
  const known = total !== null && total !== undefined;
  if (unit === "bytes") return known ? `${fmtBytes(done)} of ${fmtBytes(total)}` : fmtBytes(done);
  return `${done}${known ? `/${total}` : ""} ${unit}`.trim();
}

function renderMisses(table, misses, serverTime) {
  const body = $("tbody", table);
  body.replaceChildren(
    ...misses.map((m) =>
      el(
        "tr",
        {},
        el("td", {}, `${fmtSeconds(serverTime - m.time)} ago`),
        el("td", {}, m.model),
        el("td", {}, m.reason),
        el("td", {}, m.source),
        el("td", { class: "num" }, `${m.cached_tokens}/${m.prompt_tokens}`),
      ),
    ),
  );
  table.hidden = !misses.length;
  $("#misses-none").hidden = Boolean(misses.length);
}

function renderDisk(table, entries) {
  $("tbody", table).replaceChildren(
    ...entries.map((e) =>
      el(
        "tr",
        {},
        el("td", {}, e.model ?? "?"),
        el("td", { class: "mono" }, e.fingerprint),
        el("td", { class: "num" }, e.slots),
        el("td", { class: "num" }, e.tokens),
        el("td", { class: "num" }, fmtBytes(e.bytes)),
        el("td", { class: "num" }, e.hits),
        el("td", { class: "num" }, e.corrupt),
        el("td", {}, e.last_used ? new Date(e.last_used * 1000).toLocaleString() : "never"),
      ),
    ),
  );
  table.hidden = !entries.length;
}
