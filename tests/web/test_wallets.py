"""Wallets found through EIP-6963: every announced wallet is offered, MetaMask first, and the one
chosen is the one asked; a wallet on another chain is offered the switch to the relay's."""

from __future__ import annotations

from browser_wallet import InjectedWallet
from conftest import Market
from eth_account import Account
from playwright.sync_api import expect


def test_announced_wallets_are_offered_metamask_first(market: Market, person) -> None:
    visitor = person()  # announces "Test Wallet"
    metamask = InjectedWallet(Account.create(), name="MetaMask", rdns="io.metamask")
    metamask.install(visitor.context)
    page = visitor.page
    page.goto("/")
    buttons = page.locator("#wallet button")
    expect(buttons).to_have_text(["Connect MetaMask", "Connect Test Wallet"])
    buttons.nth(0).click()
    expect(page.locator("#wallet-account")).to_have_attribute("title", metamask.address)
    assert metamask.connected and not visitor.wallet.connected

    # On another chain: said, and one click switches (adding the twin the wallet does not know).
    expect(page.locator("#wallet .badge")).to_have_text("wrong network (1)")
    page.get_by_role("button", name="Switch to Base Sepolia").click()
    expect(page.locator("#wallet .badge")).to_have_text("Base Sepolia")
    assert metamask.chain_id == 84532 and metamask.known_chains[84532] == [market.onchain.twin.rpc_url]
    assert visitor.wallet.requests == []
    assert visitor.errors == []
