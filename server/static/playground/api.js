// The server's public routes, with the keys typed into the page (localStorage).
// Every non-2xx answer becomes an ApiError carrying the server's OpenAI-shaped message.

export class ApiError extends Error {
  constructor(status, message, param) {
    super(message);
    this.status = status;
    this.param = param;
  }
}

export const keys = {
  get api() { return localStorage.getItem("steerserve.apiKey") || ""; },
  set api(v) { localStorage.setItem("steerserve.apiKey", v); },
  get admin() { return localStorage.getItem("steerserve.adminKey") || ""; },
  set admin(v) { localStorage.setItem("steerserve.adminKey", v); },
};

function headers(admin, extra = {}) {
  const key = admin ? keys.admin : keys.api;
  return key ? { Authorization: `Bearer ${key}`, ...extra } : { ...extra };
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  let param = null;
  try {
    const body = await response.json();
    const err = body.error || body;
    if (err.message) message = err.message;
    else if (body.detail) message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    param = err.param || null;
  } catch (_) { /* not JSON: keep the status line */ }
  return new ApiError(response.status, message, param);
}

export async function request(method, path, { body, admin = false, raw = false, contentType } = {}) {
  const init = { method, headers: headers(admin) };
  if (body !== undefined) {
    if (raw) {
      init.body = body;
      init.headers["Content-Type"] = contentType || "application/octet-stream";
    } else {
      init.body = JSON.stringify(body);
      init.headers["Content-Type"] = "application/json";
    }
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  return response;
}

export async function getJSON(path, opts) {
  return (await request("GET", path, opts)).json();
}

export async function postJSON(path, body, opts = {}) {
  return (await request("POST", path, { ...opts, body })).json();
}

// POST a streamed completion; calls onEvent(chunk) for every `data:` event but [DONE].
export async function stream(path, body, onEvent) {
  const response = await request("POST", path, { body: { ...body, stream: true } });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event.error) throw new ApiError(event.error.code || 400, event.error.message, event.error.param);
        onEvent(event);
      }
    }
  }
}

let cachedModel = null;
export async function model() {
  if (!cachedModel) cachedModel = (await getJSON("/v1/models")).data[0].id;
  return cachedModel;
}
