// Experiments: the list (admin key), one experiment's arms with live per-arm counts from
// /metrics, its report with each metric's intervals, and pause / resume / stop.

import { getJSON, postJSON, request } from "./api.js";
import { intervalPlot } from "./plots.js";
import { el, fmt, guarded } from "./ui.js";

const POLL_MS = 3000;
let current = null; // the open experiment's object
let timer = null;

export async function start(page) {
  page.querySelector("#experiments-refresh").addEventListener("click", () => guarded(page, null, () => list(page)));
  page.querySelector("#experiment-report-refresh").addEventListener("click", () => guarded(page, null, () => report(page)));
  for (const button of page.querySelectorAll("[data-action]")) {
    button.addEventListener("click", () => guarded(page, button, () => act(page, button.dataset.action)));
  }
  await guarded(page, null, () => list(page));
}

export async function shown(page) {
  await guarded(page, null, () => list(page));
}

async function list(page) {
  const body = await getJSON("/v1/admin/experiments", { admin: true });
  const tbody = page.querySelector("#experiments-table tbody");
  tbody.replaceChildren(...body.data.map((x) => el("tr", { "data-name": x.name },
    el("td", { text: x.name }),
    el("td", { text: x.status + (x.unavailable ? ` (${x.unavailable})` : ""), class: "status" }),
    el("td", { text: String(x.version) }),
    el("td", { text: x.definition.arms.map((a) => a.name).join(", ") }),
    el("td", {}, el("button", { text: "open", onclick: () => guarded(page, null, () => open(page, x.name)) })))));
  if (current) {
    const again = body.data.find((x) => x.name === current.name);
    if (again) current = again;
    showStatus(page);
  }
}

function showStatus(page) {
  page.querySelector("#experiment-title").textContent =
    `${current.name} (version ${current.version}, ${current.status})`;
}

async function open(page, name) {
  current = await getJSON(`/v1/admin/experiments/${encodeURIComponent(name)}`, { admin: true });
  page.querySelector("#experiment-detail").hidden = false;
  showStatus(page);
  await Promise.all([counts(page), report(page)]);
  clearInterval(timer);
  timer = setInterval(() => {
    if (!page.hidden && current) counts(page).catch(() => {});
  }, POLL_MS);
}

async function act(page, action) {
  if (!current) return;
  current = await postJSON(`/v1/admin/experiments/${encodeURIComponent(current.name)}/${action}`, {}, { admin: true });
  showStatus(page);
  await list(page);
}

// Per-arm series of this experiment's current version, summed over their other labels.
function perArm(text, metric, experiment, version) {
  const out = {};
  for (const line of text.split("\n")) {
    if (!line.startsWith(metric + "{")) continue;
    const close = line.lastIndexOf("}");
    const labels = Object.fromEntries([...line.slice(metric.length + 1, close).matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)]
      .map((m) => [m[1], m[2]]));
    if (labels.experiment !== experiment || labels.version !== String(version)) continue;
    out[labels.arm] = (out[labels.arm] || 0) + Number(line.slice(close + 1).trim());
  }
  return out;
}

async function counts(page) {
  const text = await (await request("GET", "/metrics")).text();
  const { name, version } = current;
  const requests = perArm(text, "steerserve:experiment_requests_total", name, version);
  const errors = perArm(text, "steerserve:experiment_request_errors_total", name, version);
  const tokens = perArm(text, "steerserve:experiment_generation_tokens_total", name, version);
  const tbody = page.querySelector("#experiment-arms tbody");
  tbody.replaceChildren(...current.definition.arms.map((a) => el("tr", { "data-arm": a.name },
    el("td", { text: a.name }),
    el("td", { text: String(a.weight ?? 1) }),
    el("td", {}, el("code", { text: a.preset ? `preset ${a.preset}` : JSON.stringify(a.steering ?? null) })),
    el("td", { text: String(requests[a.name] || 0), class: "requests" }),
    el("td", { text: String(errors[a.name] || 0) }),
    el("td", { text: String(tokens[a.name] || 0) }))));
}

async function report(page) {
  const r = await getJSON(`/v1/experiments/${encodeURIComponent(current.name)}/report`);
  const holder = page.querySelector("#experiment-report");
  const metrics = Object.keys(r.metrics);
  const table = el("table", { "data-testid": "report-table" },
    el("tr", {}, ["arm", "requests", "units", "errors", "feedback",
      ...metrics.flatMap((m) => [`${m}: mean [95% CI]`, `${m}: diff vs control, p`])].map((h) => el("th", { text: h }))),
    r.arms.map((a) => el("tr", { "data-arm": a.name },
      el("td", { text: a.name + (a.control ? " (control)" : "") }),
      el("td", { text: String(a.requests) }), el("td", { text: String(a.units) }),
      el("td", { text: String(a.errors) }), el("td", { text: String(a.feedback) }),
      metrics.flatMap((m) => {
        const s = a.metrics[m] || {};
        const ci = s.ci95 ? ` [${fmt(s.ci95[0])}, ${fmt(s.ci95[1])}]` : "";
        const diff = s.diff === null || s.diff === undefined ? "–" : `${fmt(s.diff)} (p ${fmt(s.p_value)})`;
        return [el("td", { text: `${fmt(s.mean)}${ci} (n ${s.n ?? 0})` }), el("td", { text: diff })];
      }))));
  const plots = metrics.map((m) => intervalPlot(
    r.arms.map((a) => {
      const s = a.metrics[m] || {};
      return { label: a.name, mean: s.mean ?? null, lo: s.ci95 ? s.ci95[0] : null, hi: s.ci95 ? s.ci95[1] : null };
    }),
    { title: `${m}: mean and ${Math.round(r.confidence * 100)}% interval per arm` },
  ));
  holder.replaceChildren(
    el("div", { class: "hint", text: `version ${r.version} (${r.status}), control ${r.control}` }), table, ...plots);
}
