"""An app with a 20 % markup on the twin, through the relay's API: the developer deposits, signs a
permission that allows the markup, makes an app key and calls for an end user it gave a grant;
the relay's worker settles on the escrow, which credits the developer exactly the markup, the
provider 90 % of the base and the platform 10 % of the base, all out of the developer's deposit.
An end user's wallet that pays for two apps settles each app's calls under its own permission."""

from __future__ import annotations

from typing import Any

import httpx
from e2e_helpers import OnChain, create_listing, settled, sign_in
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3.logs import DISCARD

USDC = 10**6
BASE = USDC // 100  # the listing's price per call: 0.01 USDC
MARKUP = BASE * 2_000 // 10_000  # the app's 20 %


async def developer_with_app(onchain: OnChain, client: httpx.AsyncClient, deposit: int) -> tuple[Any, ...]:
    """A developer who deposited `deposit` itself, made a 20 % app, signed the permission the relay
    offers for it and made a live app key: (wallet, app, key)."""
    wallet: LocalAccount = Account.create()
    onchain.twin.fund_eth(wallet.address, 10**18)
    onchain.twin.mint_usdc(wallet.address, deposit)
    onchain.chain.transact(onchain.usdc.functions.approve(onchain.escrow.address, deposit), wallet)
    onchain.chain.transact(onchain.escrow.functions.deposit(deposit, wallet.address), wallet)
    headers = await sign_in(str(client.base_url).rstrip("/"), wallet)
    app = await client.post("/v1/apps", json={"name": "tutor", "markup_percent": "20"}, headers=headers)
    assert app.status_code == 201, app.text
    assert app.json()["permission_allows_markup"] is False
    typed = await client.get(
        "/v1/account/permission/typed-data", params={"allowance": "1", "days": 30}, headers=headers
    )
    message = typed.json()["typed_data"]["message"]
    assert (message["developer"], message["max_markup_bps"]) == (wallet.address, 2_000)
    signed = Account.sign_typed_data(wallet.key, full_message=typed.json()["typed_data"])
    reply = await client.post(
        "/v1/account/permission",
        json={"permission": message, "signature": "0x" + bytes(signed.signature).hex()},
        headers=headers,
    )
    assert reply.status_code == 200, reply.text
    key = await client.post(f"/v1/apps/{app.json()['id']}/keys", json={"name": "prod"}, headers=headers)
    assert key.status_code == 201, key.text
    return wallet, app.json(), key.json()["key"]


