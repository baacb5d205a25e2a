"""Browsing without a wallet: the market's filters and sort are `GET /v1/listings`'s, and the model
catalogue is `GET /v1/models`."""

from __future__ import annotations

from conftest import Market
from eth_account import Account
from playwright.sync_api import expect


def test_filters_and_sort_narrow_the_listings(market: Market, person) -> None:
    owner = Account.create()
    cheap = market.create_listing(owner, models=["web-browse-model"], price_per_call="0.03", max_calls=10)
    dear = market.create_listing(owner, models=["web-browse-model"], price_per_call="0.07", max_calls=500)
    visitor = person()
    page = visitor.page
    page.goto("/")
    cards = page.locator("article.listing")

    page.select_option("#filter-model", "web-browse-model")
    expect(cards).to_have_count(2)
    expect(cards.nth(0)).to_have_attribute("data-listing", cheap["id"])  # cheapest first
    page.select_option("#filter-sort", "-price")
    expect(cards.nth(0)).to_have_attribute("data-listing", dear["id"])

    page.fill("#filter-price", "0.05")
    page.press("#filter-price", "Tab")
    expect(cards).to_have_count(1)
    expect(cards.nth(0)).to_have_attribute("data-listing", cheap["id"])

    page.fill("#filter-price", "")
    page.fill("#filter-remaining", "100")
    page.press("#filter-remaining", "Tab")
    expect(cards).to_have_count(1)
    expect(cards.nth(0)).to_have_attribute("data-listing", dear["id"])
    expect(cards.nth(0)).to_contain_text("500 calls left")

    catalogue = page.locator("#models tr").filter(has_text="web-browse-model")
    expect(catalogue.locator("td")).to_have_text(["web-browse-model", "2", "0.03"])
    assert visitor.errors == []
