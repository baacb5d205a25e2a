"""A test wallet injected into the page as an EIP-1193 provider, announced through EIP-6963: the
page's own code asks it for accounts, the chain, and signatures; eth-account answers in the test
process, so the page's real code paths run. It starts on another chain (Ethereum mainnet) and,
like MetaMask, knows chain 84532 only after `wallet_addEthereumChain`, refuses typed data whose
domain names another chain than its active one, and sends transactions through the RPC URL the
page gave it for the chain."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from uuid import NAMESPACE_DNS, uuid5

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

# `%(binding)s`, `%(uuid)s`, `%(name)s` and `%(rdns)s` are filled in per wallet.
PROVIDER_SCRIPT = """
(() => {
  const listeners = {};
  const emit = (event, value) => (listeners[event] || []).forEach((fn) => fn(value));
  const provider = {
    async request({ method, params }) {
      const reply = JSON.parse(await window.%(binding)s(JSON.stringify({ method, params: params || [] })));
      if (reply.error) {
        const error = new Error(reply.error.message);
        error.code = reply.error.code;
        throw error;
      }
      if (method === "wallet_switchEthereumChain" || method === "wallet_addEthereumChain") {
        emit("chainChanged", params[0].chainId);
      }
      return reply.result;
    },
    on(event, fn) { (listeners[event] ||= []).push(fn); },
    removeListener(event, fn) { listeners[event] = (listeners[event] || []).filter((f) => f !== fn); },
  };
  const info = Object.freeze({
    uuid: "%(uuid)s",
    name: "%(name)s",
    icon: "data:image/svg+xml,%%3Csvg xmlns='http://www.w3.org/2000/svg'/%%3E",
    rdns: "%(rdns)s",
  });
  const detail = Object.freeze({ info, provider });
  const announce = () => window.dispatchEvent(new CustomEvent("eip6963:announceProvider", { detail }));
  window.addEventListener("eip6963:requestProvider", announce);
  announce();
})();
"""


class WalletError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _normalised(typed: dict[str, Any]) -> dict[str, Any]:
    """Numbers written as decimal strings (as pages send uint256 values) as integers, as
    MetaMask reads them."""
    types = typed["types"]

    def fix(type_name: str, values: dict[str, Any]) -> dict[str, Any]:
        fixed = dict(values)
        for entry in types.get(type_name, []):
            value = fixed.get(entry["name"])
            if isinstance(value, str) and entry["type"].startswith(("uint", "int")):
                fixed[entry["name"]] = int(value, 0)
        return fixed

    return {
        **typed,
        "domain": fix("EIP712Domain", typed["domain"]),
        "message": fix(typed["primaryType"], typed["message"]),
    }


@dataclass
class InjectedWallet:
    account: LocalAccount
    name: str = "Test Wallet"  # what EIP-6963 announces
    rdns: str = "org.quotra.testwallet"
    chain_id: int = 1
    known_chains: dict[int, list[str]] = field(default_factory=lambda: {1: []})
    connected: bool = False
    requests: list[str] = field(default_factory=list)
    declines: set[str] = field(default_factory=set)  # methods the person refuses in the wallet (4001)

    @property
    def address(self) -> str:
        return str(self.account.address)

    def install(self, context: Any) -> None:
        """Into every page of a Playwright browser context."""
        binding = "__testWallet_" + self.rdns.replace(".", "_")
        context.expose_function(binding, self.handle)
        uuid = str(uuid5(NAMESPACE_DNS, self.rdns))
        context.add_init_script(
            PROVIDER_SCRIPT % {"binding": binding, "uuid": uuid, "name": self.name, "rdns": self.rdns}
        )

    def handle(self, payload: str) -> str:
        request = json.loads(payload)
        self.requests.append(request["method"])
        try:
            return json.dumps({"result": self.answer(request["method"], request["params"])})
        except WalletError as error:
            return json.dumps({"error": {"code": error.code, "message": str(error)}})

    def answer(self, method: str, params: list[Any]) -> Any:
        if method == "eth_requestAccounts":
            self.connected = True
            return [self.address]
        if method == "eth_accounts":
            return [self.address] if self.connected else []
        if method == "eth_chainId":
            return hex(self.chain_id)
        if not self.connected:
            raise WalletError(4100, "not authorized")
        if method in self.declines:
            raise WalletError(4001, "User rejected the request.")
        if method == "wallet_switchEthereumChain":
            chain_id = int(params[0]["chainId"], 16)
            if chain_id not in self.known_chains:
                raise WalletError(4902, f"Unrecognized chain ID {params[0]['chainId']}")
            self.chain_id = chain_id
            return None
        if method == "wallet_addEthereumChain":
            chain_id = int(params[0]["chainId"], 16)
            self.known_chains[chain_id] = list(params[0]["rpcUrls"])
            self.chain_id = chain_id
            return None
        if method == "personal_sign":
            message, address = params
            assert to_checksum_address(address) == self.address
            signed = Account.sign_message(encode_defunct(hexstr=message), self.account.key)
            return "0x" + bytes(signed.signature).hex()
        if method == "eth_signTypedData_v4":
            address, data = params
            assert to_checksum_address(address) == self.address
            typed = _normalised(json.loads(data))
            if int(typed["domain"]["chainId"]) != self.chain_id:
                raise WalletError(-32603, f"chainId must match the active chainId {self.chain_id}")
            signed = Account.sign_typed_data(self.account.key, full_message=typed)
            return "0x" + bytes(signed.signature).hex()
        raise WalletError(4200, f"{method} is not supported by the test wallet")
