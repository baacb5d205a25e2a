// The provider's dashboard: list a key, check it, pause / resume / revoke each listing, earnings
// per listing, and a one-click claim (a signed delegation the relayer submits), followed live
// until the chain confirms it.
import { api, explain } from "./api.js";
import { start } from "./layout.js";
import { $, badge, busy, el, notify, sleep, usdc, when } from "./ui.js";
import * as wallet from "./wallet.js";

const FINAL = new Set(["confirmed", "failed"]);
const ctx = await start("provider");
let claimable = "0";

async function load() {
  const signedIn = ctx.address !== null;
  $("#signed-out").hidden = signedIn;
  $("#dashboard").hidden = !signedIn;
  if (!signedIn) return;
  try {
    const [listings, earnings, claims] = await Promise.all([
      api("/v1/listings/mine"),
      ctx.network.claims ? api("/v1/provider/earnings") : null,
      ctx.network.claims ? api("/v1/provider/claims?limit=20") : { data: [] },
    ]);
    showListings(listings.data, (earnings && earnings.per_listing) || {});
    if (earnings) {
      claimable = earnings.claimable;
      $("#claimable").textContent = `${usdc(earnings.claimable)} USDC`;
      $("#claimed").textContent = `${usdc(earnings.claimed)} USDC`;
      $("#claim").textContent = `Claim ${usdc(earnings.claimable)} USDC`;
      $("#claim").disabled = earnings.claimable_atomic === 0;
    }
    showClaims(claims.data);
  } catch (error) {
    notify(explain(error), "error");
  }
}

function statusBadge(status) {
  return badge(status, status === "active" ? "ok" : status === "paused" ? "warn" : "bad");
}

function listingAction(label, kind, work) {
  const button = el("button", { type: "button", class: kind, text: label });
  button.addEventListener("click", () => busy(button, work, explain));
  return button;
}

function showListings(listings, earned) {
  $("#listings").replaceChildren(
    ...listings.map((l) => {
      const act = (path, method, message) => async () => {
        await api(`/v1/listings/${l.id}${path}`, { method });
        notify(message, "ok");
        await load();
      };
      const actions = [];
      if (l.status !== "revoked") {
        actions.push(listingAction("Check key", "secondary", act("/check", "POST", `The key of ${l.id} works.`)));
        actions.push(
          l.status === "active"
            ? listingAction("Pause", "secondary", act("/pause", "POST", `${l.id} is paused.`))
            : listingAction("Resume", "secondary", act("/resume", "POST", `${l.id} is live again.`)),
        );
        actions.push(
          listingAction("Revoke", "danger", async () => {
            if (!confirm(`Revoke ${l.id} for good? Its key is deleted.`)) return;
            await act("", "DELETE", `${l.id} is revoked and its key deleted.`)();
          }),
        );
      }
      return el(
        "tr",
        { dataset: { listing: l.id } },
        el("td", {}, el("strong", { text: l.models.join(", ") }), el("div", { class: "small muted" }, `${l.kind} · `, el("span", { class: "mono", text: l.id }), l.expires_at ? ` · expires ${when(l.expires_at)}` : null)),
        el("td", { text: `${usdc(l.price_per_call)} USDC` }),
        el("td", { text: l.max_calls === null ? `${l.calls_used}` : `${l.calls_used} / ${l.max_calls}` }),
        el("td", { class: "earned", text: `${usdc(earned[l.id] || "0")} USDC` }),
        el("td", {}, statusBadge(l.status), l.healthy ? null : badge("cooling down", "warn")),
        el("td", {}, el("div", { class: "actions" }, actions)),
      );
    }),
  );
}

function showClaims(claims) {
  $("#claims").replaceChildren(
    ...claims.map((c) =>
      el(
        "tr",
        { dataset: { claim: c.id } },
        el("td", { class: "mono small", text: c.id }),
        el("td", { text: `${usdc(c.amount)} USDC` }),
        el("td", { text: `${usdc(c.relayer_fee)} USDC` }),
        el("td", {}, badge(c.status, c.status === "confirmed" ? "ok" : c.status === "failed" ? "bad" : "warn")),
        el("td", { class: "mono small", text: c.tx_hash || "—" }),
      ),
    ),
  );
}

$("#kind").addEventListener("change", () => {
  const kind = $("#kind").value;
  $("#base-url-label").hidden = kind !== "openai-compatible";
  $("#api-key-label").hidden = kind === "sandbox";
});

const optionalNumber = (selector) => ($(selector).value === "" ? undefined : Number($(selector).value));

$("#listing-form").addEventListener("submit", (event) => {
  event.preventDefault();
  busy($("#create-listing"), async () => {
    const kind = $("#kind").value;
    const body = {
      kind,
      models: $("#models").value.split(",").map((m) => m.trim()).filter(Boolean),
      price_per_call: $("#price").value,
      max_calls: optionalNumber("#max-calls"),
      max_output_tokens: optionalNumber("#max-output"),
      rate_per_minute: optionalNumber("#rate"),
    };
    if (kind !== "sandbox") body.api_key = $("#api-key").value;
    if (kind === "openai-compatible") body.base_url = $("#base-url").value;
    if ($("#price-in").value) body.price_input_per_mtok = $("#price-in").value;
    if ($("#price-out").value) body.price_output_per_mtok = $("#price-out").value;
    if ($("#expires").value) body.expires_at = new Date($("#expires").value).toISOString();
    const listing = await api("/v1/listings", { method: "POST", body });
    $("#api-key").value = "";
    notify(`Listed ${listing.id}: ${listing.models.join(", ")} at ${usdc(listing.price_per_call)} USDC per call.`, "ok");
    await load();
  }, explain);
});

$("#claim").addEventListener("click", async () => {
  await busy($("#claim"), async () => {
    await ctx.ready({ signedIn: true });
    const offer = await api(`/v1/provider/claims/typed-data?amount=${encodeURIComponent(claimable)}`);
    const status = $("#claim-status");
    status.textContent = `Sign the delegation in your wallet: ${usdc(offer.amount)} USDC, of which ${usdc(offer.relayer.fee)} USDC is the relayer's fee.`;
    const signature = await wallet.signTypedData(ctx.network, offer.typed_data);
    let claim = await api("/v1/provider/claims", {
      method: "POST",
      body: { delegation: offer.typed_data.message, signature, amount: offer.amount },
    });
    while (!FINAL.has(claim.status)) {
      status.replaceChildren(badge(claim.status, "warn"), ` claim ${claim.id}`, claim.tx_hash ? el("span", { class: "mono", text: ` tx ${claim.tx_hash}` }) : " waiting for the relayer…");
      await sleep(1000);
      claim = await api(`/v1/provider/claims/${claim.id}`);
    }
    status.replaceChildren(
      badge(claim.status, claim.status === "confirmed" ? "ok" : "bad"),
      claim.status === "confirmed"
        ? ` ${usdc(claim.amount)} USDC claimed in block ${claim.block_number}, tx `
        : ` The claim failed: ${claim.error || "unknown error"} `,
      el("span", { class: "mono", id: "claim-tx", text: claim.tx_hash || "" }),
    );
  }, explain);
  await load(); // after `busy` gave the button back: nothing left to claim disables it
});

ctx.onSession(load);
await load();
