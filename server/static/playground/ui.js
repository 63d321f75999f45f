// Small DOM helpers shared by the pages.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

// The page's error box shows the API's message (it names the offending field).
export function showError(page, err) {
  const box = page.querySelector('[data-testid="error"]');
  const status = err && err.status ? `${err.status}: ` : "";
  box.textContent = status + (err && err.message ? err.message : String(err));
  box.hidden = false;
}

export function clearError(page) {
  const box = page.querySelector('[data-testid="error"]');
  box.textContent = "";
  box.hidden = true;
}

// Runs an async action with the page's error box and a busy button.
export async function guarded(page, button, action) {
  clearError(page);
  if (button) button.disabled = true;
  try {
    return await action();
  } catch (err) {
    showError(page, err);
    return undefined;
  } finally {
    if (button) button.disabled = false;
  }
}

// Diverging colour for a value in [-scale, scale]: blue below zero, red above.
export function diverging(value, scale) {
  if (value === null || value === undefined || Number.isNaN(value)) return "#eee";
  const t = Math.max(-1, Math.min(1, scale > 0 ? value / scale : 0));
  const a = Math.abs(t);
  const [r, g, b] = t >= 0 ? [214, 39, 40] : [31, 119, 180];
  const mix = (c) => Math.round(255 + (c - 255) * a);
  return `rgb(${mix(r)}, ${mix(g)}, ${mix(b)})`;
}

export function fmt(x, digits = 3) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}
