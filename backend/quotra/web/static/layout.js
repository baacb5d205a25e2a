// What every page shares: the header (navigation, wallet, network, sign-in) and the context a
// page works in: the relay's network and the signed-in wallet (an HttpOnly cookie session).
import { api, explain } from "./api.js";
import { $, badge, el, notify, short } from "./ui.js";
import * as wallet from "./wallet.js";

const NAV = [
  ["market", "/", "Market"],
  ["playground", "/playground", "Playground"],
  ["account", "/account", "Account"],
  ["provider", "/provider", "Provider"],
];

export class Context {
  constructor(page, network) {
    this.page = page;
    this.network = network;
    this.address = null; // the signed-in wallet
    this.listeners = new Set();
  }

  onSession(listener) {
    this.listeners.add(listener);
  }

  setSession(address) {
    this.address = address;
    for (const listener of this.listeners) listener(address);
    renderWallet(this);
  }

  async signIn() {
    const account = wallet.requireAccount();
    const nonce = await api("/v1/auth/nonce", { method: "POST", body: { address: account } });
    const signature = await wallet.personalSign(nonce.message);
    const session = await api("/v1/auth/verify", { method: "POST", body: { message: nonce.message, signature } });
    this.setSession(session.address);
  }

  async signOut() {
    await api("/v1/auth/logout", { method: "POST" });
    this.setSession(null);
  }

  // Asks the person to fix whatever stands between them and a signature on the right chain.
  async ready({ signedIn = false } = {}) {
    wallet.requireAccount();
    if (!wallet.onRightChain(this.network)) await wallet.switchChain(this.network);
    if (signedIn && (!this.address || this.address.toLowerCase() !== wallet.state.account.toLowerCase())) {
      await this.signIn();
    }
  }
}

function renderHeader(page) {
  const nav = el(
    "nav",
    { "aria-label": "Main" },
    NAV.map(([name, href, label]) => el("a", { href, "aria-current": name === page ? "page" : null, text: label })),
  );
  $("#top").replaceChildren(
    el("a", { class: "brand", href: "/", text: "Quotra" }),
    nav,
    el("div", { class: "wallet", id: "wallet" }),
  );
}

function action(label, work, ctx, kind = "secondary") {
  const button = el("button", { class: kind, type: "button", text: label });
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      await work();
      notify("");
    } catch (error) {
      notify(explain(error), "error");
    } finally {
      button.disabled = false;
      renderWallet(ctx);
    }
  });
  return button;
}

function renderWallet(ctx) {
  const box = $("#wallet");
  const parts = [];
  const { account, chainId } = wallet.state;
  if (!account) {
    const found = wallet.wallets();
    if (!found.length) {
      parts.push(el("span", { class: "muted", text: "No wallet found: install MetaMask or another wallet." }));
    }
    for (const w of found) {
      parts.push(action(`Connect ${w.info.name}`, () => wallet.connect(w), ctx, ""));
    }
  } else {
    parts.push(el("span", { class: "mono", title: account, id: "wallet-account", text: short(account) }));
    if (chainId !== ctx.network.chain_id) {
      parts.push(badge(`wrong network (${chainId})`, "bad"));
      parts.push(action(`Switch to ${ctx.network.chain_name}`, () => wallet.switchChain(ctx.network), ctx, ""));
    } else {
      parts.push(badge(ctx.network.chain_name, "ok"));
    }
  }
  if (ctx.address) {
    const mismatch = account && account.toLowerCase() !== ctx.address.toLowerCase();
    parts.push(
      el("span", { id: "session", class: mismatch ? "badge warn" : "badge ok", text: `signed in ${short(ctx.address)}` }),
    );
    if (mismatch) parts.push(action("Sign in as this wallet", () => ctx.signIn(), ctx, ""));
    parts.push(action("Sign out", () => ctx.signOut(), ctx));
  } else if (account) {
    parts.push(action("Sign in", () => ctx.signIn(), ctx, ""));
  }
  box.replaceChildren(...parts);
}

export async function start(page) {
  renderHeader(page);
  const network = await api("/v1/network");
  const ctx = new Context(page, network);
  wallet.onChange(() => renderWallet(ctx));
  try {
    ctx.address = (await api("/v1/auth/session")).address;
  } catch {
    ctx.address = null; // not signed in (or the session expired)
  }
  renderWallet(ctx);
  try {
    await wallet.reconnect();
  } catch (error) {
    notify(explain(error), "error");
  }
  return ctx;
}
