// The consumer's prepaid account: balance, gasless deposit, spend permission (sign, revoke), a
// MetaMask smart account's periodic allowance for automatic top-ups (grant, follow, revoke), API
// keys (created once, capped, revoked), the apps the wallet pays for (disconnected here), usage
// with the cost of each call, and withdrawal.
import { api, explain } from "./api.js";
import * as delegations from "./delegations.js";
import { start } from "./layout.js";
import { $, atomicToUsdc, badge, busy, el, notify, sleep, usdc, when } from "./ui.js";
import * as wallet from "./wallet.js";

const ctx = await start("account");
$("#base-url").textContent = `${location.origin}/v1`;
const DAY = 86400;
const PERIODS = { 3600: "hour", 86400: "day", 604800: "week", 2592000: "30 days" };

async function load() {
  const signedIn = ctx.address !== null;
  $("#signed-out").hidden = signedIn;
  $("#account").hidden = !signedIn;
  if (!signedIn) return;
  try {
    const [account, keys, apps, usage, kind] = await Promise.all([
      api("/v1/account"),
      api("/v1/account/keys"),
      api("/v1/account/apps"),
      api("/v1/account/usage?limit=50"),
      delegations.accountKind(ctx.network),
    ]);
    showAccount(account);
    showKeys(keys.data);
    showApps(apps.data);
    showUsage(usage.data);
    await showAllowances(kind);
  } catch (error) {
    notify(explain(error), "error");
  }
}

function showAccount(account) {
  $("#available").textContent = `${usdc(account.available)} USDC`;
  $("#deposit").textContent = `${usdc(account.deposit)} USDC`;
  $("#remaining").textContent = `${usdc(account.remaining_allowance)} USDC`;
  $("#unsettled").textContent = `${usdc(account.unsettled)} USDC`;
  $("#pending-withdrawal").textContent = `${usdc(account.pending_withdrawal)} USDC`;
  const unlocks = account.pending_withdrawal_unlocks_at;
  $("#withdrawal-unlock").textContent = unlocks === null ? "" : `can be completed from ${when(new Date(unlocks * 1000).toISOString())}`;
  $("#withdraw-complete").disabled = account.pending_withdrawal_atomic === 0;
  const permission = account.permission;
  const state = $("#permission-state");
  $("#revoke-permission").hidden = !permission || permission.revoked;
  if (!permission) {
    state.textContent = "No permission yet: sign one so the relay may charge your calls to your deposit.";
    return;
  }
  const status = permission.revoked ? badge("revoked", "bad") : permission.active ? badge("active", "ok") : badge("not active", "warn");
  state.replaceChildren(
    status,
    ` ${usdc(permission.spent)} of ${usdc(permission.allowance)} USDC spent, until ${when(new Date(permission.valid_until * 1000).toISOString())}.`,
    permission.revoked ? " Sign a new one to go on calling with your keys." : " Signing a new one replaces it.",
  );
}

