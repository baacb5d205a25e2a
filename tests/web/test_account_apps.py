"""An end user on the account page: the app its wallet pays for (connected through the API, as the
app's developer would), listed with its developer, markup and permission, then disconnected after
a confirm; the relay then lists no app for the wallet."""

from __future__ import annotations

import httpx
from conftest import Market
from eth_account import Account
from playwright.sync_api import expect


def test_account_page__lists_connected_app__disconnect_removes_it(market: Market, person) -> None:
    developer, user = Account.create(), Account.create()
    with httpx.Client(base_url=market.url, timeout=30) as client:
        dev = market.sign_in(client, developer)
        app = client.post("/v1/apps", json={"name": "<b>tutor</b>", "markup_percent": "12.5"}, headers=dev)
        assert app.status_code == 201, app.text
        app_id = app.json()["id"]
        typed = client.get(
            f"/v1/apps/{app_id}/users/bob/wallet/typed-data",
            params={"wallet": user.address, "allowance": "0.5"},
            headers=dev,
        )
        assert typed.status_code == 200, typed.text
        signed = Account.sign_typed_data(user.key, full_message=typed.json()["typed_data"])
        signature = "0x" + bytes(signed.signature).hex()
        connected = client.post(
            f"/v1/apps/{app_id}/users/bob/wallet",
            json={"permission": typed.json()["typed_data"]["message"], "signature": signature},
            headers=dev,
        )
        assert connected.status_code == 200, connected.text

    consumer = person(user)
    page = consumer.signed_in("/account")
    row = page.locator(f'#apps tr[data-app="{app_id}"]')
    expect(row).to_contain_text("<b>tutor</b>")  # the app's name as text, never as HTML
    assert row.locator("b").count() == 0
    expect(row).to_contain_text('you are "bob" there')
    expect(row).to_contain_text(developer.address)
    expect(row).to_contain_text("12.50 %")
    expect(row.locator(".permission")).to_contain_text("0.00 of 0.50 USDC used, 0.50 left")
    expect(row).to_contain_text("active")
    expect(page.locator("#no-apps")).to_be_hidden()
    consumer.screenshot("account-apps")

    dialogs: list[str] = []
    page.once("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
    row.get_by_role("button", name="Disconnect").click()
    expect(page.locator("#no-apps")).to_be_visible()
    expect(page.locator("#notice")).to_have_text('"<b>tutor</b>" no longer charges your wallet.')
    assert dialogs == [
        'Disconnect "<b>tutor</b>"? It stops charging your wallet; calls already served still settle.'
    ]
    assert page.locator("#apps tr").count() == 0
    assert consumer.errors == []

    with httpx.Client(base_url=market.url, timeout=30) as client:
        listed = client.get("/v1/account/apps", headers=market.sign_in(client, user))
        assert listed.status_code == 200, listed.text
        assert listed.json()["data"] == []
