"""A provider in the browser: sign in → list a sandbox key → check it, pause and resume it → a
consumer calls it (free, then paid with x402) → the record and earnings show → one-click claim,
followed live until the chain confirms it, and the USDC is in the provider's wallet → the
listing revoked. And a key of an OpenAI-compatible server, checked against it before it is listed:
refused with a wrong key, listed with the right one and its token prices, and answering."""

from __future__ import annotations

import base64
import json
import re
import time

import httpx
from conftest import FREE_CALLS, Market
from eth_account import Account
from playwright.sync_api import expect
from quotra.chain import delegation as dlg
from quotra_dev.localmodel import create_app as localmodel_app
from quotra_dev.localmodel import run_in_thread
from relays import X402Payer

USDC = 10**6
PRICE = 50_000
PAID_CALLS = 2
EARNED = PAID_CALLS * PRICE * 9 // 10  # the escrow's 90% share


def call_listing(market: Market, model: str) -> None:
    """A consumer's free calls, then paid ones with a signed x402 authorization."""
    wallet = Account.create()
    market.onchain.twin.mint_usdc(wallet.address, USDC)
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=market.url, timeout=30) as client:
        for _ in range(FREE_CALLS):
            assert client.post("/v1/chat/completions", json=body).status_code == 200
        refused = client.post("/v1/chat/completions", json=body)
        assert refused.status_code == 402
        offer = json.loads(base64.b64decode(refused.headers["payment-required"]))["accepts"][0]
        payer = X402Payer(market.onchain, wallet, offer)
        for _ in range(PAID_CALLS):
            header, _nonce = payer.header()
            paid = client.post("/v1/chat/completions", json=body, headers={"PAYMENT-SIGNATURE": header})
            assert paid.status_code == 200, paid.text


