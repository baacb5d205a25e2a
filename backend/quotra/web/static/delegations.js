// MetaMask smart accounts on the pages: what the signed-in account is to the Delegation Framework
// (ERC-7710), and disabling one of its delegations without ETH: the wallet signs a one-use grant
// that lets the relay's relayer make the account call `DelegationManager.disableDelegation`.
import { api } from "./api.js";
import { badge, el, sleep } from "./ui.js";
import * as wallet from "./wallet.js";

// Why a page cannot make an account a smart account itself.
export const NO_UPGRADE =
  "This page cannot make it one: a browser wallet signs an EIP-7702 authorization only in its own " +
  "screens (in MetaMask: the account's details, “Switch to smart account”), never for a page through " +
  "EIP-1193.";

// The signed-in account's kind (`GET /v1/account/smart-account`), or null where the relay has no
// claims (no chain or no relayer).
export async function accountKind(network) {
  return network.claims ? api("/v1/account/smart-account") : null;
}

// Signs the grant the relay proposed and has the relayer redeem it; the revocation as the relay
// records it.
export async function disable(network, delegation, grant) {
  const signature = await wallet.signTypedData(network, grant.typed_data);
  return api("/v1/delegations/disable", {
    method: "POST",
    body: { delegation, grant: { message: grant.typed_data.message, signature } },
  });
}

// Follows a revocation until it is mined (or failed), showing each state in `box`.
export async function follow(revocation, box) {
  while (!["confirmed", "failed"].includes(revocation.status)) {
    box.replaceChildren(badge(revocation.status, "warn"), " revoking on-chain…");
    await sleep(1000);
    revocation = await api(`/v1/revocations/${revocation.id}`);
  }
  box.replaceChildren(
    badge(revocation.status, revocation.status === "confirmed" ? "ok" : "bad"),
    revocation.tx_hash ? el("span", { class: "mono", text: ` tx ${revocation.tx_hash}` }) : ` ${revocation.error || ""}`,
  );
  return revocation;
}
