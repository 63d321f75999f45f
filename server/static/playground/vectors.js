// Vectors: the registry, upload (GGUF control vector or safetensors), download, delete.
// Writes need the admin key; reads the API key.

import { getJSON, request } from "./api.js";
import { el, guarded } from "./ui.js";

export async function start(page) {
  page.querySelector("#vector-upload").addEventListener("submit", (e) => {
    e.preventDefault();
    guarded(page, e.submitter, () => upload(page));
  });
  await guarded(page, null, () => list(page));
}

export async function shown(page) {
  await guarded(page, null, () => list(page));
}

function notice(page, text) {
  const box = page.querySelector('[data-testid="notice"]');
  box.textContent = text;
  box.hidden = !text;
}

async function list(page) {
  const body = await getJSON("/v1/vectors");
  const tbody = page.querySelector("#vectors-table tbody");
  tbody.replaceChildren(...body.data.map((v) => el("tr", { "data-name": v.id },
    el("td", { text: v.id }),
    el("td", { text: v.site }),
    el("td", { text: v.layers.join(", ") }),
    el("td", { text: v.method || "" }),
    el("td", { text: v.usable ? "yes" : `no: ${v.problem}` }),
    el("td", {},
      el("button", { text: "safetensors", onclick: () => guarded(page, null, () => download(v.id, "safetensors")) }),
      el("button", { text: "gguf", onclick: () => guarded(page, null, () => download(v.id, "gguf")) })),
    el("td", {}, el("button", {
      text: "delete", "data-testid": "delete",
      onclick: () => guarded(page, null, () => remove(page, v.id)),
    })))));
}

async function upload(page) {
  notice(page, "");
  const file = page.querySelector("#vector-file").files[0];
  if (!file) throw new Error("file: choose a .gguf or .safetensors vector file");
  const typed = page.querySelector("#vector-name").value.trim();
  const name = typed || file.name.replace(/\.(gguf|safetensors)$/i, "");
  const r = await request("PUT", `/v1/vectors/${encodeURIComponent(name)}`, {
    body: await file.arrayBuffer(), raw: true, admin: true,
  });
  const v = await r.json();
  notice(page, `${v.replaced ? "replaced" : "stored"} vector ${v.id} (layers ${v.layers.join(", ")})`);
  await list(page);
}

async function download(name, format) {
  const r = await request("GET", `/v1/vectors/${encodeURIComponent(name)}?format=${format}`);
  const url = URL.createObjectURL(await r.blob());
  const a = el("a", { href: url, download: `${name}.${format}` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

async function remove(page, name) {
  notice(page, "");
  await request("DELETE", `/v1/vectors/${encodeURIComponent(name)}`, { admin: true });
  notice(page, `deleted vector ${name}`);
  await list(page);
}
