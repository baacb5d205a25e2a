"""The pages on a phone-sized screen in dark mode, and the refusals a person must understand:
a rate limit (429 with Retry-After), a listing out of calls, an x402 payment the wallet cannot
cover (402) and a request declined in the wallet, each said on the page."""

from __future__ import annotations

import re

from conftest import FREE_CALLS, Market
from eth_account import Account
from playwright.sync_api import expect

PHONE = {"width": 390, "height": 844}


def test_phone_sized_dark_pages_fit_the_screen(market: Market, person) -> None:
    market.create_listing(Account.create(), models=["web-phone-model"], price_per_call="0.01")
    visitor = person(viewport=PHONE, color_scheme="dark", is_mobile=True, has_touch=True)
    page = visitor.page
    for path in ("/", "/playground", "/account", "/provider"):
        page.goto(path)
        expect(page.locator("#wallet")).to_contain_text("Connect Test Wallet")
        # Nothing wider than the screen: no sideways scrolling of the page.
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], path
    page.goto("/")
    expect(page.locator("article.listing").filter(has_text="web-phone-model")).to_be_visible()
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(17, 19, 23)"  # the dark palette
    visitor.screenshot("market-phone-dark")
    # Signed in, with the account's and the dashboard's tables.
    page.get_by_role("button", name="Connect Test Wallet").click()
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#session")).to_contain_text("signed in")
    for path, shown in (("/account", "#account"), ("/provider", "#dashboard")):
        page.goto(path)
        expect(page.locator(shown)).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], path
    assert visitor.errors == []


def test_refusals_are_explained_on_the_page(market: Market, person) -> None:
    limited = market.create_listing(
        Account.create(), models=["web-limited-model"], price_per_call="0.01", rate_per_minute=1
    )
    visitor = person()
    page = visitor.page
    page.goto(f"/playground?listing={limited['id']}")
    page.fill("#prompt", "first")
    page.click("#send")
    expect(page.locator(".message.assistant")).to_have_count(1)
    page.fill("#prompt", "second, too soon")
    page.click("#send")
    expect(page.locator("#notice")).to_have_text(re.compile(r"^Too many requests\. Try again in \d+ s\."))
    expect(page.locator("#notice")).to_have_class(re.compile("error"))

    spent = market.create_listing(
        Account.create(), models=["web-spent-model"], price_per_call="0.01", max_calls=1
    )
    page.goto(f"/playground?listing={spent['id']}")
    page.fill("#prompt", "the only call")
    expect(page.locator("#listing")).to_have_value(spent["id"])
    page.click("#send")
    expect(page.locator(".message.assistant")).to_have_count(1)
    page.fill("#prompt", "one too many")
    page.click("#send")
    expect(page.locator("#notice")).to_contain_text("This listing cannot take more calls")
    assert visitor.errors == []


def test_a_payment_the_wallet_cannot_cover_is_refused_on_the_page(market: Market, person) -> None:
    listing = market.create_listing(Account.create(), models=["web-broke-model"], price_per_call="0.01")
    visitor = person()  # a wallet without a single USDC
    page = visitor.page
    page.goto(f"/playground?listing={listing['id']}")
    for n in range(FREE_CALLS + 1):
        page.fill("#prompt", f"call {n}")
        page.click("#send")
    expect(page.locator("#pay")).to_be_visible()
    page.get_by_role("button", name="Connect Test Wallet").click()
    page.click("#pay-button")
    expect(page.locator("#pay-text")).to_have_text(
        re.compile(r"^The payment was refused: .*USDC balance does not cover 0\.010* USDC")
    )
    expect(page.locator(".message.assistant")).to_have_count(FREE_CALLS)
    expect(page.locator("#receipt")).to_be_hidden()
    assert visitor.errors == []


def test_a_request_declined_in_the_wallet_is_said_and_changes_nothing(market: Market, person) -> None:
    visitor = person()
    visitor.wallet.declines.add("personal_sign")
    page = visitor.page
    page.goto("/account")
    page.get_by_role("button", name="Connect Test Wallet").click()
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#notice")).to_have_text("You declined the request in your wallet.")
    expect(page.locator("#signed-out")).to_be_visible()
    visitor.wallet.declines.clear()
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#account")).to_be_visible()
    expect(page.locator("#notice")).to_be_hidden()
    assert visitor.errors == []
