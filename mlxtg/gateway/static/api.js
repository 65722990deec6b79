// Calls to this server's own routes, with the API key as a Bearer token when one is set.
// The key stays in this browser (sessionStorage, or localStorage when remembered); the
// server stores nothing for the page.

const KEY = "mlxtg.apiKey";

export function getKey() {
  return sessionStorage.getItem(KEY) || localStorage.getItem(KEY) || "";
}

export function setKey(key, remember) {
  forgetKey();
  (remember ? localStorage : sessionStorage).setItem(KEY, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY);
  localStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

let unauthorized = () => {};

/** Called on any 401: the page asks for the key again. */
export function onUnauthorized(callback) {
  unauthorized = callback;
}

// The page lives at /ui/: "../admin/status" is this server's /admin/status, also when a
// reverse proxy serves it under a path prefix.
const url = (path) => new URL(`../${path}`, location.href);

/** fetch() with the key; a non-2xx answer becomes an ApiError with the server's message. */
export async function request(path, { method = "GET", body, signal } = {}) {
  const headers = {};
  const key = getKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json"; // admin POSTs need it
  let response;
  try {
    response = await fetch(url(path), {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, `The server did not answer (${err.message}).`);
  }
  if (response.status === 401) unauthorized();
  if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
  return response;
}

export const getJSON = async (path) => (await request(path)).json();
export const getText = async (path) => (await request(path)).text();
export const postJSON = async (path, body) =>
  (await request(path, { method: "POST", body })).json();

/** The message of an error body in any of the server's shapes (OpenAI, Anthropic, plain). */
async function errorMessage(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    const message = body?.error?.message ?? body?.message ?? body?.detail;
    if (message) return `${response.status}: ${message}`;
  } catch {
    // not JSON: the text itself
  }
  return `${response.status}: ${text || response.statusText}`;
}