async def test_markup_app__settles_markup_to_developer_and_base_90_10(
    onchain: OnChain, start_relay: Any
) -> None:
    escrow = onchain.escrow.functions
    fees_before = int(escrow.platform_fees().call())
    with start_relay() as served:
        provider = Account.create()
        listing = await create_listing(served.url, provider, price_per_call="0.01")
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
            wallet, app, key = await developer_with_app(onchain, client, 2 * USDC)
            auth = {"Authorization": f"Bearer {key}"}
            grant = await client.post(
                "/v1/funding/grant",
                json={"external_user_id": "alice", "amount": "0.012", "description": "welcome"},
                headers=auth,
            )
            assert grant.status_code == 201, grant.text
            body = {"model": f"listing/{listing['id']}", "messages": [{"role": "user", "content": "hi"}]}
            call_ids = []
            for _ in range(2):  # the first out of alice's grant, the second her own spending
                reply = await client.post(
                    "/v1/chat/completions", json=body, headers={**auth, "X-Quotra-User": "alice"}
                )
                assert reply.status_code == 200, reply.text
                call_ids.append(reply.headers["quotra-call-id"])
        outcomes = [await settled(served.url, call_id, auth) for call_id in call_ids]

        assert [(c["state"], c["amount_atomic"], c["markup_atomic"]) for c in outcomes] == [
            ("settled", BASE + MARKUP, MARKUP)
        ] * 2
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
            usage = await client.get(f"/v1/apps/{app['id']}/users/alice/usage", headers=auth)
            balance = await client.get("/v1/balance", params={"user": "alice"}, headers=auth)
    assert [u["granted_atomic"] for u in usage.json()["data"]] == [0, BASE + MARKUP]
    assert balance.json()["user"]["spent_atomic"] == BASE + MARKUP

    # The escrow: the developer gets exactly the markup, the provider 90 % of the base and the
    # platform 10 % of the base, all of it out of the developer's deposit.
    assert onchain.earnings(wallet.address) == 2 * MARKUP
    assert onchain.earnings(provider.address) == 2 * (BASE - BASE // 10)
    assert int(escrow.platform_fees().call()) - fees_before == 2 * (BASE // 10)
    assert int(escrow.deposits(wallet.address).call()) == 2 * USDC - 2 * (BASE + MARKUP)
    assert onchain.credited(wallet.address) == (2 * MARKUP, 0)
    receipt = onchain.chain.w3.eth.get_transaction_receipt(outcomes[-1]["transaction"])
    settlements = onchain.escrow.events.ChargesSettled().process_receipt(receipt, errors=DISCARD)
    assert sum(int(e.args["markup"]) for e in settlements) >= MARKUP
    # The developer claims its markup like any earnings.
    onchain.chain.transact(escrow.claim(2 * MARKUP, wallet.address), wallet)
    assert onchain.balance(wallet.address) == 2 * MARKUP
    assert onchain.solvent()


async def test_user_billing__one_wallet_two_apps__each_settles_under_its_own_permission(
    onchain: OnChain, start_relay: Any
) -> None:
    """An end user's wallet pays for two apps of two developers at once: each app's call settles
    under the permission the wallet signed for that app, its markup to that app's developer."""
    escrow = onchain.escrow.functions
    with start_relay() as served:
        provider = Account.create()
        listing = await create_listing(served.url, provider, price_per_call="0.01")
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
            apps = [await developer_with_app(onchain, client, USDC) for _ in range(2)]
            # The end user deposits itself and signs the permission each app offers it.
            user: LocalAccount = Account.create()
            onchain.twin.fund_eth(user.address, 10**18)
            onchain.twin.mint_usdc(user.address, USDC)
            onchain.chain.transact(onchain.usdc.functions.approve(onchain.escrow.address, USDC), user)
            onchain.chain.transact(escrow.deposit(USDC, user.address), user)
            body = {"model": f"listing/{listing['id']}", "messages": [{"role": "user", "content": "hi"}]}
            calls, digests = [], []
            for _developer, app, key in apps:
                auth = {"Authorization": f"Bearer {key}"}
                typed = await client.get(
                    f"/v1/apps/{app['id']}/users/bob/wallet/typed-data",
                    params={"wallet": user.address, "allowance": "0.5"},
                    headers=auth,
                )
                signed = Account.sign_typed_data(user.key, full_message=typed.json()["typed_data"])
                reply = await client.post(
                    f"/v1/apps/{app['id']}/users/bob/wallet",
                    json={
                        "permission": typed.json()["typed_data"]["message"],
                        "signature": "0x" + bytes(signed.signature).hex(),
                    },
                    headers=auth,
                )
                assert reply.status_code == 200, reply.text
                digests.append(typed.json()["digest"])
            for _developer, _app, key in apps:
                auth = {"Authorization": f"Bearer {key}"}
                reply = await client.post("/v1/users/bob/chat/completions", json=body, headers=auth)
                assert reply.status_code == 200, reply.text
                calls.append((reply.headers["quotra-call-id"], auth))
        outcomes = [await settled(served.url, call_id, auth) for call_id, auth in calls]

    assert [(o["state"], o["amount_atomic"], o["markup_atomic"]) for o in outcomes] == [
        ("settled", BASE + MARKUP, MARKUP)
    ] * 2
    assert int(escrow.deposits(user.address).call()) == USDC - 2 * (BASE + MARKUP)
    for (developer, _app, _key), digest in zip(apps, digests, strict=True):
        assert int(escrow.deposits(developer.address).call()) == USDC
        assert onchain.earnings(developer.address) == MARKUP
        assert int(escrow.permission_spent(bytes.fromhex(digest[2:])).call()) == BASE + MARKUP
    assert onchain.earnings(provider.address) == 2 * (BASE - BASE // 10)
    assert onchain.solvent()