// The periodic allowances: offered to a MetaMask smart account on a relay that tops up (the
// Delegation Framework on its chain and the operator's key), explained to any other account.
async function showAllowances(kind) {
  const panel = $("#allowance-panel");
  const allowances = kind && kind.delegation_manager ? await api("/v1/account/allowances").catch(() => null) : null;
  panel.hidden = allowances === null;
  if (allowances === null) return;
  $("#allowance-form").hidden = !kind.erc7710;
  $("#allowance-account").replaceChildren(
    ...(kind.erc7710
      ? [badge("MetaMask smart account", "ok"), " Your account is an EIP-7702 smart account (MetaMask's stateless DeleGator): it can grant the relay a periodic allowance."]
      : [badge("plain account", "warn"), ` Automatic top-ups need your account to be a MetaMask smart account (EIP-7702). ${delegations.NO_UPGRADE}`]),
  );
  const now = Date.now() / 1000;
  $("#allowances").replaceChildren(
    ...allowances.data.map((a) => {
      const expired = a.expiry !== null && a.expiry <= now;
      const state = a.revoked ? badge("revoked", "bad") : expired ? badge("expired", "warn") : badge("active", "ok");
      const revoke = el("button", { type: "button", class: "danger", text: "Revoke" });
      revoke.addEventListener("click", () =>
        busy(revoke, async () => {
          await ctx.ready({ signedIn: true });
          const grant = await api("/v1/delegations/disable/typed-data", { method: "POST", body: { delegation: a.delegation } });
          const revocation = await delegations.follow(await delegations.disable(ctx.network, a.delegation, grant), $("#allowance-result"));
          if (revocation.status === "confirmed") notify("Allowance revoked: the relay can take nothing more under it.", "ok");
          await load();
        }, explain),
      );
      const period = PERIODS[a.period_seconds] || `${a.period_seconds} s`;
      return el(
        "tr",
        { dataset: { allowance: a.hash } },
        el("td", { text: `${usdc(a.period_amount)} USDC per ${period}` }),
        el("td", { class: "left", text: a.available_now_atomic === null ? "—" : `${atomicToUsdc(a.available_now_atomic)} USDC` }),
        el("td", { class: "top-ups", text: a.top_ups === null ? "—" : `${a.top_ups} (${usdc(a.topped_up)} USDC)` }),
        el("td", { class: "hide-narrow", text: a.expiry === null ? "—" : when(new Date(a.expiry * 1000).toISOString()) }),
        el("td", {}, state, a.last_error ? el("div", { class: "small muted", text: a.last_error }) : null),
        el("td", {}, a.revoked ? null : revoke),
      );
    }),
  );
}

// A datetime-local input's value for a date, in the page's time zone.
function localInput(date) {
  const two = (n) => String(n).padStart(2, "0");
  return `${date.getFullYear()}-${two(date.getMonth() + 1)}-${two(date.getDate())}T${two(date.getHours())}:${two(date.getMinutes())}`;
}

const unix = (value) => Math.floor(new Date(value).getTime() / 1000);

$("#allowance-end").value = localInput(new Date(Date.now() + 30 * DAY * 1000));

$("#allowance-form").addEventListener("submit", (event) => {
  event.preventDefault();
  busy($("#allowance-button"), async () => {
    await ctx.ready({ signedIn: true });
    const query = new URLSearchParams({
      period_amount: $("#allowance-amount").value,
      period_seconds: $("#allowance-period").value,
      expiry: unix($("#allowance-end").value),
    });
    if ($("#allowance-start").value) query.set("start", unix($("#allowance-start").value));
    const offer = await api(`/v1/account/allowances/typed-data?${query}`);
    const signature = await wallet.signTypedData(ctx.network, offer.typed_data);
    const allowance = await api("/v1/account/allowances", {
      method: "POST",
      body: { delegation: { message: offer.typed_data.message, signature } },
    });
    $("#allowance-result").textContent = `Allowance granted: up to ${usdc(allowance.period_amount)} USDC per ${PERIODS[allowance.period_seconds] || `${allowance.period_seconds} s`} tops up your deposit when it runs low.`;
    await load();
  }, explain);
});

function showKeys(keys) {
  $("#keys").replaceChildren(
    ...keys.map((key) => {
      const capValue = el("input", {
        type: "number", class: "cap", min: "0.000001", step: "0.000001", placeholder: "no cap",
        "aria-label": `Spend cap of ${key.name || key.id} (USDC, empty: no cap)`,
        value: key.spend_cap === null ? null : usdc(key.spend_cap),
      });
      const cap = el("button", { type: "button", class: "secondary", text: "Set cap" });
      const revoke = el("button", { type: "button", class: "danger", text: "Revoke" });
      cap.addEventListener("click", () =>
        busy(cap, async () => {
          const value = capValue.value.trim();
          await api(`/v1/account/keys/${key.id}`, { method: "PATCH", body: { spend_cap: value === "" ? null : value } });
          notify(value === "" ? "The key has no spend cap now." : `The key's spend cap is ${value} USDC now.`, "ok");
          await load();
        }, explain),
      );
      revoke.addEventListener("click", () =>
        busy(revoke, async () => {
          if (!confirm(`Revoke the key "${key.name || key.id}"? Calls with it stop at once.`)) return;
          await api(`/v1/account/keys/${key.id}`, { method: "DELETE" });
          notify("Key revoked.", "ok");
          await load();
        }, explain),
      );
      return el(
        "tr",
        { dataset: { key: key.id } },
        el("td", {}, key.name || "—", el("div", { class: "small muted mono", text: key.id })),
        el("td", { text: key.mode }),
        el("td", {}, key.revoked ? (key.spend_cap === null ? "none" : usdc(key.spend_cap)) : capValue),
        el("td", { text: usdc(key.spent) }),
        el("td", { class: "hide-narrow", text: when(key.last_used_at) }),
        el("td", {}, key.revoked ? badge("revoked", "bad") : badge("active", "ok")),
        el("td", {}, key.revoked ? null : el("div", { class: "actions" }, cap, revoke)),
      );
    }),
  );
}

