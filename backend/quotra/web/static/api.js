// The relay's API, same origin. The session is an HttpOnly cookie the page never sees; every
// request says it comes from the page (Quotra-Web), which the relay requires of state-changing
// requests signed in by cookie (CSRF).

export class ApiError extends Error {
  constructor(response, body) {
    const error = body && typeof body.error === "object" ? body.error : {};
    super(error.message || `${response.status} ${response.statusText}`);
    this.status = response.status;
    this.code = error.code || null;
    this.type = error.type || null;
    this.body = body;
    this.headers = response.headers;
    const retry = Number.parseInt(response.headers.get("Retry-After") || "", 10);
    this.retryAfter = Number.isFinite(retry) ? retry : null;
  }
}

export async function request(path, { method = "GET", body, headers = {} } = {}) {
  const init = { method, credentials: "same-origin", headers: { "Quotra-Web": "1", ...headers } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  return fetch(path, init);
}

export async function api(path, options = {}) {
  const response = await request(path, options);
  if (response.status === 204) return null;
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response, data);
  return data;
}

// A sentence for a person, for every way a request can fail.
export function explain(error) {
  if (!(error instanceof ApiError)) {
    if (error && typeof error.code === "number") return walletMessage(error);
    if (error instanceof TypeError) return "The relay could not be reached. Check your connection and try again.";
    return (error && error.message) || String(error);
  }
  const retry = error.retryAfter !== null ? ` Try again in ${error.retryAfter} s.` : "";
  switch (error.status) {
    case 401:
      return error.code === "invalid_session"
        ? "Your session has expired: sign in again with your wallet."
        : `Sign in with your wallet first. (${error.message})`;
    case 402:
      return `Payment needed: ${error.message}`;
    case 403:
      return `Not allowed: ${error.message}`;
    case 404:
      return error.message;
    case 409:
      return `Already done: ${error.message}`;
    case 429:
      return error.type === "insufficient_quota"
        ? `This listing cannot take more calls: ${error.message}`
        : `Too many requests.${retry || " Wait a moment and try again."} (${error.message})`;
    case 502:
      return `The model's upstream failed: ${error.message}`;
    case 503:
      return `Temporarily unavailable.${retry} ${error.message}`;
    default:
      return error.message;
  }
}

function walletMessage(error) {
  if (error.code === 4001) return "You declined the request in your wallet.";
  if (error.code === 4100) return "The wallet has not authorized this site: connect it first.";
  if (error.code === 4902) return "Your wallet does not know this network yet.";
  if (error.code === -32002) return "Your wallet already has a request waiting: open it.";
  return `Wallet: ${error.message || error.code}`;
}
