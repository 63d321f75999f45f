// Two SVG plots: a line over x, and per-arm intervals (point and whisker).

const NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function extent(values) {
  const xs = values.filter((v) => v !== null && Number.isFinite(v));
  if (!xs.length) return [0, 1];
  let lo = Math.min(...xs), hi = Math.max(...xs);
  if (lo === hi) { lo -= 1; hi += 1; }
  const pad = (hi - lo) * 0.08;
  return [lo - pad, hi + pad];
}

export function linePlot(xs, ys, { xLabel = "", yLabel = "", width = 520, height = 220 } = {}) {
  const m = { l: 56, r: 12, t: 12, b: 40 };
  const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, "data-testid": "line-plot" });
  const [y0, y1] = extent(ys);
  const x0 = Math.min(...xs), x1 = Math.max(...xs) === x0 ? x0 + 1 : Math.max(...xs);
  const px = (x) => m.l + ((x - x0) / (x1 - x0)) * (width - m.l - m.r);
  const py = (y) => height - m.b - ((y - y0) / (y1 - y0)) * (height - m.t - m.b);
  root.append(svg("line", { x1: m.l, y1: height - m.b, x2: width - m.r, y2: height - m.b, stroke: "#999" }));
  root.append(svg("line", { x1: m.l, y1: m.t, x2: m.l, y2: height - m.b, stroke: "#999" }));
  if (y0 < 0 && y1 > 0) root.append(svg("line", { x1: m.l, y1: py(0), x2: width - m.r, y2: py(0), stroke: "#ddd" }));
  for (const y of [y0, (y0 + y1) / 2, y1]) root.append(svg("text", { x: 4, y: py(y) + 4 }, y.toFixed(2)));
  for (const x of xs) root.append(svg("text", { x: px(x) - 4, y: height - m.b + 14 }, String(x)));
  root.append(svg("text", { x: m.l, y: height - 6 }, xLabel));
  root.append(svg("text", { x: m.l + 8, y: m.t + 10 }, yLabel));
  const points = xs.map((x, i) => [x, ys[i]]).filter(([, y]) => y !== null);
  root.append(svg("polyline", {
    points: points.map(([x, y]) => `${px(x)},${py(y)}`).join(" "), fill: "none", stroke: "#3558d4", "stroke-width": 2,
  }));
  for (const [x, y] of points) root.append(svg("circle", { cx: px(x), cy: py(y), r: 3.5, fill: "#3558d4", class: "point" }));
  return root;
}

// rows: [{label, mean, lo, hi}] (lo/hi null: no interval)
export function intervalPlot(rows, { title = "", width = 520 } = {}) {
  const m = { l: 110, r: 20, t: 24, b: 28 };
  const rowH = 28;
  const height = m.t + m.b + rowH * rows.length;
  const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, "data-testid": "interval-plot" });
  const [x0, x1] = extent(rows.flatMap((r) => [r.mean, r.lo, r.hi]));
  const px = (x) => m.l + ((x - x0) / (x1 - x0)) * (width - m.l - m.r);
  root.append(svg("text", { x: m.l, y: 14 }, title));
  rows.forEach((r, i) => {
    const y = m.t + rowH * i + rowH / 2;
    root.append(svg("text", { x: 6, y: y + 4 }, r.label));
    if (r.lo !== null && r.hi !== null) {
      root.append(svg("line", { x1: px(r.lo), y1: y, x2: px(r.hi), y2: y, stroke: "#667085", "stroke-width": 2, class: "whisker" }));
    }
    if (r.mean !== null) root.append(svg("circle", { cx: px(r.mean), cy: y, r: 5, fill: "#3558d4", class: "point" }));
  });
  const axis = height - m.b + 4;
  root.append(svg("line", { x1: m.l, y1: axis, x2: width - m.r, y2: axis, stroke: "#999" }));
  for (const x of [x0, (x0 + x1) / 2, x1]) root.append(svg("text", { x: px(x) - 14, y: axis + 16 }, x.toFixed(2)));
  return root;
}