// The apps the wallet pays for as their end user, each under the permission it signed for the app;
// the permission's "used" is what the app's calls were charged or still hold of it.
function showApps(connections) {
  $("#no-apps").hidden = connections.length > 0;
  $("#apps-table").hidden = connections.length === 0;
  $("#apps").replaceChildren(
    ...connections.map((c) => {
      const disconnect = el("button", { type: "button", class: "danger", text: "Disconnect" });
      disconnect.addEventListener("click", () =>
        busy(disconnect, async () => {
          if (!confirm(`Disconnect "${c.app_name}"? It stops charging your wallet; calls already served still settle.`)) return;
          await api(`/v1/account/apps/${encodeURIComponent(c.app_id)}`, { method: "DELETE" });
          notify(`"${c.app_name}" no longer charges your wallet.`, "ok");
          await load();
        }, explain),
      );
      const until = c.valid_until === null ? "" : `, until ${when(new Date(c.valid_until * 1000).toISOString())}`;
      const used = c.revoked ? null : atomicToUsdc(c.allowance_atomic - c.remaining_atomic);
      return el(
        "tr",
        { dataset: { app: c.app_id } },
        el("td", {}, c.app_name, el("div", { class: "small muted mono", text: c.app_id }),
          el("div", { class: "small muted", text: `you are "${c.user_id}" there` })),
        el("td", { class: "mono small", text: c.developer }),
        el("td", { text: `${(c.markup_bps / 100).toFixed(2)} %` }),
        el("td", { class: "permission", text: used === null
          ? `allowed ${usdc(c.allowance)} USDC${until}`
          : `${used} of ${usdc(c.allowance)} USDC used, ${usdc(c.remaining)} left${until}` }),
        el("td", {}, c.revoked ? badge("revoked", "bad") : badge("active", "ok")),
        el("td", {}, disconnect),
      );
    }),
  );
}

function showUsage(rows) {
  $("#usage").replaceChildren(
    ...rows.map((row) =>
      el(
        "tr",
        {},
        el("td", { text: when(row.created_at) }),
        el("td", { class: "mono", text: row.model || "—" }),
        el("td", { text: row.gate }),
        el("td", { class: "hide-narrow", text: `${row.prompt_tokens}/${row.completion_tokens}` }),
        el("td", {}, usdc(row.price), row.returned_to_deposit_atomic > 0
          ? el("div", { class: "small muted", text: `of ${usdc(row.reserved)} authorized; ${usdc(row.returned_to_deposit)} back to your deposit` })
          : null),
        el("td", {}, badge(row.status, row.status === "settled" ? "ok" : row.status === "voided" ? "" : "warn"),
          row.settlement_tx ? el("div", { class: "small mono", title: row.settlement_tx, text: `${row.settlement_tx.slice(0, 10)}…` }) : null),
      ),
    ),
  );
}

$("#deposit-form").addEventListener("submit", (event) => {
  event.preventDefault();
  busy($("#deposit-button"), async () => {
    await ctx.ready({ signedIn: true });
    const amount = $("#deposit-amount").value;
    const offer = await api(`/v1/account/deposits/typed-data?amount=${encodeURIComponent(amount)}`);
    const signature = await wallet.signTypedData(ctx.network, offer.typed_data);
    $("#deposit-result").textContent = "Submitting through the relayer…";
    const result = await api("/v1/account/deposits", {
      method: "POST",
      body: { authorization: offer.typed_data.message, signature },
    });
    $("#deposit-result").replaceChildren(
      badge(result.status, result.status === "confirmed" ? "ok" : "warn"),
      ` ${usdc(result.amount)} USDC deposited`,
      result.tx_hash ? el("div", { class: "mono small", text: `tx ${result.tx_hash}` }) : "",
    );
    await load();
  }, explain);
});

