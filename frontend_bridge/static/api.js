// URLs for the service: relative to the page (works behind a path prefix) and carrying the page's ?token=.

const pageParams = new URLSearchParams(window.location.search);
const token = pageParams.get('token');

/** An absolute http(s) URL for an API path such as "api/health", with the token when one is set. */
export function apiUrl(path, params = {}) {
  const url = new URL(path, window.location.href);
  url.search = '';
  for (const [k, v] of Object.entries(params)) url.searchParams.set(k, String(v));
  if (token) url.searchParams.set('token', token);
  return url.toString();
}

/** The websocket URL of the full stream (/ws), on the page's host, with the token when one is set. */
export function wsUrl(path = 'ws') {
  const url = new URL(apiUrl(path));
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  return url.toString();
}

export class ApiError extends Error {
  constructor(status, detail) {
    super(`HTTP ${status}: ${detail}`);
    this.status = status;
    this.detail = detail;
  }
}

async function check(resp) {
  if (resp.ok) return resp;
  let detail = resp.statusText;
  try {
    const body = await resp.json();
    detail = typeof body.detail === 'string' ? body.detail : JSON.stringify(body.detail ?? body);
  } catch {
    // not JSON: keep the status text
  }
  throw new ApiError(resp.status, detail);
}

export async function getJson(path, params = {}, { signal } = {}) {
  const resp = await check(await fetch(apiUrl(path, params), { signal, cache: 'no-store' }));
  return resp.json();
}

/** POST a JSON body, return the response as a Blob (images). */
/** POST JSON, answer an image blob plus the response headers (e.g. how many frames went into it). */
export async function postForBlob(path, body, { signal } = {}) {
  const resp = await check(await fetch(apiUrl(path), {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
    signal,
  }));
  return { blob: await resp.blob(), headers: resp.headers };
}

export async function getBlob(path, params = {}, { signal } = {}) {
  const resp = await check(await fetch(apiUrl(path, params), { signal }));
  return resp.blob();
}
