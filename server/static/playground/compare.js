// Compare: one prompt, several columns, each its own spec (the `variants` API), streamed
// side by side. Each column's pickers write its JSON spec; the JSON is what is sent, so it
// can be edited by hand too.

import { getJSON, model, stream } from "./api.js";
import { el, guarded, showError } from "./ui.js";

let registry = { vectors: [], presets: [], saes: [], caps: null };
const columns = [];

export async function start(page, { caps }) {
  const [vectors, presets, saes, capabilities] = await Promise.all([
    getJSON("/v1/vectors").catch(() => ({ data: [] })),
    getJSON("/v1/presets").catch(() => ({ data: [] })),
    getJSON("/v1/saes").catch(() => ({ data: [] })),
    caps().catch(() => null),
  ]);
  registry = {
    vectors: vectors.data.filter((v) => v.usable && v.site === "residual"),
    presets: presets.data,
    saes: saes.data.filter((s) => s.usable),
    caps: capabilities,
  };
  const holder = page.querySelector("#compare-columns");
  addColumn(holder, null);
  const first = registry.vectors.find((v) => v.id === "positive") || registry.vectors[0];
  addColumn(holder, first ? { vectors: [{ name: first.id, scale: 1.0 }] } : null);
  page.querySelector("#compare-add").addEventListener("click", () => addColumn(holder, null));
  const run = page.querySelector("#compare-run");
  run.addEventListener("click", () => guarded(page, run, () => runAll(page)));
}

function specOf(column, index) {
  const text = column.json.value.trim();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new Error(`column ${index + 1}: the spec is not valid JSON (${err.message})`);
  }
}

function requestBody(page, extra) {
  return {
    messages: [{ role: "user", content: page.querySelector("#compare-prompt").value }],
    max_tokens: Number(page.querySelector("#compare-max-tokens").value),
    temperature: Number(page.querySelector("#compare-temperature").value),
    seed: Number(page.querySelector("#compare-seed").value),
    ...extra,
  };
}

async function runAll(page) {
  const variants = columns.map((c, i) => specOf(c, i));
  for (const c of columns) {
    c.output.textContent = "";
    c.echo.textContent = "";
  }
  const body = requestBody(page, { model: await model(), variants });
  await stream("/v1/chat/completions", body, (event) => {
    if (event.steering && event.steering.variants) {
      for (const v of event.steering.variants) {
        const c = columns[v.index];
        if (c) c.echo.textContent = v.fingerprint ? `fingerprint ${v.fingerprint}` : "unsteered";
      }
    }
    for (const choice of event.choices || []) {
      const c = columns[choice.index];
      const text = choice.delta && choice.delta.content;
      if (c && text) c.output.textContent += text;
    }
  });
  for (const c of columns) c.output.dataset.done = "true";
}

// --- one column ------------------------------------------------------------------------

