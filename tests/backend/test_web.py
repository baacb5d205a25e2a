"""The marketplace pages as the relay serves them (security headers, the shipped browser
libraries), the pages' cookie session with its CSRF check, and the public reads the pages use:
the network, providers' records, the caller's free calls, a listing's key check."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from eth_account import Account
from quotra.web import PAGES, STATIC_DIR, VENDOR_FILES
from relay_helpers import chat_body, sign

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted(PAGES))
async def test_pages__strict_csp_no_inline_script(relay, path: str) -> None:
    reply = await relay.client.get(path)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/html")
    csp = reply.headers["content-security-policy"]
    for directive in ("default-src 'self'", "script-src 'self'", "connect-src 'self'"):
        assert directive in csp
    assert "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert reply.headers["x-content-type-options"] == "nosniff"
    html = reply.text
    # Scripts only from this origin's static files, no inline script, style or handler.
    assert re.findall(r"<script[^>]*>", html) and all(
        'src="/static/' in tag for tag in re.findall(r"<script[^>]*>", html)
    )
    assert "<style" not in html and " style=" not in html and not re.search(r"\son\w+=", html)
    assert "http://" not in html and "https://" not in html.replace("https://my-server.example/v1", "")


async def test_static_files__javascript_with_the_pages_headers(relay) -> None:
    reply = await relay.client.get("/static/market.js")
    assert reply.status_code == 200
    assert "javascript" in reply.headers["content-type"]
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in reply.headers["content-security-policy"]
    assert (await relay.client.get("/static/nothing.js")).status_code == 404


@pytest.mark.parametrize("name", VENDOR_FILES)
async def test_browser_libraries_are_shipped_not_fetched(relay, name: str) -> None:
    reply = await relay.client.get(f"/static/vendor/{name}")
    assert reply.status_code == 200 and "export" in reply.text
    # Every module imports only from this origin (relative paths).
    for script in STATIC_DIR.glob("*.js"):
        for target in re.findall(r"""from\s+["']([^"']+)["']""", script.read_text()):
            assert target.startswith("./"), (script.name, target)


def test_package_json_pins_the_browser_libraries() -> None:
    import json

    dependencies = json.loads((ROOT / "package.json").read_text())["dependencies"]
    assert dependencies["marked"] == "18.2.1" and dependencies["dompurify"] == "3.4.18"


# ---- the pages' session: an HttpOnly cookie, CSRF-checked ------------------------------------------


async def _cookie_sign_in(relay, account) -> dict:
    nonce = (await relay.client.post("/v1/auth/nonce", json={"address": account.address})).json()
    reply = await relay.client.post(
        "/v1/auth/verify",
        json={"message": nonce["message"], "signature": sign(account, nonce["message"])},
        headers={"Quotra-Web": "1"},
    )
    assert reply.status_code == 200, reply.text
    return reply


async def test_cookie_session__httponly_strict__token_not_shown_to_the_page(relay) -> None:
    account = Account.create()
    reply = await _cookie_sign_in(relay, account)
    assert reply.json()["access_token"] is None and reply.json()["address"] == account.address
    cookie = reply.headers["set-cookie"]
    assert cookie.startswith("quotra_session=qs_")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # http://testserver; https relays set it (next test)
    session = await relay.client.get("/v1/auth/session")
    assert session.status_code == 200 and session.json() == {"address": account.address}


async def test_cookie_is_secure_behind_https(start_relay) -> None:
    async with start_relay(public_url="https://market.example") as relay:
        reply = await _cookie_sign_in(relay, Account.create())
        assert "Secure" in reply.headers["set-cookie"]


async def test_bearer_sign_in_is_unchanged_for_api_clients(relay) -> None:
    account = Account.create()
    nonce = (await relay.client.post("/v1/auth/nonce", json={"address": account.address})).json()
    reply = await relay.client.post(
        "/v1/auth/verify", json={"message": nonce["message"], "signature": sign(account, nonce["message"])}
    )
    assert reply.json()["access_token"].startswith("qs_") and "set-cookie" not in reply.headers


async def test_cookie_session__state_change_needs_the_page_header_or_own_origin(relay) -> None:
    await _cookie_sign_in(relay, Account.create())
    body = {"kind": "sandbox", "models": ["m"], "price_per_call": "0.01"}
    forged = await relay.client.post("/v1/listings", json=body)
    assert forged.status_code == 403 and forged.json()["error"]["code"] == "csrf_failed"
    other_site = await relay.client.post(
        "/v1/listings", json=body, headers={"Origin": "https://evil.example"}
    )
    assert other_site.status_code == 403
    assert (await relay.client.get("/v1/listings")).json()["data"] == []  # nothing was created
    own_origin = await relay.client.post("/v1/listings", json=body, headers={"Origin": "http://testserver"})
    assert own_origin.status_code == 201
    from_page = await relay.client.post("/v1/listings", json=body, headers={"Quotra-Web": "1"})
    assert from_page.status_code == 201
    # Reads need no header; a forged chat is refused too (it would spend the wallet's free calls).
    assert (await relay.client.get("/v1/listings/mine")).status_code == 200
    chat = await relay.client.post("/v1/chat/completions", json=chat_body("m"))
    assert chat.status_code == 403


async def test_logout_clears_the_cookie(relay) -> None:
    await _cookie_sign_in(relay, Account.create())
    reply = await relay.client.post("/v1/auth/logout", headers={"Quotra-Web": "1"})
    assert reply.status_code == 204 and "quotra_session=" in reply.headers["set-cookie"]
    assert (await relay.client.get("/v1/auth/session")).status_code == 401


async def test_a_forged_cookie_is_refused(relay) -> None:
    relay.client.cookies.set("quotra_session", "qs_forged.mac")
    reply = await relay.client.get("/v1/auth/session")
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_session"


# ---- public reads for the pages ---------------------------------------------------------------------


async def test_network_without_a_chain(relay) -> None:
    network = (await relay.client.get("/v1/network")).json()
    assert network["chain_id"] == 84532 and network["network"] == "eip155:84532"
    assert network["chain_name"] == "Base Sepolia" and network["wallet_rpc_url"] == "https://sepolia.base.org"
    assert network["escrow"] is None and network["usdc"] is None
    assert (network["x402"], network["prepaid"], network["claims"]) == (False, False, False)
    assert network["playground_free_calls"] == 3


async def test_network__wallet_rpc_url_is_configurable_never_the_relays_own(start_relay) -> None:
    async with start_relay(
        wallet_rpc_url="http://127.0.0.1:8545", chain_rpc_url="http://127.0.0.1:9/?key=secret"
    ) as relay:
        network = (await relay.client.get("/v1/network")).json()
        assert network["wallet_rpc_url"] == "http://127.0.0.1:8545"
        assert "secret" not in str(network)


async def test_free_calls_counted_per_caller_and_listing(relay) -> None:
    _, headers = await relay.provider()
    listing = await relay.listing(headers, models=["free-model"])
    assert (await relay.client.get("/v1/playground")).json() == {"free_calls_per_listing": 3, "used": {}}
    for _ in range(2):
        reply = await relay.client.post("/v1/chat/completions", json=chat_body("free-model"))
        assert reply.status_code == 200
    assert (await relay.client.get("/v1/playground")).json()["used"] == {listing["id"]: 2}
    # A signed-in wallet has its own free calls.
    _, wallet = await relay.provider()
    assert (await relay.client.get("/v1/playground", headers=wallet)).json()["used"] == {}


async def test_provider_record_from_the_call_records(relay) -> None:
    from quotra.upstream.base import UpstreamUnavailable

    provider, headers = await relay.provider()
    first = await relay.listing(headers, models=["rec-a"])
    await relay.listing(headers, models=["rec-b"])
    for model in ("rec-a", "rec-a", "rec-b"):
        assert (await relay.client.post("/v1/chat/completions", json=chat_body(model))).status_code == 200
    relay.upstream.failures.append(UpstreamUnavailable("down"))
    failed = await relay.client.post("/v1/chat/completions", json=chat_body("rec-a"))
    assert failed.status_code >= 500
    other, _ = await relay.provider()
    reply = await relay.client.get(
        "/v1/providers", params=[("address", provider.address.lower()), ("address", other.address)]
    )
    assert reply.status_code == 200
    (record,) = reply.json()["data"]  # the other wallet never listed anything
    assert record["address"] == provider.address and record["listings"] == 2
    assert (record["calls_served"], record["upstream_failures"]) == (3, 1)
    assert record["success_rate"] == pytest.approx(0.75)
    assert isinstance(record["median_latency_ms"], int) and record["median_latency_ms"] >= 0
    assert record["first_listed_at"].startswith(first["created_at"][:19])


async def test_providers__bad_address_is_a_400(relay) -> None:
    reply = await relay.client.get("/v1/providers", params={"address": "0x123"})
    assert reply.status_code == 400
    assert (await relay.client.get("/v1/providers")).status_code == 400


async def test_listing_key_check(relay) -> None:
    _, headers = await relay.provider()
    listing = await relay.listing(headers, kind="openai", api_key="sk-good", models=["gpt-x"])
    check = f"/v1/listings/{listing['id']}/check"
    assert (await relay.client.post(check, headers=headers)).status_code == 200
    relay.upstream.refused_keys.add("sk-good")  # the provider's key was revoked upstream
    refused = await relay.client.post(f"/v1/listings/{listing['id']}/check", headers=headers)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_upstream_key"
    _, stranger = await relay.provider()
    assert (await relay.client.post(check, headers=stranger)).status_code == 403
    await relay.client.delete(f"/v1/listings/{listing['id']}", headers=headers)
    gone = await relay.client.post(f"/v1/listings/{listing['id']}/check", headers=headers)
    assert gone.status_code == 400 and gone.json()["error"]["code"] == "listing_revoked"
