"""A consumer in the browser: browse → free playground calls (streamed, markdown rendered safely)
→ an x402 call paid from the wallet (after switching it to the twin) whose USDC moves on chain →
sign in → gasless deposit → spend permission → API key (shown once, copied) that works with the
openai SDK → usage with its cost → the permission revoked and renewed → the key capped and
revoked → a withdrawal requested and completed. And a MetaMask smart account's periodic allowance:
granted on the page, an automatic top-up of the period amount, revoked."""

from __future__ import annotations

import json
import re
import time
from decimal import Decimal

import openai
from conftest import FREE_CALLS, Market
from eth_account import Account
from playwright.sync_api import expect
from quotra.chain import delegation as dlg
from web3.exceptions import ContractCustomError, ContractLogicError

USDC = 10**6
PRICE = 20_000  # 0.02 USDC per call
XSS = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
# Markdown for remote content and a script link, within the 80 characters the sandbox echoes.
REMOTE = "![tracker](http://127.0.0.1:9/pixel.png) [click](javascript:window.__pwned=3)"


def wait_until(check, what: str, within: float = 30.0):
    deadline = time.monotonic() + within
    while not (result := check()):
        assert time.monotonic() < deadline, f"not reached in {within:.0f} s: {what}"
        time.sleep(0.2)
    return result


def sdk_status(client: openai.OpenAI, listing_id: str, content: str) -> int:
    """What a call through the openai SDK gets: 200, or the status it was refused with."""
    try:
        client.chat.completions.create(
            model=f"listing/{listing_id}", messages=[{"role": "user", "content": content}]
        )
    except openai.APIStatusError as refused:
        return refused.status_code
    return 200


