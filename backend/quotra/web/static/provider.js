// The provider's dashboard: list a key, check it, pause / resume / revoke each listing, earnings
// per listing, and a one-click claim followed live until the chain confirms it: by ERC-7710 for a
// MetaMask smart account (a Delegation Framework delegation the relayer redeems, disabled from
// here too), else with the escrow's own delegation the relayer submits.
import { api, explain } from "./api.js";
import * as delegations from "./delegations.js";
import { start } from "./layout.js";
import { $, badge, busy, el, notify, sleep, usdc, when } from "./ui.js";
import * as wallet from "./wallet.js";

const FINAL = new Set(["confirmed", "failed"]);
const ctx = await start("provider");
let claimable = "0";
let account = null; // the signed-in account's kind (GET /v1/account/smart-account)

async function load() {
  const signedIn = ctx.address !== null;
  $("#signed-out").hidden = signedIn;
  $("#dashboard").hidden = !signedIn;
  if (!signedIn) return;
  try {
    const [listings, earnings, claims, kind] = await Promise.all([
      api("/v1/listings/mine"),
      ctx.network.claims ? api("/v1/provider/earnings") : null,
      ctx.network.claims ? api("/v1/provider/claims?limit=20") : { data: [] },
      delegations.accountKind(ctx.network),
    ]);
    account = kind;
    showClaimPath(kind);
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

// How this account claims, and why not by ERC-7710 when it cannot.
function showClaimPath(kind) {
  const path = $("#claim-path");
  if (!kind) {
    path.textContent = "";
  } else if (kind.erc7710) {
    path.replaceChildren(
      badge("MetaMask smart account", "ok"),
      " Your account is an EIP-7702 smart account (MetaMask's stateless DeleGator): you claim by ERC-7710. You sign a " +
        "Delegation Framework delegation that lets the relayer make your account call the escrow's claim once, for at " +
        "most this amount, to you, before it expires; the relayer redeems it (DelegationManager.redeemDelegations) with " +
        "its USDC fee, and you can disable it below while it is unused.",
    );
  } else if (!kind.delegation_manager) {
    path.textContent = "You claim with the escrow's own delegation: this relay's chain has no Delegation Framework for ERC-7710.";
  } else if (kind.kind === "contract") {
    path.textContent =
      "Your account is a contract account, not MetaMask's stateless DeleGator: you claim with the escrow's own " +
      "delegation, which the escrow checks with ERC-1271.";
  } else {
    path.replaceChildren(
      badge("plain account", "warn"),
      " You claim with the escrow's own delegation. Claims by ERC-7710 need your account to be a MetaMask smart " +
        `account (EIP-7702). ${delegations.NO_UPGRADE} Once it is, this page claims by ERC-7710.`,
    );
  }
}

function claimStatus(c) {
  return badge(c.status, c.status === "confirmed" ? "ok" : c.status === "failed" ? "bad" : "warn");
}

// An ERC-7710 claim's delegation stays usable until it is redeemed or expires: while the claim is
// not confirmed, the provider may disable it.
function delegationCell(c) {
  if (c.kind !== "erc7710") return el("td", { class: "small muted", text: "escrow delegation" });
  if (c.delegation_revoked) return el("td", { class: "small" }, "ERC-7710 ", badge("disabled", "bad"));
  if (c.status === "confirmed") return el("td", { class: "small", text: "ERC-7710 (used)" });
  const button = el("button", { type: "button", class: "danger", text: "Disable delegation" });
  button.addEventListener("click", () =>
    busy(button, async () => {
      await ctx.ready({ signedIn: true });
      const grant = await api(`/v1/provider/claims/${c.id}/disable/typed-data`);
      const box = $("#disable-status");
      const revocation = await delegations.follow(await delegations.disable(ctx.network, grant.delegation, grant), box);
      if (revocation.status === "confirmed") notify(`The delegation of ${c.id} is disabled: it can no longer be redeemed.`, "ok");
      await load();
    }, explain),
  );
  return el("td", { class: "small" }, "ERC-7710 ", button);
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
        el("td", {}, claimStatus(c), c.error ? el("div", { class: "small muted", text: c.error }) : null),
        el("td", { class: "mono small", text: c.tx_hash || "—" }),
        delegationCell(c),
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

// A claim by ERC-7710: the claim delegation (and the relayer's fee delegation, if it charges one)
// signed under the DelegationManager's domain, redeemed by the relayer in one transaction.
async function claimByErc7710(status) {
  const offer = await api(`/v1/provider/claims/erc7710/typed-data?amount=${encodeURIComponent(claimable)}`);
  if (offer.authorization) throw new Error(`Your account is not a MetaMask smart account any more. ${delegations.NO_UPGRADE}`);
  status.textContent = `Sign the ERC-7710 delegation in your wallet: ${usdc(offer.amount)} USDC, of which ${usdc(offer.relayer.fee)} USDC is the relayer's fee.`;
  const claim = { message: offer.claim.message, signature: await wallet.signTypedData(ctx.network, offer.claim) };
  let fee = null;
  if (offer.fee) {
    status.textContent = `Sign the relayer's fee in your wallet: ${usdc(offer.relayer.fee)} USDC in USDC, paid out of the claim.`;
    fee = { message: offer.fee.message, signature: await wallet.signTypedData(ctx.network, offer.fee) };
  }
  return api("/v1/provider/claims/erc7710", { method: "POST", body: { claim, fee, amount: offer.amount } });
}

// A claim with the escrow's own delegation (any account).
async function claimByEscrow(status) {
  const offer = await api(`/v1/provider/claims/typed-data?amount=${encodeURIComponent(claimable)}`);
  status.textContent = `Sign the delegation in your wallet: ${usdc(offer.amount)} USDC, of which ${usdc(offer.relayer.fee)} USDC is the relayer's fee.`;
  const signature = await wallet.signTypedData(ctx.network, offer.typed_data);
  return api("/v1/provider/claims", {
    method: "POST",
    body: { delegation: offer.typed_data.message, signature, amount: offer.amount },
  });
}

$("#claim").addEventListener("click", async () => {
  await busy($("#claim"), async () => {
    await ctx.ready({ signedIn: true });
    const status = $("#claim-status");
    let claim = await (account && account.erc7710 ? claimByErc7710(status) : claimByEscrow(status));
    await load(); // the claim in the table (an ERC-7710 one can be disabled there while it waits)
    while (!FINAL.has(claim.status)) {
      status.replaceChildren(badge(claim.status, "warn"), ` claim ${claim.id}`, claim.tx_hash ? el("span", { class: "mono", text: ` tx ${claim.tx_hash}` }) : " waiting for the relayer…");
      await sleep(1000);
      claim = await api(`/v1/provider/claims/${claim.id}`);
    }
    const via = claim.kind === "erc7710" ? "by ERC-7710 redemption" : "with the escrow's delegation";
    const received = `${usdc(claim.amount)} USDC claimed ${via}, of which ${usdc(claim.relayer_fee)} USDC went to the relayer as its fee`;
    status.replaceChildren(
      badge(claim.status, claim.status === "confirmed" ? "ok" : "bad"),
      claim.status === "confirmed"
        ? ` ${received}, in block ${claim.block_number}, tx `
        : ` The claim failed: ${claim.error || "unknown error"} `,
      el("span", { class: "mono", id: "claim-tx", text: claim.tx_hash || "" }),
    );
  }, explain);
  await load(); // after `busy` gave the button back: nothing left to claim disables it
});

ctx.onSession(load);
await load();
