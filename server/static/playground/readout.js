// Readout: the generated text with each token coloured by a probe's projection at one
// layer, a tokens x layers heatmap, and the probe's mean value per layer.
// A probe is a registered residual vector read at each of its layers (readout entries
// {"name", "layer"}); requests take at most `max_entries` of them, so more layers are read
// by repeating the greedy request (same tokens) with the next layers.

import { getJSON, model, postJSON } from "./api.js";
import { linePlot } from "./plots.js";
import { diverging, el, fmt, guarded } from "./ui.js";

let vectors = [];
let last = null; // {tokens, layers, values: {layer: [per token]}}

export async function start(page, { caps }) {
  const [list, capabilities] = await Promise.all([getJSON("/v1/vectors").catch(() => ({ data: [] })), caps()]);
  vectors = list.data.filter((v) => v.usable && v.site === "residual");
  const probe = page.querySelector("#readout-probe");
  probe.replaceChildren(...vectors.map((v) => el("option", { value: v.id, text: v.id })));
  const limit = capabilities.fields && capabilities.fields.readout ? capabilities.fields.readout.max_entries : 0;
  const run = page.querySelector("#readout-run");
  if (!limit) {
    run.disabled = true;
    run.title = "readout is off on this server (steerserve serve --enable-steering-readout)";
  }
  run.addEventListener("click", () => guarded(page, run, () => read(page, limit)));
  page.querySelector("#readout-layer").addEventListener("change", () => render(page));
}

function probeLayers(name) {
  const v = vectors.find((x) => x.id === name);
  return v ? v.layers : [];
}

async function read(page, limit) {
  const name = page.querySelector("#readout-probe").value;
  const layers = probeLayers(name);
  if (!layers.length) throw new Error("pick a probe: no registered residual vector is selected");
  const text = page.querySelector("#readout-spec").value.trim();
  let base = {};
  if (text) {
    try {
      base = JSON.parse(text);
    } catch (err) {
      throw new Error(`steering: the spec is not valid JSON (${err.message})`);
    }
  }
  const values = {};
  let tokens = null;
  for (let i = 0; i < layers.length; i += limit) {
    const chunk = layers.slice(i, i + limit);
    const steering = { ...base, readout: [...(base.readout || []), ...chunk.map((layer) => ({ name, layer }))] };
    const r = await postJSON("/v1/chat/completions", {
      model: await model(),
      messages: [{ role: "user", content: page.querySelector("#readout-prompt").value }],
      max_tokens: Number(page.querySelector("#readout-max-tokens").value),
      temperature: 0,
      logprobs: true,
      steering,
    });
    const choice = r.choices[0];
    const got = (choice.logprobs && choice.logprobs.content || []).map((t) => t.token);
    if (tokens === null) tokens = got;
    for (const entry of choice.readout || []) {
      if (entry.name === name) values[entry.layer] = entry.values;
    }
  }
  last = { name, tokens, layers, values };
  const select = page.querySelector("#readout-layer");
  const keep = select.value;
  select.replaceChildren(...layers.map((l) => el("option", { value: l, text: `layer ${l}` })));
  const kept = keep !== "" && layers.includes(Number(keep));
  select.value = kept ? keep : String(layers[Math.floor(layers.length / 2)]);
  render(page);
}

function render(page) {
  if (!last) return;
  const { name, tokens, layers, values } = last;
  const all = layers.flatMap((l) => (values[l] || []).filter((v) => v !== null));
  const scale = Math.max(1e-9, ...all.map(Math.abs));
  const layer = Number(page.querySelector("#readout-layer").value);
  const row = values[layer] || [];
  page.querySelector("#readout-tokens").replaceChildren(
    ...tokens.map((t, i) => el("span", {
      class: "tok", text: t, title: `${name} @ layer ${layer}: ${fmt(row[i])}`,
      style: `background:${diverging(row[i], scale)}`, "data-value": row[i] ?? "",
    })),
  );
  page.querySelector("#readout-legend").textContent =
    `${name} projection at layer ${layer}: blue < 0 < red, full colour at |${fmt(scale, 2)}|`;
  const table = el("table", { class: "heatmap" },
    el("tr", {}, el("th", { text: "layer" }), tokens.map((t) => el("th", { text: t }))),
    layers.map((l) => el("tr", { "data-layer": l }, el("th", { text: String(l) }),
      tokens.map((_, i) => {
        const v = (values[l] || [])[i];
        return el("td", { class: "cell", title: `layer ${l}, token ${i}: ${fmt(v)}`, style: `background:${diverging(v, scale)}` });
      }))));
  page.querySelector("#readout-heatmap").replaceChildren(table);
  const mean = layers.map((l) => {
    const xs = (values[l] || []).filter((v) => v !== null);
    return xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : null;
  });
  page.querySelector("#readout-plot").replaceChildren(
    linePlot(layers, mean, { xLabel: "layer", yLabel: `mean ${name} projection over generated tokens` }),
  );
}
