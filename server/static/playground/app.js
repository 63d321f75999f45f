// The playground shell: pages by URL hash, the keys, the served model's name.

import { getJSON, keys, model } from "./api.js";
import * as compare from "./compare.js";
import * as readout from "./readout.js";
import * as experiments from "./experiments.js";
import * as vectors from "./vectors.js";

const PAGES = { compare, readout, experiments, vectors };
const started = new Set();
let capabilities = null;

export async function caps() {
  if (!capabilities) capabilities = await getJSON("/v1/steering/capabilities");
  return capabilities;
}

async function show() {
  const name = (location.hash || "#compare").slice(1);
  const page = PAGES[name] ? name : "compare";
  for (const section of document.querySelectorAll(".page")) section.hidden = section.id !== `page-${page}`;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.page === page);
  const section = document.getElementById(`page-${page}`);
  if (!started.has(page)) {
    started.add(page);
    await PAGES[page].start(section, { caps });
  } else if (PAGES[page].shown) {
    await PAGES[page].shown(section);
  }
  section.dataset.ready = "true";
}

function bindKeys() {
  const api = document.getElementById("api-key");
  const admin = document.getElementById("admin-key");
  api.value = keys.api;
  admin.value = keys.admin;
  api.addEventListener("change", () => { keys.api = api.value; });
  admin.addEventListener("change", () => { keys.admin = admin.value; });
}

bindKeys();
model().then((m) => { document.getElementById("model-name").textContent = m; }).catch(() => {});
window.addEventListener("hashchange", show);
show();
