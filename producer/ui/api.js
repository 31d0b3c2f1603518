// Calls to the sdq API with the key in the Authorization header (never in a URL).

const KEY = "sdq.key";

export const key = {
  get: () => localStorage.getItem(KEY) || "",
  set: (value) => localStorage.setItem(KEY, value),
  forget: () => localStorage.removeItem(KEY),
};

const LABELS = {
  400: "Invalid request",
  401: "No API key",
  403: "Key refused",
  404: "Not found",
  409: "Conflict",
  413: "Request too large",
  429: "Refused",
};

/** An API answer that was not a success, as a user should read it. */
export class ApiError extends Error {
  constructor(status, message, retryAfter) {
    const label = LABELS[status] || (status >= 500 ? "Server error" : "Error");
    const wait = retryAfter ? ` Retry in ${retryAfter} s.` : "";
    super(`${status} ${label}: ${message}${wait}`);
    this.status = status;
  }
}

async function failure(response) {
  let message = response.statusText || "request failed";
  try {
    const body = await response.json();
    if (body && typeof body.message === "string") message = body.message;
  } catch {
    // Not JSON (a proxy's page): the status line says what there is to say.
  }
  return new ApiError(response.status, message, response.headers.get("Retry-After"));
}

async function send(method, path, body, extra = {}) {
  const headers = { Authorization: key.get(), ...extra.headers };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: extra.signal,
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new Error(`Could not reach the API: ${error.message}`);
  }
  if (!response.ok) throw await failure(response);
  return response;
}

export const get = async (path) => (await send("GET", path)).json();
export const post = async (path, body) => (await send("POST", path, body)).json();

/** Parses one server-sent event block into {event, id, data}. */
function parse(block) {
  const event = { event: "message", id: null, data: "" };
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue; // a keep-alive comment
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "data") event.data += (event.data ? "\n" : "") + value;
    else if (field === "event" || field === "id") event[field] = value;
  }
  return event;
}

/** A job's event stream, read with fetch() since EventSource cannot send a header. */
export async function* events(path, { signal, lastId } = {}) {
  const headers = { Accept: "text/event-stream" };
  if (lastId) headers["Last-Event-ID"] = lastId;
  const response = await send("GET", path, undefined, { headers, signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    const blocks = buffer.split("\n\n");
    buffer = blocks.pop();
    for (const block of blocks) {
      const event = parse(block);
      if (event.data) yield event;
    }
  }
}
