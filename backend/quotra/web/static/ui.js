// Small DOM helpers: everything is built with text nodes, never from HTML strings.

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export const $ = (selector, root = document) => root.querySelector(selector);

// A message in the page's notice area (role=status, so screen readers hear it).
export function notify(text, kind = "info") {
  const box = $("#notice");
  box.className = `notice ${kind}`;
  box.textContent = text;
  box.hidden = !text;
}

export function clearNotice() {
  notify("");
}

export function usdc(text) {
  if (text === null || text === undefined) return "—";
  const [whole, frac = ""] = String(text).split(".");
  const trimmed = frac.replace(/0+$/, "").padEnd(2, "0");
  return `${whole}.${trimmed}`;
}

export function atomicToUsdc(atomic) {
  const value = BigInt(atomic);
  const whole = value / 1000000n;
  const frac = (value % 1000000n).toString().padStart(6, "0");
  return usdc(`${whole}.${frac}`);
}

export const short = (address) => (address ? `${address.slice(0, 6)}…${address.slice(-4)}` : "");

export function age(iso) {
  const seconds = Math.max(0, (Date.now() - new Date(iso).getTime()) / 1000);
  if (seconds < 3600) return `${Math.max(1, Math.round(seconds / 60))} min`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h`;
  return `${Math.round(seconds / 86400)} days`;
}

export const when = (iso) => (iso ? new Date(iso).toLocaleString() : "—");

export function badge(text, kind = "") {
  return el("span", { class: `badge ${kind}`, text });
}

// Runs `work` with the button disabled; any failure goes to the notice area.
export async function busy(button, work, explain) {
  button.disabled = true;
  try {
    return await work();
  } catch (error) {
    notify(explain(error), "error");
    return undefined;
  } finally {
    button.disabled = false;
  }
}

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