def test_provider_journey(market: Market, person) -> None:
    provider = person()
    page = provider.page
    page.goto("/provider")
    expect(page.locator("#signed-out")).to_be_visible()
    page.get_by_role("button", name="Connect Test Wallet").click()
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#dashboard")).to_be_visible()

    # List a sandbox key.
    page.select_option("#kind", "sandbox")
    expect(page.locator("#api-key-label")).to_be_hidden()
    page.fill("#models", "web-provider-model")
    page.fill("#price", "0.05")
    page.fill("#max-calls", "50")
    page.fill("#rate", "60")
    page.click("#create-listing")
    expect(page.locator("#notice")).to_contain_text("Listed lst_")
    row = page.locator("#listings tr").filter(has_text="web-provider-model")
    expect(row).to_contain_text("0.05 USDC")
    expect(row).to_contain_text("0 / 50")
    listing_id = row.get_attribute("data-listing")

    # Check the key, pause and resume.
    row.get_by_role("button", name="Check key").click()
    expect(page.locator("#notice")).to_contain_text(f"The key of {listing_id} works.")
    row.get_by_role("button", name="Pause").click()
    expect(row.locator(".badge")).to_have_text("paused")
    paused = httpx.post(
        f"{market.url}/v1/chat/completions",
        json={"model": f"listing/{listing_id}", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert paused.status_code == 404, paused.text  # a paused listing takes no calls
    row.get_by_role("button", name="Resume").click()
    expect(row.locator(".badge")).to_have_text("active")

    # A consumer calls it; the settlement credits the provider's share in the escrow.
    call_listing(market, "web-provider-model")
    deadline = time.monotonic() + 30
    while int(market.onchain.escrow.functions.earnings(provider.address).call()) < EARNED:
        assert time.monotonic() < deadline, "the paid calls did not settle"
        time.sleep(0.2)

    page.reload()
    expect(page.locator("#claimable")).to_have_text("0.09 USDC")
    expect(row.locator(".earned")).to_have_text("0.09 USDC")
    expect(row).to_contain_text(f"{FREE_CALLS + PAID_CALLS} / 50")
    expect(page.locator("#claim")).to_have_text("Claim 0.09 USDC")

    # One click: the wallet (on another chain) is switched, signs the delegation; the relayer
    # submits; the page follows the claim until the chain confirms it.
    page.click("#claim")
    expect(page.locator("#claim-status")).to_contain_text("confirmed", timeout=30_000)
    tx = page.locator("#claim-tx").inner_text()
    assert re.fullmatch(r"0x[0-9a-f]{64}", tx)
    receipt = market.onchain.chain.w3.eth.get_transaction_receipt(tx)
    assert receipt["status"] == 1
    claim = page.request.get("/v1/provider/claims").json()["data"][0]
    assert claim["status"] == "confirmed" and claim["amount_atomic"] == EARNED
    assert market.usdc(provider.address) == EARNED - claim["relayer_fee_atomic"]
    assert int(market.onchain.escrow.functions.earnings(provider.address).call()) == 0
    assert market.onchain.chain.w3.eth.get_balance(provider.address) == 0  # never needed ETH
    expect(page.locator("#claimable")).to_have_text("0.00 USDC")
    expect(page.locator("#claim")).to_be_disabled()
    expect(page.locator("#claims")).to_contain_text(tx)
    provider.screenshot("provider")

    # The market shows the provider's record from the relay's calls.
    page.goto("/")
    record = page.locator(f'article.listing[data-listing="{listing_id}"] .provider-record')
    expect(record).to_contain_text(f"{FREE_CALLS + PAID_CALLS} calls served · 100.0% success · median")

    # Revoked for good: the listing leaves the market and takes no more calls.
    page.goto("/provider")
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Revoke").click()
    expect(page.locator("#notice")).to_have_text(f"{listing_id} is revoked and its key deleted.")
    expect(row.locator(".badge")).to_have_text("revoked")
    expect(row.get_by_role("button")).to_have_count(0)
    gone = httpx.post(
        f"{market.url}/v1/chat/completions",
        json={"model": f"listing/{listing_id}", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert gone.status_code == 404, gone.text
    page.goto("/")
    expect(page.locator(f'article.listing[data-listing="{listing_id}"]')).to_have_count(0)
    assert provider.errors == []


def wait_for_earnings(market: Market, provider: str, amount: int) -> None:
    deadline = time.monotonic() + 30
    while int(market.onchain.escrow.functions.earnings(provider).call()) < amount:
        assert time.monotonic() < deadline, "the paid calls did not settle"
        time.sleep(0.2)


def test_a_smart_account_claims_by_erc7710_and_disables_a_stuck_claims_delegation(
    market: Market, person
) -> None:
    account = Account.create()
    market.upgrade(account)  # as its wallet made it a MetaMask smart account
    market.create_listing(account, models=["web-7710-model"], price_per_call="0.05", max_calls=50)
    call_listing(market, "web-7710-model")
    wait_for_earnings(market, account.address, EARNED)
    provider = person(account)
    page = provider.signed_in("/provider")
    expect(page.locator("#claim-path")).to_contain_text("MetaMask smart account")
    expect(page.locator("#claim-path")).to_contain_text("you claim by ERC-7710")
    expect(page.locator("#claim")).to_have_text("Claim 0.09 USDC")

    # The relayer cannot send (its account is out of ETH): the claim waits, and its delegation
    # stays redeemable; the provider disables it from the page, which the relayer sends once it
    # can, and then the relay fails the claim instead of sending it.
    operator = market.onchain.operator.address
    gas = market.eth(operator)
    market.onchain.twin.rpc("anvil_setBalance", operator, "0x0")
    try:
        page.click("#claim")
        expect(page.locator("#claim-status")).to_contain_text("waiting for the relayer")
        stuck = page.locator("#claims tr").first
        expect(stuck).to_contain_text("requested")
        stuck.get_by_role("button", name="Disable delegation").click()
        expect(page.locator("#disable-status")).to_contain_text("revoking on-chain")
    finally:
        market.onchain.twin.rpc("anvil_setBalance", operator, hex(gas))
    expect(page.locator("#disable-status")).to_contain_text("confirmed", timeout=30_000)
    expect(page.locator("#claim-status")).to_contain_text(
        "The claim failed: delegation revoked", timeout=30_000
    )
    expect(stuck.locator("td").last).to_contain_text("disabled")
    claim = page.request.get("/v1/provider/claims").json()["data"][0]
    assert (claim["kind"], claim["status"], claim["delegation_revoked"]) == ("erc7710", "failed", True)
    digest = bytes.fromhex(claim["delegation_digest"][2:])
    call = {"to": market.framework.delegation_manager, "data": dlg.DISABLED_DELEGATIONS + digest}
    disabled = market.onchain.chain.w3.eth.call(call)  # type: ignore[arg-type]
    assert int.from_bytes(disabled, "big") == 1
    assert int(market.onchain.escrow.functions.earnings(account.address).call()) == EARNED

    # A new claim by ERC-7710: one signed delegation, redeemed by the relayer through the
    # DelegationManager; the provider's own account claims, its ETH stays 0.
    page.click("#claim")
    expect(page.locator("#claim-status")).to_contain_text("confirmed", timeout=30_000)
    expect(page.locator("#claim-status")).to_contain_text("0.09 USDC claimed by ERC-7710 redemption")
    tx = page.locator("#claim-tx").inner_text()
    receipt = market.onchain.chain.w3.eth.get_transaction_receipt(tx)
    assert receipt["status"] == 1 and receipt["to"] == market.framework.delegation_manager
    claim = page.request.get("/v1/provider/claims").json()["data"][0]
    assert (claim["kind"], claim["status"], claim["amount_atomic"]) == ("erc7710", "confirmed", EARNED)
    # This relay's own relayer (the operator's key) charges no fee: no fee delegation to sign.
    assert claim["relayer_fee_atomic"] == 0 and provider.wallet.requests.count("eth_signTypedData_v4") == 3
    expect(page.locator("#claim-status")).to_contain_text("of which 0.00 USDC went to the relayer as its fee")
    assert market.usdc(account.address) == EARNED - claim["relayer_fee_atomic"]
    assert int(market.onchain.escrow.functions.earnings(account.address).call()) == 0
    assert market.eth(account.address) == 0
    expect(page.locator("#claims tr").first.locator("td").last).to_have_text("ERC-7710 (used)")
    provider.screenshot("provider-erc7710")
    assert provider.errors == []


def test_a_key_of_an_openai_compatible_server_is_checked_before_it_is_listed(market: Market, person) -> None:
    with run_in_thread(localmodel_app(api_key="sk-web-local", models=["web-local-1"])) as (upstream,):
        provider = person()
        page = provider.signed_in("/provider")
        page.select_option("#kind", "openai-compatible")
        page.fill("#base-url", f"{upstream}/v1")
        page.fill("#api-key", "sk-not-the-key")
        page.fill("#models", "web-local-1")
        page.fill("#price", "0.01")
        page.fill("#price-in", "1")
        page.fill("#price-out", "2")
        page.fill("#max-output", "200")
        page.fill("#expires", "2031-06-01T12:00")
        page.click("#create-listing")
        expect(page.locator("#notice")).to_have_class(re.compile("error"))
        expect(page.locator("#notice")).to_have_text("The upstream refused this API key")
        expect(page.locator("#listings tr")).to_have_count(0)

        page.fill("#api-key", "sk-web-local")
        page.click("#create-listing")
        expect(page.locator("#notice")).to_contain_text("Listed lst_")
        expect(page.locator("#api-key")).to_have_value("")  # never kept in the page
        row = page.locator("#listings tr").filter(has_text="web-local-1")
        expect(row).to_contain_text("openai-compatible")
        expect(row).to_contain_text("expires 6/1/2031")
        listing_id = row.get_attribute("data-listing")
        listed = page.request.get(f"/v1/listings/{listing_id}").json()
        assert (listed["max_output_tokens"], listed["expires_at"][:10]) == (200, "2031-06-01")
        row.get_by_role("button", name="Check key").click()
        expect(page.locator("#notice")).to_have_text(f"The key of {listing_id} works.")

        # On the market with its token prices; a free call is answered by the server.
        page.goto("/")
        card = page.locator(f'article.listing[data-listing="{listing_id}"]')
        expect(card).to_contain_text("0.01 USDC per call + 1.00/2.00 per M tokens in/out")
        card.get_by_role("link", name="Try it").click()
        page.fill("#prompt", "Hello, local model")
        page.click("#send")
        expect(page.locator(".message.assistant .body")).not_to_be_empty()
        assert provider.errors == []
