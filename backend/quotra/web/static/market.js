// Browse: live listings with their price, quota, the caller's free calls and the provider's
// record (from the relay's own call records), filtered and sorted as GET /v1/listings allows.
import { api, explain } from "./api.js";
import { start } from "./layout.js";
import { $, age, badge, el, notify, usdc } from "./ui.js";

function record(provider) {
  if (!provider) return el("div", { class: "small muted provider-record", text: "New provider" });
  const since = `listing for ${age(provider.first_listed_at)}`;
  if (provider.calls_served + provider.upstream_failures === 0) {
    return el("div", { class: "small muted provider-record", text: `No calls served yet · ${since}` });
  }
  const rate = provider.success_rate === null ? "—" : `${(provider.success_rate * 100).toFixed(1)}%`;
  const latency = provider.median_latency_ms === null ? "—" : `${provider.median_latency_ms} ms`;
  return el(
    "div",
    { class: "small muted provider-record" },
    `${provider.calls_served} calls served · ${rate} success · median ${latency} · ${since}`,
  );
}

function card(listing, provider, freeLeft) {
  const tokens =
    listing.price_input_per_mtok || listing.price_output_per_mtok
      ? ` + ${usdc(listing.price_input_per_mtok || "0")}/${usdc(listing.price_output_per_mtok || "0")} per M tokens in/out`
      : "";
  const remaining = listing.remaining_calls === null ? "no call limit" : `${listing.remaining_calls} calls left`;
  return el(
    "article",
    { class: "card listing", dataset: { listing: listing.id } },
    el("strong", { text: listing.models.join(", ") }),
    el("div", { class: "small muted" }, `${listing.kind} · `, el("span", { class: "mono", text: listing.id })),
    el("div", { class: "price" }, `${usdc(listing.price_per_call)} USDC per call`, el("span", { class: "small muted", text: tokens })),
    el("div", { class: "small" }, remaining, " · ", badge(`${freeLeft} free calls left`, freeLeft > 0 ? "ok" : ""),
      listing.healthy ? null : badge("cooling down", "warn")),
    record(provider),
    el("div", { class: "actions" }, el("a", { class: "button", href: `/playground?listing=${encodeURIComponent(listing.id)}`, text: "Try it" })),
  );
}

async function load() {
  const form = new FormData($("#filters"));
  const query = new URLSearchParams({ limit: "100" });
  for (const [key, value] of form) if (value !== "") query.set(key, value);
  try {
    const [listings, free] = await Promise.all([api(`/v1/listings?${query}`), api("/v1/playground")]);
    const owners = [...new Set(listings.data.map((l) => l.owner))];
    const records = owners.length
      ? await api(`/v1/providers?${owners.map((o) => `address=${o}`).join("&")}`)
      : { data: [] };
    const byOwner = new Map(records.data.map((r) => [r.address.toLowerCase(), r]));
    const cards = listings.data.map((l) =>
      card(l, byOwner.get(l.owner.toLowerCase()), Math.max(0, free.free_calls_per_listing - (free.used[l.id] || 0))),
    );
    $("#listings").replaceChildren(...cards);
    $("#no-listings").hidden = cards.length > 0;
  } catch (error) {
    notify(explain(error), "error");
  }
}

async function loadModels() {
  const models = await api("/v1/models");
  $("#models").replaceChildren(
    ...models.data.map((m) => el("tr", {}, el("td", { class: "mono", text: m.id }), el("td", { text: m.listings }), el("td", { text: usdc(m.min_price_per_call) }))),
  );
  const select = $("#filter-model");
  for (const m of models.data) select.append(el("option", { value: m.id, text: m.id }));
}

const ctx = await start("market");
$("#filters").addEventListener("change", load);
$("#filters").addEventListener("submit", (event) => {
  event.preventDefault();
  load();
});
ctx.onSession(load);
await Promise.all([load(), loadModels().catch((error) => notify(explain(error), "error"))]);
