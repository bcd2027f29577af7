// The API client the playground uses: JSON requests with the optional key,
// errors as `ApiError` (the server's `{error: {type, message, param}}`, a
// missing server as status 0), a job's Server-Sent Events read over `fetch`
// (EventSource cannot send `Authorization`), and images fetched as blobs for
// the same reason.

const KEY_STORAGE = "diffusiond.apiKey";

export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

function headers(extra = {}) {
  const h = { ...extra };
  const key = apiKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

/** A refused request: `status` 0 when the server could not be reached. */
export class ApiError extends Error {
  constructor(status, type, message, { param = null, retryAfter = null } = {}) {
    super(message);
    this.status = status;
    this.type = type;
    this.param = param;
    this.retryAfter = retryAfter;
  }
}

async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Not ours (a proxy's page): the status line must do.
  }
  const e = body && body.error ? body.error : {};
  const retry = Number.parseInt(response.headers.get("Retry-After") || "", 10);
  return new ApiError(response.status, e.type || `http_${response.status}`, e.message || `${response.status} ${response.statusText}`, {
    param: e.param || null,
    retryAfter: Number.isFinite(retry) ? retry : null,
  });
}

async function send(path, init) {
  try {
    return await fetch(path, init);
  } catch (err) {
    if (init.signal && init.signal.aborted) throw err;
    throw new ApiError(0, "unreachable", "The server cannot be reached (is it running?).");
  }
}

/** `method path` with an optional JSON body; the parsed JSON answer. */
export async function request(method, path, { body, prefer } = {}) {
  const extra = body === undefined ? {} : { "Content-Type": "application/json" };
  if (prefer) extra.Prefer = prefer;
  const response = await send(path, { method, headers: headers(extra), body: body === undefined ? undefined : JSON.stringify(body) });
  if (!response.ok) throw await failure(response);
  return parse(await response.text());
}

// Seeds are u64: past 2^53 a JS number would change them, so they stay digit
// strings where the browser exposes the source text (JSON.parse source access).
function parse(text) {
  return JSON.parse(text, (key, value, context) => (key === "seed" && context && typeof context.source === "string" ? context.source : value));
}

export const info = () => request("GET", "/info");
export const job = (id) => request("GET", `/jobs/${id}`);
export const cancel = (id) => request("POST", `/jobs/${id}/cancel`);
export const submit = (body) => request("POST", "/generate", { body, prefer: "respond-async" });

/** An image as an object URL (the caller revokes it). */
export async function imageUrl(path) {
  const response = await send(path, { headers: headers() });
  if (!response.ok) throw await failure(response);
  return URL.createObjectURL(await response.blob());
}

/**
 * Reads job `id`'s event stream, calling `onEvent(name, data)` per event, until
 * the stream ends or `signal` aborts. Resolves when the server closes it;
 * rejects (ApiError) when it cannot be opened or breaks off.
 */
export async function events(id, onEvent, signal) {
  const response = await send(`/jobs/${id}/events`, { headers: headers({ Accept: "text/event-stream" }), signal });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (err) {
      if (signal && signal.aborted) return;
      throw new ApiError(0, "unreachable", "The connection to the server was lost.");
    }
    if (chunk.done) return;
    buffer += chunk.value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      dispatch(buffer.slice(0, end), onEvent);
      buffer = buffer.slice(end + 2);
    }
  }
}

// One SSE block (WHATWG "Server-sent events", interpreting an event stream).
function dispatch(block, onEvent) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return;
  let parsed;
  try {
    parsed = JSON.parse(data.join("\n"));
  } catch {
    return;
  }
  onEvent(name, parsed);
}