function addColumn(holder, initial) {
  const column = { vectors: [], features: [], heads: [], preset: "", decoding: "" };
  const index = columns.length;
  const json = el("textarea", { class: "json", rows: 6, spellcheck: "false", "data-testid": "spec" });
  const output = el("div", { class: "output", "data-testid": "output" });
  const echo = el("div", { class: "hint", "data-testid": "echo" });
  const snippet = el("textarea", { class: "snippet", rows: 7, readonly: true, hidden: true, "data-testid": "snippet" });
  const lists = { vectors: el("div"), features: el("div"), heads: el("div") };
  const write = () => {
    const spec = pickedSpec(column);
    json.value = spec ? JSON.stringify(spec, null, 1) : "";
  };
  column.write = write;

  const preset = el("select", { onchange: () => { column.preset = preset.value; write(); } },
    el("option", { value: "", text: "(no preset)" }),
    registry.presets.map((p) => el("option", { value: p.id, text: p.id })));
  const decodingModes = registry.caps && registry.caps.fields && registry.caps.fields.decoding
    ? registry.caps.fields.decoding.modes : [];
  const decoding = el("select", { "data-testid": "decoding", onchange: () => { column.decoding = decoding.value; write(); } },
    el("option", { value: "", text: "plain decoding" }),
    decodingModes.map((m) => el("option", { value: m, text: m })));

  const node = el("div", { class: "column", "data-testid": "column" },
    el("h3", {}, `Column ${index + 1}`, el("button", {
      text: "remove", onclick: () => {
        const i = columns.indexOf(column);
        if (i >= 0) columns.splice(i, 1);
        node.remove();
      },
    })),
    el("div", { class: "picker" }, el("div", { class: "item" }, "preset", preset, "decoding", decoding)),
    el("div", { class: "picker" }, "vectors", lists.vectors,
      el("button", { text: "+ vector", "data-testid": "add-vector", onclick: () => addVector(column, lists.vectors, {}) })),
    el("div", { class: "picker" }, "SAE features", lists.features,
      el("button", { text: "+ feature", "data-testid": "add-feature", onclick: () => addFeature(column, lists.features, {}) })),
    el("div", { class: "picker" }, "head masks", lists.heads,
      el("button", { text: "+ head mask", "data-testid": "add-head", onclick: () => addHead(column, lists.heads, {}) })),
    el("div", { class: "picker" }, "spec (JSON, sent as is)", json),
    el("div", { class: "item" },
      el("button", { text: "copy as curl", "data-testid": "copy-curl", onclick: () => showSnippet(column, "curl") }),
      el("button", { text: "copy as OpenAI SDK", "data-testid": "copy-python", onclick: () => showSnippet(column, "python") })),
    snippet, echo, output);
  Object.assign(column, { json, output, echo, snippet, node });
  columns.push(column);
  holder.append(node);
  for (const v of (initial && initial.vectors) || []) addVector(column, lists.vectors, v);
  write();
}

function pickedSpec(column) {
  const spec = {};
  if (column.preset) spec.preset = column.preset;
  const vectors = column.vectors.map((r) => r.value()).filter(Boolean);
  const features = column.features.map((r) => r.value()).filter(Boolean);
  const heads = column.heads.map((r) => r.value()).filter(Boolean);
  if (vectors.length) spec.vectors = vectors;
  if (features.length) spec.features = features;
  if (heads.length) spec.heads = heads;
  if (column.decoding) spec.decoding = { mode: column.decoding };
  return Object.keys(spec).length ? spec : null;
}

function removable(column, kind, list, node, row) {
  column[kind].push(row);
  list.append(node);
  node.append(el("button", {
    text: "×", title: "remove", onclick: () => {
      column[kind].splice(column[kind].indexOf(row), 1);
      node.remove();
      column.write();
    },
  }));
}

function addVector(column, list, initial) {
  const name = el("select", { "data-testid": "vector-name" },
    registry.vectors.map((v) => el("option", { value: v.id, text: v.id, selected: v.id === initial.name })));
  const scale = el("input", { type: "range", min: -4, max: 4, step: 0.1, value: initial.scale ?? 1, "data-testid": "vector-scale" });
  const shown = el("span", { text: Number(scale.value).toFixed(1) });
  const row = { value: () => (name.value ? { name: name.value, scale: Number(scale.value) } : null) };
  for (const input of [name, scale]) {
    input.addEventListener("input", () => { shown.textContent = Number(scale.value).toFixed(1); column.write(); });
  }
  removable(column, "vectors", list, el("div", { class: "item" }, name, "scale", scale, shown), row);
  column.write();
}

function featureOptions(sae) {
  const labels = (sae && sae.labels) || {};
  return Object.entries(labels).map(([f, label]) => el("option", { value: f, text: `${f} ${label}` }));
}

