// Any EIP-1193 wallet, found through EIP-6963 (MetaMask first), else window.ethereum.

const announced = new Map(); // uuid -> {info, provider}
const listeners = new Set();
const REMEMBERED = "quotra.wallet"; // the chosen wallet's rdns (not a secret) for this tab

export const state = { provider: null, info: null, account: null, chainId: null };

window.addEventListener("eip6963:announceProvider", (event) => {
  const detail = event.detail;
  if (!detail || !detail.info || !detail.provider) return;
  announced.set(detail.info.uuid, detail);
  changed();
});
window.dispatchEvent(new Event("eip6963:requestProvider"));

export function onChange(listener) {
  listeners.add(listener);
}

function changed() {
  for (const listener of listeners) listener(state);
}

// The wallets found, MetaMask first.
export function wallets() {
  const list = [...announced.values()];
  if (!list.length && window.ethereum) {
    list.push({ info: { uuid: "injected", name: "Browser wallet", rdns: "injected" }, provider: window.ethereum });
  }
  return list.sort((a, b) => rank(a) - rank(b));
}

const rank = (wallet) => (wallet.info.rdns === "io.metamask" ? 0 : 1);

function bind(wallet) {
  state.provider = wallet.provider;
  state.info = wallet.info;
  if (typeof wallet.provider.on === "function") {
    wallet.provider.on("accountsChanged", (accounts) => {
      state.account = accounts[0] || null;
      changed();
    });
    wallet.provider.on("chainChanged", (chainId) => {
      state.chainId = Number.parseInt(chainId, 16);
      changed();
    });
  }
}

async function readState() {
  state.chainId = Number.parseInt(await state.provider.request({ method: "eth_chainId" }), 16);
}

// Asks the wallet for an account (the wallet shows its prompt).
export async function connect(wallet) {
  bind(wallet);
  const accounts = await wallet.provider.request({ method: "eth_requestAccounts" });
  state.account = accounts[0] || null;
  await readState();
  sessionStorage.setItem(REMEMBERED, wallet.info.rdns);
  changed();
  return state.account;
}

// On a new page: the wallet chosen earlier in this tab, if it still grants an account (no prompt).
export async function reconnect() {
  const rdns = sessionStorage.getItem(REMEMBERED);
  await new Promise((resolve) => setTimeout(resolve, 50)); // let wallets announce themselves
  const wallet = wallets().find((w) => w.info.rdns === rdns);
  if (!wallet) return null;
  bind(wallet);
  const accounts = await wallet.provider.request({ method: "eth_accounts" });
  state.account = accounts[0] || null;
  if (state.account) await readState();
  changed();
  return state.account;
}

export function disconnect() {
  sessionStorage.removeItem(REMEMBERED);
  Object.assign(state, { provider: null, info: null, account: null, chainId: null });
  changed();
}

export function requireAccount() {
  if (!state.provider || !state.account) throw new Error("Connect a wallet first.");
  return state.account;
}

export class WrongChain extends Error {
  constructor(network) {
    super(`Your wallet is on another network: switch it to ${network.chain_name} (chain ${network.chain_id}).`);
    this.network = network;
  }
}

export function onRightChain(network) {
  return state.chainId === network.chain_id;
}

export function requireChain(network) {
  requireAccount();
  if (!onRightChain(network)) throw new WrongChain(network);
}

// Switches the wallet to the relay's chain, adding it first if the wallet does not know it.
export async function switchChain(network) {
  const chainId = `0x${network.chain_id.toString(16)}`;
  try {
    await state.provider.request({ method: "wallet_switchEthereumChain", params: [{ chainId }] });
  } catch (error) {
    if (error.code !== 4902 || !network.wallet_rpc_url) throw error;
    await state.provider.request({
      method: "wallet_addEthereumChain",
      params: [
        {
          chainId,
          chainName: network.chain_name,
          rpcUrls: [network.wallet_rpc_url],
          nativeCurrency: { name: "Ether", symbol: "ETH", decimals: 18 },
        },
      ],
    });
  }
  await readState();
  changed();
}

export async function personalSign(message) {
  const account = requireAccount();
  const hex = `0x${[...new TextEncoder().encode(message)].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
  return state.provider.request({ method: "personal_sign", params: [hex, account] });
}

export async function signTypedData(network, typedData) {
  requireChain(network); // wallets refuse typed data for another chain than the active one
  const account = requireAccount();
  return state.provider.request({ method: "eth_signTypedData_v4", params: [account, JSON.stringify(typedData)] });
}
