// Small live charts as SVG, built by hand: a few polylines on a fixed time axis.

const NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}) {
  const node = document.createElementNS(NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  return node;
}

/**
 * A line chart of the last `span` seconds up to `now`.
 * series: [{points: [[t, value], …], cls: "css class", label: "name"}]
 * The y axis runs from 0 to the largest value (at least `floor`), labelled at the top.
 */
export function lineChart(series, { now, span = 300, width = 240, height = 56, floor = 1, unit = "" } = {}) {
  const root = svg("svg", {
    class: "chart",
    viewBox: `0 0 ${width} ${height}`,
    width,
    height,
    role: "img",
    "aria-label": series.map((s) => s.label).join(", "),
  });
  const values = series.flatMap((s) => s.points.map((p) => p[1]));
  const max = Math.max(floor, ...values);
  const x = (t) => width - ((now - t) / span) * width;
  const y = (v) => height - 1 - (v / max) * (height - 14);
  root.append(svg("line", { class: "axis", x1: 0, y1: height - 0.5, x2: width, y2: height - 0.5 }));
  for (const s of series) {
    const points = s.points.filter(([t]) => now - t <= span);
    if (points.length < 2) continue;
    const line = points.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    const title = svg("title");
    title.textContent = s.label;
    const poly = svg("polyline", { class: `series ${s.cls || ""}`, points: line });
    poly.append(title);
    root.append(poly);
  }
  const top = svg("text", { class: "scale", x: 2, y: 10 });
  top.textContent = `${Number.isInteger(max) ? max : max.toFixed(1)}${unit}`;
  const left = svg("text", { class: "scale", x: 2, y: height - 4 });
  left.textContent = `-${Math.round(span / 60)} min`;
  root.append(top, left);
  return root;
}

/** A horizontal bar filled to `fraction` (0..1), announced as a progress bar. */
export function progressBar(fraction, { width = 280, height = 10, label = "progress" } = {}) {
  const clamped = Math.max(0, Math.min(1, Number(fraction) || 0));
  const root = svg("svg", {
    class: "bar",
    viewBox: `0 0 ${width} ${height}`,
    width,
    height,
    role: "progressbar",
    "aria-label": label,
    "aria-valuemin": 0,
    "aria-valuemax": 100,
    "aria-valuenow": Math.floor(clamped * 100),
  });
  root.append(
    svg("rect", { class: "track", x: 0, y: 0, width, height, rx: 3 }),
    svg("rect", { class: "fill", x: 0, y: 0, width: (width * clamped).toFixed(1), height, rx: 3 }),
  );
  return root;
}
