// Just enough of the Prometheus text format for the dashboard: samples and histograms.

/** [{name, labels: {…}, value}] from the text of GET /metrics. */
export function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = /^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) {
      labels[l[1]] = l[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return samples;
}

/** Histogram `name` per model label: {model: [[upper bound, cumulative count], …]}. */
export function histograms(samples, name) {
  const byModel = {};
  for (const s of samples) {
    if (s.name !== `${name}_bucket`) continue;
    const le = s.labels.le === "+Inf" ? Infinity : Number(s.labels.le);
    (byModel[s.labels.model ?? ""] ??= []).push([le, s.value]);
  }
  for (const buckets of Object.values(byModel)) buckets.sort((a, b) => a[0] - b[0]);
  return byModel;
}

/** The observations between two snapshots of one histogram (`before` may be missing). */
export function since(now, before) {
  if (!now) return [];
  if (!before) return now;
  return now.map(([le, count], i) => [le, count - (before[i]?.[1] ?? 0)]);
}

/** Like PromQL's histogram_quantile: linear inside the bucket the rank falls in; null
 * without observations. A rank in the +Inf bucket answers the largest finite bound. */
export function quantile(q, buckets) {
  const total = buckets.length ? buckets[buckets.length - 1][1] : 0;
  if (!total) return null;
  const rank = q * total;
  let lower = 0;
  let below = 0;
  for (const [le, count] of buckets) {
    if (count >= rank) {
      if (le === Infinity) return lower;
      return lower + (le - lower) * ((rank - below) / (count - below || 1));
    }
    lower = le;
    below = count;
  }
  return lower;
}

export const count = (buckets) => (buckets.length ? buckets[buckets.length - 1][1] : 0);