$("#permission-form").addEventListener("submit", (event) => {
  event.preventDefault();
  busy($("#permission-button"), async () => {
    await ctx.ready({ signedIn: true });
    const query = new URLSearchParams({ allowance: $("#permission-allowance").value, days: $("#permission-days").value });
    const offer = await api(`/v1/account/permission/typed-data?${query}`);
    const signature = await wallet.signTypedData(ctx.network, offer.typed_data);
    await api("/v1/account/permission", { method: "POST", body: { permission: offer.typed_data.message, signature } });
    notify("Spend permission signed: your API keys can now charge your deposit.", "ok");
    await load();
  }, explain);
});

$("#revoke-permission").addEventListener("click", () =>
  busy($("#revoke-permission"), async () => {
    await ctx.ready({ signedIn: true });
    const offer = await api("/v1/account/permission/revocation/typed-data");
    const signature = await wallet.signTypedData(ctx.network, offer.typed_data);
    const message = offer.typed_data.message;
    const revocation = await api("/v1/revocations", { method: "POST", body: { account: message.account, item: message.item, signature } });
    await delegations.follow(revocation, $("#revocation-result"));
    await load();
  }, explain),
);

$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  busy($("#key-button"), async () => {
    const body = { name: $("#key-name").value, mode: $("#key-mode").value };
    if ($("#key-cap").value) body.spend_cap = $("#key-cap").value;
    const key = await api("/v1/account/keys", { method: "POST", body });
    $("#new-key-value").textContent = key.key;
    $("#new-key").hidden = false;
    await load();
  }, explain);
});

$("#copy-key").addEventListener("click", async () => {
  try {
    await navigator.clipboard.writeText($("#new-key-value").textContent);
    notify("Key copied to the clipboard.", "ok");
  } catch {
    notify("Copying was refused: select the key and copy it by hand.", "warn");
  }
});

// A withdrawal step without ETH: the wallet signs the escrow's message (RequestWithdrawal of an
// amount, or Withdraw at the relayer's fee, paid out of what is withdrawn) and the relay's relayer
// submits it; the page follows it until it is mined.
async function signedWithdrawal(step, amount) {
  const query = new URLSearchParams({ step });
  if (amount !== undefined) query.set("amount", amount);
  const data = await api(`/v1/account/withdrawals/typed-data?${query}`);
  const signature = await wallet.signTypedData(ctx.network, data.typed_data);
  const body = { step, message: data.typed_data.message, signature };
  let status = await api("/v1/account/withdrawals", { method: "POST", body });
  for (let waited = 0; status.status === "submitted" && waited < 120; waited += 1) {
    await sleep(1000);
    status = await api(`/v1/account/withdrawals/${encodeURIComponent(status.task_id)}`);
  }
  if (status.status !== "confirmed") {
    throw new Error(status.error ? `The withdrawal failed: ${status.error}` : "The withdrawal is not mined yet; check again later.");
  }
  const fee = data.typed_data.message.relayer_fee;
  return fee === undefined ? status.tx_hash : `${status.tx_hash} (relayer fee ${usdc((Number(fee) / 1e6).toFixed(6))} USDC)`;
}

$("#withdraw-form").addEventListener("submit", (event) => {
  event.preventDefault();
  busy($("#withdraw-request"), async () => {
    await ctx.ready({ signedIn: true });
    const tx = await signedWithdrawal("request", $("#withdraw-amount").value);
    $("#withdraw-result").textContent = `Withdrawal requested in tx ${tx}.`;
    await load();
  }, explain);
});

$("#withdraw-complete").addEventListener("click", async () => {
  await busy($("#withdraw-complete"), async () => {
    await ctx.ready({ signedIn: true });
    const tx = await signedWithdrawal("withdraw");
    $("#withdraw-result").textContent = `Withdrawal completed in tx ${tx}.`;
  }, explain);
  await load(); // after `busy` gave the button back: nothing pending disables it
});

ctx.onSession(load);
await load();