function addFeature(column, list, initial) {
  if (!registry.saes.length) {
    showError(column.node.closest(".page"), new Error("this server has no SAEs registered (--saes-dir)"));
    return;
  }
  const sae = el("select", {}, registry.saes.map((s) => el("option", { value: s.id, text: `${s.id} (layer ${s.layer})` })));
  const feature = el("input", { type: "number", min: 0, value: initial.feature ?? 0, list: "" });
  const labelled = el("select", { "data-testid": "feature-label" }, el("option", { value: "", text: "(labelled features)" }));
  const refill = () => {
    const s = registry.saes.find((x) => x.id === sae.value);
    labelled.replaceChildren(el("option", { value: "", text: "(labelled features)" }), ...featureOptions(s));
  };
  const op = el("select", {}, ["clamp", "add", "scale"].map((o) => el("option", { value: o, text: o })));
  const amount = el("input", { type: "number", step: 0.5, value: initial.value ?? 10 });
  const row = {
    value: () => {
      const f = { sae: sae.value, feature: Number(feature.value), op: op.value };
      if (op.value === "clamp") f.value = Number(amount.value);
      else if (op.value === "add") f.scale = Number(amount.value);
      else f.factor = Number(amount.value);
      return f;
    },
  };
  sae.addEventListener("change", () => { refill(); column.write(); });
  labelled.addEventListener("change", () => { if (labelled.value) feature.value = labelled.value; column.write(); });
  for (const input of [feature, op, amount]) input.addEventListener("input", () => column.write());
  refill();
  removable(column, "features", list, el("div", { class: "item" }, sae, labelled, "#", feature, op, amount), row);
  column.write();
}

function addHead(column, list, initial) {
  const layer = el("input", { type: "number", min: 0, value: initial.layer ?? 0 });
  const heads = el("input", { type: "text", value: initial.heads ?? "0", placeholder: "0,2" });
  const scale = el("input", { type: "number", step: 0.1, value: initial.scale ?? 0 });
  const row = {
    value: () => ({
      layer: Number(layer.value),
      heads: heads.value.split(",").map((h) => h.trim()).filter((h) => h !== "").map(Number),
      scale: Number(scale.value),
    }),
  };
  for (const input of [layer, heads, scale]) input.addEventListener("input", () => column.write());
  removable(column, "heads", list, el("div", { class: "item" }, "layer", layer, "heads", heads, "scale", scale), row);
  column.write();
}

// --- snippets --------------------------------------------------------------------------

async function showSnippet(column, kind) {
  const page = column.node.closest(".page");
  let spec;
  try {
    spec = specOf(column, columns.indexOf(column));
  } catch (err) {
    showError(page, err);
    return;
  }
  const body = requestBody(page, { model: await model() });
  const base = location.origin;
  let text;
  if (kind === "curl") {
    const full = spec ? { ...body, steering: spec } : body;
    text = `curl ${base}/v1/chat/completions \\\n  -H 'Content-Type: application/json' \\\n  -H "Authorization: Bearer $STEERSERVE_API_KEY" \\\n  -d '${JSON.stringify(full).replaceAll("'", "'\\''")}'`;
  } else {
    const extra = spec ? `,\n    extra_body={"steering": ${python(spec)}},` : ",";
    text = [
      "from openai import OpenAI",
      "",
      `client = OpenAI(base_url="${base}/v1", api_key="EMPTY")`,
      "r = client.chat.completions.create(",
      `    model=${JSON.stringify(body.model)},`,
      `    messages=${python(body.messages)},`,
      `    max_tokens=${body.max_tokens}, temperature=${body.temperature}, seed=${body.seed}${extra}`,
      ")",
      "print(r.choices[0].message.content)",
    ].join("\n");
  }
  column.snippet.value = text;
  column.snippet.hidden = false;
  if (navigator.clipboard && window.isSecureContext) navigator.clipboard.writeText(text).catch(() => {});
}

// A JSON value as a Python literal (True/False/None; strings JSON-escaped, which Python reads).
function python(value) {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (Array.isArray(value)) return `[${value.map(python).join(", ")}]`;
  if (typeof value === "object") {
    return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${python(v)}`).join(", ")}}`;
  }
  return JSON.stringify(value);
}