def test_consumer_journey(market: Market, person) -> None:
    provider = Account.create()
    listing = market.create_listing(
        provider, models=["web-sandbox-mini"], price_per_call="0.02", max_calls=100
    )
    consumer = person()
    market.onchain.twin.mint_usdc(consumer.address, 5 * USDC)
    page = consumer.page

    # Browse: the listing, its price, quota, free calls and its provider's (empty) record.
    page.goto("/")
    card = page.locator(f'article.listing[data-listing="{listing["id"]}"]')
    expect(card).to_contain_text("0.02 USDC per call")
    expect(card).to_contain_text("100 calls left")
    expect(card).to_contain_text(f"{FREE_CALLS} free calls left")
    expect(card.locator(".provider-record")).to_have_text(re.compile(r"^No calls served yet · listing for"))
    expect(page.locator("#models")).to_contain_text("web-sandbox-mini")
    consumer.screenshot("market")

    # The playground: free calls, streamed, markdown rendered; HTML in an answer stays text.
    card.get_by_role("link", name="Try it").click()
    expect(page.locator("#free-calls")).to_have_text(f"{FREE_CALLS} of {FREE_CALLS} free calls left")
    page.fill("#prompt", "Hello **bold** world")
    page.click("#send")
    answer = page.locator(".message.assistant").nth(0)
    expect(answer.locator("strong")).to_have_text("bold")
    expect(answer).to_contain_text("Sandbox reply to: Hello bold world")
    expect(page.locator("#free-calls")).to_have_text(f"1 of {FREE_CALLS} free calls left")

    page.fill("#prompt", XSS)
    page.click("#send")
    answer = page.locator(".message.assistant").nth(1)
    expect(answer).to_contain_text(XSS)  # shown as text
    assert answer.locator("img, script").count() == 0
    assert page.evaluate("window.__pwned") is None
    expect(page.locator("#free-calls")).to_have_text(f"0 of {FREE_CALLS} free calls left")

    # Out of free calls: a 402 and the offer to pay from the wallet.
    page.fill("#prompt", "Now I pay")
    page.click("#send")
    expect(page.locator("#pay")).to_be_visible()
    expect(page.locator("#pay-button")).to_have_text("Pay 0.02 USDC from my wallet and send")

    # The wallet is on Ethereum mainnet: the page offers the switch (and adds the twin).
    page.get_by_role("button", name="Connect Test Wallet").click()
    expect(page.locator("#wallet")).to_contain_text("wrong network (1)")
    before = market.usdc(consumer.address)
    page.click("#pay-button")
    expect(page.locator(".message.assistant").nth(2)).to_contain_text("Sandbox reply to: Now I pay")
    assert consumer.wallet.chain_id == 84532
    assert consumer.wallet.known_chains[84532] == [market.onchain.twin.rpc_url]
    expect(page.locator("#wallet")).to_contain_text("Base Sepolia")
    expect(page.locator("#receipt-amount")).to_have_text("0.02 USDC")
    expect(page.locator("#receipt-payer")).to_have_text(consumer.address)
    expect(page.locator("#receipt-status")).to_have_text("settled", timeout=30_000)
    expect(page.locator("#receipt-tx")).to_have_text(re.compile(r"^0x[0-9a-f]{64}$"))
    assert market.usdc(consumer.address) == before - PRICE  # settled on chain, no ETH spent
    assert market.onchain.chain.w3.eth.get_balance(consumer.address) == 0
    consumer.screenshot("playground")

    # Sign in with Ethereum: the session is an HttpOnly cookie the page cannot read.
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#session")).to_contain_text("signed in")
    cookies = {c["name"]: c for c in consumer.context.cookies()}
    assert cookies["quotra_session"]["httpOnly"] and cookies["quotra_session"]["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""
    assert page.evaluate("Object.keys(localStorage).length + Object.keys(sessionStorage).length") <= 1

    # Gasless deposit, then a spend permission.
    page.goto("/account")
    page.fill("#deposit-amount", "1.5")
    page.click("#deposit-button")
    expect(page.locator("#deposit-result")).to_contain_text("confirmed", timeout=30_000)
    assert market.deposit(consumer.address) == 1_500_000
    expect(page.locator("#deposit")).to_have_text("1.50 USDC")
    page.fill("#permission-allowance", "1")
    page.click("#permission-button")
    expect(page.locator("#permission-state")).to_contain_text("active")
    expect(page.locator("#available")).to_have_text("1.00 USDC")

    # An API key, shown once with a copy button, that works with the openai SDK.
    consumer.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.fill("#key-name", "laptop")
    page.fill("#key-cap", "0.5")
    page.click("#key-button")
    expect(page.locator("#new-key-value")).to_have_text(re.compile(r"^sk-quotra-live-"))
    secret = page.locator("#new-key-value").inner_text()
    page.click("#copy-key")
    assert page.evaluate("navigator.clipboard.readText()") == secret
    expect(page.locator("#keys")).to_contain_text("laptop")
    client = openai.OpenAI(base_url=f"{market.url}/v1", api_key=secret, max_retries=0)
    completion = client.chat.completions.create(
        model=f"listing/{listing['id']}", messages=[{"role": "user", "content": "through the SDK"}]
    )
    assert completion.choices[0].message.content == "Sandbox reply to: through the SDK"

    # Usage shows every call of the wallet with its cost and settlement.
    wait_until(lambda: market.deposit(consumer.address) == 1_500_000 - PRICE, "the prepaid call settled")
    page.reload()
    expect(page.locator("#new-key")).to_be_hidden()  # shown once: the secret is gone for good
    assert secret not in page.content()
    usage = page.locator("#usage")
    expect(usage.locator("tr").filter(has_text="prepaid")).to_contain_text("0.02")
    expect(usage.locator("tr").filter(has_text="prepaid").locator(".badge")).to_have_text("settled")
    expect(usage.locator("tr").filter(has_text="x402")).to_contain_text("0.02")
    consumer.screenshot("account")

    # The permission revoked without ETH: the relayer submits the signed Revocation.
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#revoke-permission")
    expect(page.locator("#revocation-result")).to_contain_text("confirmed", timeout=30_000)
    expect(page.locator("#permission-state")).to_contain_text("No permission")
    expect(page.locator("#revoke-permission")).to_be_hidden()
    assert sdk_status(client, listing["id"], "after revoking") == 402

    # A new permission renews it: the same key calls again.
    page.fill("#permission-allowance", "1")
    page.click("#permission-button")
    expect(page.locator("#permission-state")).to_contain_text("active")
    assert sdk_status(client, listing["id"], "renewed") == 200

    # The key's cap lowered to what it spent (two calls) and a bit: the next call is over budget.
    key_row = page.locator("#keys tr").filter(has_text="laptop")
    expect(key_row.locator("input.cap")).to_have_value("0.50")
    key_row.locator("input.cap").fill("0.05")
    key_row.get_by_role("button", name="Set cap").click()
    expect(page.locator("#notice")).to_have_text("The key's spend cap is 0.05 USDC now.")
    expect(key_row.locator("input.cap")).to_have_value("0.05")
    assert sdk_status(client, listing["id"], "over the cap") == 402
    page.once("dialog", lambda dialog: dialog.accept())
    key_row.get_by_role("button", name="Revoke").click()
    expect(key_row.locator(".badge")).to_have_text("revoked")
    assert sdk_status(client, listing["id"], "revoked key") == 401

    # A withdrawal without ETH (the test wallet cannot even send a transaction): each step signed
    # on the page and sent by the relay's relayer, requested, pending, then completed at the
    # relayer's fee (this escrow has no withdrawal delay).
    assert market.onchain.chain.w3.eth.get_balance(consumer.address) == 0
    settled = 1_500_000 - 2 * PRICE  # the deposit once both prepaid calls settled
    wait_until(lambda: market.deposit(consumer.address) == settled, "the renewed permission's call settled")
    wallet_usdc = market.usdc(consumer.address)
    expect(page.locator("#withdraw-complete")).to_be_disabled()  # nothing requested yet
    page.fill("#withdraw-amount", "1")
    page.click("#withdraw-request")
    expect(page.locator("#withdraw-result")).to_have_text(
        re.compile(r"^Withdrawal requested in tx 0x[0-9a-f]{64}\.$")
    )
    expect(page.locator("#pending-withdrawal")).to_have_text("1.00 USDC")
    expect(page.locator("#withdrawal-unlock")).to_contain_text("can be completed from")
    page.click("#withdraw-complete")
    completed = re.compile(r"^Withdrawal completed in tx 0x[0-9a-f]{64} \(relayer fee (\d+\.\d+) USDC\)\.$")
    expect(page.locator("#withdraw-result")).to_have_text(completed)
    fee = Decimal(completed.match(page.locator("#withdraw-result").inner_text()).group(1))
    expect(page.locator("#pending-withdrawal")).to_have_text("0.00 USDC")
    expect(page.locator("#withdrawal-unlock")).to_have_text("")
    expect(page.locator("#withdraw-complete")).to_be_disabled()
    assert market.deposit(consumer.address) == settled - USDC
    assert market.usdc(consumer.address) == wallet_usdc + USDC - int(fee * USDC)
    assert fee < 1 and market.onchain.chain.w3.eth.get_balance(consumer.address) == 0  # the quoted fee
    assert consumer.errors == []


def test_answers_bring_no_remote_content_nor_script_links(market: Market, person) -> None:
    listing = market.create_listing(Account.create(), models=["web-markdown-model"], price_per_call="0.01")
    visitor = person()
    page = visitor.page
    page.goto(f"/playground?listing={listing['id']}")
    page.fill("#prompt", REMOTE)
    page.click("#send")
    answer = page.locator(".message.assistant")
    expect(answer).to_contain_text("Sandbox reply to: [image: tracker] click")
    assert answer.locator("img").count() == 0
    assert answer.locator("a").evaluate_all("links => links.map((a) => a.getAttribute('href'))") == [None]
    page.click("a:has-text('click')")
    assert page.evaluate("window.__pwned") is None
    assert visitor.errors == []


def test_the_playground_calls_the_model_picked(market: Market, person) -> None:
    listing = market.create_listing(
        Account.create(), models=["web-pick-small", "web-pick-large"], price_per_call="0.01"
    )
    visitor = person()
    page = visitor.page
    page.goto(f"/playground?listing={listing['id']}")
    expect(page.locator("#model option")).to_have_text(["web-pick-small", "web-pick-large"])
    page.select_option("#model", "web-pick-large")
    page.fill("#prompt", "which model?")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.click("#send")
    assert json.loads(sent.value.post_data or "{}")["model"] == f"listing/{listing['id']}/web-pick-large"
    expect(page.locator(".message.assistant")).to_contain_text("Sandbox reply to: which model?")
    assert visitor.errors == []


def redeem_revert(market: Market, context: bytes, consumer: str, amount: int) -> str | None:
    """Why one more top-up of `amount` under the allowance would revert (None: it would not),
    simulated as the relay's operator sends it."""
    operator = market.onchain.operator.address
    entries = dlg.top_up_redemptions(
        context, usdc=market.onchain.usdc.address, escrow=market.onchain.escrow.address,
        operator=operator, consumer=consumer, amount=amount,
    )  # fmt: skip
    call = {"from": operator, "to": market.framework.delegation_manager, "data": dlg.encode_redeem(entries)}
    try:
        market.onchain.chain.w3.eth.call(call)  # type: ignore[arg-type]
    except (ContractCustomError, ContractLogicError) as reverted:
        return dlg.describe_revert(reverted.data)  # type: ignore[arg-type]
    return None


def test_a_smart_account_grants_a_periodic_allowance_that_tops_up_its_deposit(market: Market, person) -> None:
    """A consumer whose account is a MetaMask smart account (EIP-7702, as its wallet upgraded it)
    grants the relay a periodic USDC allowance on the page; the relay tops the empty deposit up by
    the period amount, no more; the page shows what the period has left and the top-up; the
    allowance revoked from the page (disableDelegation, no ETH) cannot be redeemed any more."""
    account = Account.create()
    market.onchain.twin.mint_usdc(account.address, 10 * USDC)
    market.upgrade(account)
    consumer = person(account)
    page = consumer.signed_in("/account")
    expect(page.locator("#allowance-account")).to_contain_text("MetaMask smart account")

    page.fill("#allowance-amount", "2")
    page.select_option("#allowance-period", "86400")
    page.click("#allowance-button")
    expect(page.locator("#allowance-result")).to_have_text(
        "Allowance granted: up to 2.00 USDC per day tops up your deposit when it runs low."
    )
    # Below the low-water mark (1 USDC): the relay redeems the period amount, once.
    wait_until(lambda: market.deposit(account.address) == 2 * USDC, "the automatic top-up")
    assert market.usdc(account.address) == 8 * USDC and market.eth(account.address) == 0
    page.reload()
    row = page.locator("#allowances tr")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("2.00 USDC per day")
    expect(row.locator(".left")).to_have_text("0.00 USDC")
    expect(row.locator(".top-ups")).to_have_text("1 (2.00 USDC)")
    expect(row.locator(".badge")).to_have_text("active")
    expect(page.locator("#deposit")).to_have_text("2.00 USDC")
    consumer.screenshot("account-allowance")

    # The period's cap holds on-chain; once revoked, nothing can be redeemed under it at all.
    listed = page.request.get("/v1/account/allowances").json()["data"][0]
    grant = dlg.Delegation.from_message(listed["delegation"])
    domain = dlg.domain(market.onchain.chain.chain_id, market.framework.delegation_manager)
    signature = Account.sign_typed_data(account.key, full_message=grant.typed_data(domain)).signature
    context = dlg.encode_context([grant.signed(bytes(signature))])
    assert "0x" + grant.hash.hex() == listed["hash"]
    exceeded = "ERC20PeriodTransferEnforcer:transfer-amount-exceeded"
    assert redeem_revert(market, context, account.address, USDC) == exceeded
    row.get_by_role("button", name="Revoke").click()
    expect(page.locator("#allowance-result")).to_contain_text("confirmed", timeout=30_000)
    expect(page.locator("#notice")).to_have_text(
        "Allowance revoked: the relay can take nothing more under it."
    )
    expect(row.locator(".badge")).to_have_text("revoked")
    expect(row.get_by_role("button")).to_have_count(0)
    assert redeem_revert(market, context, account.address, USDC) == "CannotUseADisabledDelegation"
    assert market.deposit(account.address) == 2 * USDC and market.eth(account.address) == 0
    assert consumer.errors == []
