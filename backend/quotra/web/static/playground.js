// A chat with one listing: streaming, markdown rendered safely, the free calls counted down, and
// then each call paid from the wallet with x402 (a signed USDC authorization; no ETH needed).
import { ApiError, api, explain, request } from "./api.js";
import { start } from "./layout.js";
import { renderMarkdown } from "./markdown.js";
import { $, atomicToUsdc, badge, el, notify, sleep, usdc } from "./ui.js";
import * as wallet from "./wallet.js";
import * as x402 from "./x402.js";

const FINAL = new Set(["settled", "failed", "voided", "refunded"]);
const history = [];
let listings = [];
let offer = null; // the x402 requirement from the last 402 of this listing

const ctx = await start("playground");

function current() {
  return listings.find((l) => l.id === $("#listing").value);
}

function showListing() {
  const listing = current();
  history.length = 0;
  offer = null;
  $("#chat").replaceChildren();
  $("#pay").hidden = true;
  if (!listing) return;
  $("#model").replaceChildren(...listing.models.map((m) => el("option", { value: m, text: m })));
  $("#price").textContent = `then ${usdc(listing.price_per_call)} USDC per call`;
  refreshFreeCalls();
}

async function refreshFreeCalls() {
  const listing = current();
  if (!listing) return;
  const free = await api("/v1/playground");
  const left = Math.max(0, free.free_calls_per_listing - (free.used[listing.id] || 0));
  const box = $("#free-calls");
  box.textContent = `${left} of ${free.free_calls_per_listing} free calls left`;
  box.className = left > 0 ? "badge ok" : "badge warn";
}

function addMessage(role, text) {
  const body = el("div", { class: "body" });
  const node = el("div", { class: `message ${role}` }, body, el("div", { class: "meta" }));
  if (role === "user") body.textContent = text;
  $("#chat").append(node);
  return node;
}

async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) !== -1) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function answer(response, node, stream) {
  const body = node.querySelector(".body");
  let text = "";
  let payment = null;
  if (stream) {
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message || "The stream failed");
      if (chunk.quotra) payment = chunk.quotra;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        text += delta.content;
        renderMarkdown(body, text);
      }
    }
  } else {
    const completion = await response.json();
    text = completion.choices[0].message.content || "";
    payment = x402.responseOf(response);
  }
  renderMarkdown(body, text);
  return { text, payment };
}

async function pay() {
  await ctx.ready();
  const typed = x402.authorization(offer, wallet.state.account);
  const signature = await wallet.signTypedData(ctx.network, typed);
  return x402.paymentHeader(offer, typed, signature);
}

async function send(paid) {
  const listing = current();
  const stream = $("#stream").checked;
  const headers = {};
  const payment = paid ? await pay() : null;
  if (payment) headers[x402.SIGNATURE] = payment;
  const response = await request("/v1/chat/completions", {
    method: "POST",
    headers,
    body: { model: `listing/${listing.id}/${$("#model").value}`, messages: history, stream },
  });
  if (response.status === 402) {
    const body = await response.json().catch(() => null);
    offer = x402.offerOf(response, ctx.network);
    if (!offer) throw new ApiError(response, body);
    $("#pay-text").textContent = paid
      ? `The payment was refused: ${body.error.message}`
      : `${body.error.message.split(" Further")[0]} Each call now costs ${atomicToUsdc(offer.amount)} USDC, ` +
        "paid from your wallet: you sign a USDC authorization, the relay settles it (no ETH needed).";
    $("#pay-button").textContent = `Pay ${atomicToUsdc(offer.amount)} USDC from my wallet and send`;
    $("#pay").hidden = false;
    return;
  }
  if (!response.ok) throw new ApiError(response, await response.json().catch(() => null));
  $("#pay").hidden = true;
  const callId = response.headers.get("Quotra-Call-Id");
  const node = addMessage("assistant", "");
  const result = await answer(response, node, stream);
  history.push({ role: "assistant", content: result.text });
  const meta = node.querySelector(".meta");
  meta.append(el("span", { class: "mono", text: callId || "" }), " · ");
  if (payment) {
    meta.append(badge(`paid ${atomicToUsdc(offer.amount)} USDC`, "ok"));
    track(callId, result.payment, payment);
  } else {
    meta.append(badge("free call"));
  }
  await refreshFreeCalls();
}

// The receipt, then the settlement as GET /v1/calls/{id} reports it until the money is final.
async function track(callId, payment, paymentHeader) {
  $("#receipt").hidden = false;
  $("#receipt-call").textContent = callId;
  $("#receipt-amount").textContent = `${atomicToUsdc(payment.amount)} USDC`;
  $("#receipt-payer").textContent = payment.payer;
  $("#receipt-tx").textContent = "—";
  const status = $("#receipt-status");
  status.replaceChildren(badge(payment.status || "pending", "warn"));
  for (let i = 0; i < 240; i += 1) {
    let call;
    try {
      call = await api(`/v1/calls/${callId}`, { headers: { [x402.SIGNATURE]: paymentHeader } });
    } catch (error) {
      status.replaceChildren(badge("unknown", "bad"), ` ${explain(error)}`);
      return;
    }
    status.replaceChildren(badge(call.state, call.state === "settled" ? "ok" : FINAL.has(call.state) ? "bad" : "warn"));
    if (call.transaction) $("#receipt-tx").textContent = call.transaction;
    if (FINAL.has(call.state)) return;
    await sleep(1000);
  }
}

async function submit(event) {
  event.preventDefault();
  const text = $("#prompt").value.trim();
  if (!text) return;
  history.push({ role: "user", content: text });
  addMessage("user", text);
  $("#prompt").value = "";
  await run(() => send($("#paying").checked && offer !== null));
}

async function run(work) {
  $("#send").disabled = true;
  $("#pay-button").disabled = true;
  notify("");
  try {
    await work();
  } catch (error) {
    notify(explain(error), "error");
  } finally {
    $("#send").disabled = false;
    $("#pay-button").disabled = false;
  }
}

$("#pay-button").addEventListener("click", () =>
  run(async () => {
    $("#paying-label").hidden = false;
    $("#paying").checked = true;
    await send(true);
  }),
);
$("#prompt-form").addEventListener("submit", submit);
$("#listing").addEventListener("change", showListing);
ctx.onSession(refreshFreeCalls);

try {
  listings = (await api("/v1/listings?limit=200")).data;
  const wanted = new URLSearchParams(location.search).get("listing");
  $("#listing").replaceChildren(
    ...listings.map((l) =>
      el("option", { value: l.id, selected: l.id === wanted, text: `${l.models.join(", ")} · ${usdc(l.price_per_call)} USDC · ${l.id}` }),
    ),
  );
  if (!listings.length) notify("No listing is live yet.", "warn");
  showListing();
  $("#send").disabled = !listings.length; // nothing to send to until the listings are in
} catch (error) {
  notify(explain(error), "error");
}
