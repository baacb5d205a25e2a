"""x402 on the paid-call path (in-process relay, the chain's two reads faked): the 402 offer,
every refusal with its x402 reason and nothing reserved or served, capture, void, replay, races."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from eth_account import Account
from quotra.chain import eip712
from quotra.chain.deployment import BASE_SEPOLIA_USDC
from quotra.payments.receipts import InvalidReceipt, ReceiptSigner, verify_receipt
from quotra.upstream.base import UpstreamUnavailable
from relay_helpers import chat_body
from sqlalchemy import func, select
from x402_helpers import (
    ESCROW,
    OPERATOR,
    TERMS,
    FakeChain,
    authorization,
    b64,
    offer,
    unb64,
    v1_header,
    v2_header,
)

PRICE = 1_000  # 0.001 USDC


@pytest.fixture
async def paid(start_relay: Any) -> AsyncIterator[Any]:
    """A relay without free calls whose x402 gate sees a fake chain, and one sandbox listing."""
    async with start_relay(playground_free_calls=0) as relay:
        chain = FakeChain()
        relay.runtime.payments.gate.configure(chain, TERMS, ReceiptSigner(bytes(OPERATOR.key)))
        _, headers = await relay.provider()
        relay.listing_record = await relay.listing(headers, models=["sandbox-model", "sandbox-error-503"])
        relay.chain = chain
        yield relay


def payer(chain: FakeChain, balance: int = 10**6) -> Any:
    account = Account.create()
    chain.balances[account.address] = balance
    return account


async def requirements(relay: Any, **body: Any) -> dict[str, Any]:
    reply = await relay.client.post("/v1/chat/completions", json=chat_body(**body))
    (accepted,) = offer(reply)["accepts"]
    return accepted


async def pay(relay: Any, header: str, name: str = "PAYMENT-SIGNATURE", **body: Any) -> Any:
    return await relay.client.post("/v1/chat/completions", json=chat_body(**body), headers={name: header})


async def rows(relay: Any) -> list[Any]:
    from quotra.store.models import X402Payment

    async with relay.runtime.store.sessions() as session:
        return list((await session.scalars(select(X402Payment).order_by(X402Payment.id))).all())


async def ledger(relay: Any) -> list[tuple[str, int]]:
    from quotra.store.models import LedgerEntry

    async with relay.runtime.store.sessions() as session:
        result = await session.execute(select(LedgerEntry.kind, LedgerEntry.amount).order_by(LedgerEntry.id))
        return [(k, a) for k, a in result.all()]


# ---- the offer ----------------------------------------------------------------------------------


async def test_unpaid_call_gets_a_402_with_the_v2_offer_v1_body_and_an_openai_error(paid: Any) -> None:
    reply = await paid.client.post("/v1/chat/completions", json=chat_body())
    required = offer(reply)
    assert required["x402Version"] == 2 and "error" not in required
    assert required["resource"]["url"] == "http://testserver/v1/chat/completions"
    assert required["accepts"] == [
        {
            "scheme": "exact",
            "network": "eip155:84532",
            "asset": BASE_SEPOLIA_USDC,
            "amount": str(PRICE),
            "payTo": ESCROW,
            "maxTimeoutSeconds": 300,
            "extra": {"name": "USDC", "version": "2"},
        }
    ]
    body = reply.json()
    assert body["x402Version"] == 1
    (v1,) = body["accepts"]
    assert v1["network"] == "base-sepolia" and v1["maxAmountRequired"] == str(PRICE)
    assert v1["payTo"] == ESCROW and v1["asset"] == BASE_SEPOLIA_USDC and v1["extra"]["name"] == "USDC"
    assert body["error"]["type"] == "payment_required" and "0.001000 USDC" in body["error"]["message"]
    assert paid.upstream.calls == []


async def test_per_token_listing_offers_its_maximum_cost(paid: Any) -> None:
    _, headers = await paid.provider()
    listing = await paid.listing(
        headers, models=["tok"], price_per_call="0.001", price_output_per_mtok="1", max_output_tokens=1000
    )
    accepted = await requirements(paid, model=f"listing/{listing['id']}")
    assert int(accepted["amount"]) == PRICE + 1_000  # 1000 output tokens at 1 USDC per million


async def test_playground_calls_come_before_the_offer(start_relay: Any) -> None:
    async with start_relay() as relay:
        relay.runtime.payments.gate.configure(FakeChain(), TERMS)
        _, headers = await relay.provider()
        await relay.listing(headers)
        statuses = [
            (await relay.client.post("/v1/chat/completions", json=chat_body())).status_code for _ in range(4)
        ]
        assert statuses == [200, 200, 200, 402]


# ---- paying ---------------------------------------------------------------------------------------


async def test_paid_call_is_served_captured_and_answered_with_payment_response_and_receipt(paid: Any) -> None:
    account = payer(paid.chain)
    accepted = await requirements(paid)
    body = chat_body()
    reply = await paid.client.post(
        "/v1/chat/completions",
        json=body,
        headers={"PAYMENT-SIGNATURE": v2_header(accepted, authorization(account, accepted))},
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-quotra-payment"] == "x402"
    settled = unb64(reply.headers["payment-response"])
    assert settled["success"] is True and settled["payer"] == account.address
    assert settled["network"] == "eip155:84532" and settled["transaction"] == ""
    assert settled["settlement"] == "x402_1" and settled["extra"] == {
        "settlement": "x402_1",
        "status": "pending",
    }
    (row,) = await rows(paid)
    assert (row.status, row.amount, row.payer, row.provider) == (
        "captured",
        PRICE,
        account.address,
        paid.listing_record["owner"],
    )
    assert await ledger(paid) == [("capture", PRICE)]
    claims, signer = verify_receipt(reply.headers["quotra-receipt"])
    assert signer == OPERATOR.address
    usage = reply.json()["usage"]
    assert claims["call"] == "x402_1" and claims["payer"] == account.address and claims["price"] == str(PRICE)
    assert claims["usage"] == {
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
    }
    import hashlib

    assert claims["request"] == "sha256:" + hashlib.sha256(reply.request.content).hexdigest()
    status = await paid.client.get("/v1/settlements/x402_1")
    assert status.json()["status"] == "pending" and status.json()["amount"] == str(PRICE)


async def test_a_tampered_receipt_does_not_verify_as_the_operator(paid: Any) -> None:
    header = ReceiptSigner(bytes(OPERATOR.key)).sign({"call": "x402_9", "price": "1000"})
    payload, _, signature = header.partition(".")
    forged = base64.urlsafe_b64encode(json.dumps({"v": 1, "call": "x402_9", "price": "1"}).encode())
    _claims, signer = verify_receipt(forged.decode().rstrip("=") + "." + signature)
    assert signer != OPERATOR.address
    with pytest.raises(InvalidReceipt):
        verify_receipt(payload)


async def test_v1_payment_is_answered_with_x_payment_response(paid: Any) -> None:
    account = payer(paid.chain)
    accepted = await requirements(paid)
    reply = await pay(paid, v1_header(authorization(account, accepted)), "X-PAYMENT")
    assert reply.status_code == 200, reply.text
    settled = unb64(reply.headers["x-payment-response"])
    assert settled["success"] is True and settled["network"] == "base-sepolia"
    assert "payment-response" not in reply.headers


async def test_a_payment_pays_even_beside_an_unknown_bearer_key(paid: Any) -> None:
    # The OpenAI SDK always sends some key; with an x402 payment it must not be refused for it.
    account = payer(paid.chain)
    accepted = await requirements(paid)
    reply = await paid.client.post(
        "/v1/chat/completions",
        json=chat_body(),
        headers={
            "PAYMENT-SIGNATURE": v2_header(accepted, authorization(account, accepted)),
            "Authorization": "Bearer not-a-quotra-key",
        },
    )
    assert reply.status_code == 200, reply.text
    assert unb64(reply.headers["payment-response"])["success"] is True


async def test_an_unknown_bearer_key_without_payment_is_refused(paid: Any) -> None:
    reply = await paid.client.post(
        "/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer not-a-quotra-key"}
    )
    assert reply.status_code == 401
    assert reply.json()["error"]["type"] == "authentication_error"


async def test_paid_stream_says_pending_first_and_ends_with_the_settlement_event(paid: Any) -> None:
    account = payer(paid.chain)
    accepted = await requirements(paid, stream=True)
    reply = await pay(paid, v2_header(accepted, authorization(account, accepted)), stream=True)
    assert reply.status_code == 200
    assert unb64(reply.headers["payment-response"])["settlement"] == "x402_1"
    events = [line.removeprefix("data: ") for line in reply.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["object"] == "chat.completion.chunk" and last["choices"] == []
    event = last["quotra"]
    assert event["object"] == "quotra.settlement" and event["settlement"] == "x402_1"
    assert event["status"] == "pending" and event["charged"] is True
    assert verify_receipt(event["receipt"])[1] == OPERATOR.address
    assert [r.status for r in await rows(paid)] == ["captured"]


async def test_upstream_failure_voids_the_payment(paid: Any) -> None:
    account = payer(paid.chain)
    model = f"listing/{paid.listing_record['id']}/sandbox-error-503"
    accepted = await requirements(paid, model=model)
    paid.upstream.failures.append(UpstreamUnavailable("boom", status_code=503))
    reply = await pay(paid, v2_header(accepted, authorization(account, accepted)), model=model)
    assert reply.status_code == 502 and "nothing was charged" in reply.json()["error"]["message"]
    assert [r.status for r in await rows(paid)] == ["voided"]
    assert await ledger(paid) == [("void", PRICE)]


async def test_stream_failing_mid_way_voids_the_payment(paid: Any) -> None:
    account = payer(paid.chain)
    accepted = await requirements(paid, stream=True)

    original = paid.upstream.factory

    def failing_factory(*args: Any, **kwargs: Any) -> Any:
        adapter = original(*args, **kwargs)

        async def stream(request: dict[str, Any], *, api_key: str, model: str) -> Any:
            yield {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": []}
            raise UpstreamUnavailable("connection dropped", status_code=502)

        adapter.stream = stream
        return adapter

    paid.runtime.relay.adapters._factory = failing_factory
    paid.runtime.relay.adapters._adapters.clear()
    reply = await pay(paid, v2_header(accepted, authorization(account, accepted)), stream=True)
    assert reply.status_code == 200 and "upstream_unavailable" in reply.text
    assert [r.status for r in await rows(paid)] == ["voided"]


# ---- refusals: a 402 naming the reason, no upstream call, nothing reserved --------------------------


def _bad(name: str) -> Any:
    return pytest.param(name, id=name)


BAD_INPUTS = [
    ("malformed_base64", "invalid_payload"),
    ("malformed_json", "invalid_payload"),
    ("not_an_object", "invalid_payload"),
    ("v2_with_v1_network_name", "network_mismatch"),
    ("other_chain", "network_mismatch"),
    ("unsupported_scheme", "unsupported_scheme"),
    ("wrong_asset", "invalid_exact_evm_payload_asset_mismatch"),
    ("accepted_differs_from_offer", "invalid_exact_evm_payload_requirements_mismatch"),
    ("accepted_pays_someone_else", "invalid_exact_evm_payload_requirements_mismatch"),
    ("authorization_pays_someone_else", "invalid_exact_evm_payload_recipient_mismatch"),
    ("underpaid", "invalid_exact_evm_payload_authorization_value_mismatch"),
    ("overpaid", "invalid_exact_evm_payload_authorization_value_mismatch"),
    ("expired", "invalid_exact_evm_payload_authorization_valid_before"),
    ("valid_too_long", "invalid_exact_evm_payload_authorization_valid_before"),
    ("not_yet_valid", "invalid_exact_evm_payload_authorization_valid_after"),
    ("signed_by_someone_else", "invalid_exact_evm_payload_signature"),
    ("signed_for_another_domain", "invalid_exact_evm_payload_signature"),
    ("high_s", "invalid_exact_evm_payload_signature"),
    ("nonce_used_on_chain", "invalid_exact_evm_nonce_already_used"),
    ("payer_without_funds", "invalid_exact_evm_insufficient_balance"),
    ("v1_wrong_network", "network_mismatch"),
]


def bad_header(case: str, chain: FakeChain, accepted: dict[str, Any]) -> tuple[str, str]:
    account = payer(chain)
    now = int(time.time())
    good = authorization(account, accepted)
    header = "PAYMENT-SIGNATURE"
    if case == "malformed_base64":
        return header, "%%%not-base64%%%"
    if case == "malformed_json":
        return header, base64.b64encode(b"{not json").decode()
    if case == "not_an_object":
        return header, b64([1, 2, 3])
    if case == "v2_with_v1_network_name":
        return header, v2_header(accepted, good, network="base-sepolia")
    if case == "other_chain":
        return header, v2_header(accepted, good, network="eip155:8453")
    if case == "unsupported_scheme":
        return header, v2_header(accepted, good, scheme="upto")
    if case == "wrong_asset":
        return header, v2_header(accepted, good, asset="0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913")
    if case == "accepted_differs_from_offer":
        return header, v2_header(accepted, good, maxTimeoutSeconds=3600)
    if case == "accepted_pays_someone_else":
        thief = Account.create().address
        return header, v2_header(accepted, authorization(account, accepted, to=thief), payTo=thief)
    if case == "authorization_pays_someone_else":
        return header, v2_header(accepted, authorization(account, accepted, to=Account.create().address))
    if case == "underpaid":
        return header, v2_header(accepted, authorization(account, accepted, value=PRICE - 1))
    if case == "overpaid":
        return header, v2_header(accepted, authorization(account, accepted, value=PRICE + 1))
    if case == "expired":
        return header, v2_header(accepted, authorization(account, accepted, valid_before=now - 1))
    if case == "valid_too_long":
        return header, v2_header(accepted, authorization(account, accepted, valid_before=now + 86_400))
    if case == "not_yet_valid":
        return header, v2_header(accepted, authorization(account, accepted, valid_after=now + 60))
    if case == "signed_by_someone_else":
        return header, v2_header(accepted, authorization(account, accepted, signer_key=Account.create().key))
    if case == "signed_for_another_domain":
        mainnet_name = eip712.Domain("USD Coin", "2", 84532, BASE_SEPOLIA_USDC)
        return header, v2_header(accepted, authorization(account, accepted, domain=mainnet_name))
    if case == "high_s":
        return header, v2_header(accepted, authorization(account, accepted, high_s=True))
    if case == "nonce_used_on_chain":
        nonce = secrets.token_bytes(32)
        chain.used.add((account.address, nonce))
        return header, v2_header(accepted, authorization(account, accepted, nonce=nonce))
    if case == "payer_without_funds":
        chain.balances[account.address] = PRICE - 1
        return header, v2_header(accepted, good)
    if case == "v1_wrong_network":
        return "X-PAYMENT", v1_header(good, network="base")
    raise AssertionError(case)


@pytest.mark.parametrize(("case", "reason"), BAD_INPUTS, ids=[c for c, _ in BAD_INPUTS])
async def test_bad_payment_is_refused_with_its_reason_and_nothing_happens(
    paid: Any, case: str, reason: str
) -> None:
    accepted = await requirements(paid)
    name, header = bad_header(case, paid.chain, accepted)
    reply = await pay(paid, header, name)
    required = offer(reply)
    assert required["error"] == reason, reply.text
    assert required["accepts"][0]["amount"] == str(PRICE)  # a fresh offer to pay again
    body = reply.json()
    assert body["error"]["code"] == reason and body["x402Version"] == 1
    assert "Nothing was charged" in body["error"]["message"] or "nothing" in body["error"]["message"].lower()
    assert paid.upstream.calls == []
    assert await rows(paid) == [] and await ledger(paid) == []


async def test_replayed_authorization_is_refused_after_serving_once(paid: Any) -> None:
    account = payer(paid.chain)
    accepted = await requirements(paid)
    header = v2_header(accepted, authorization(account, accepted))
    assert (await pay(paid, header)).status_code == 200
    again = await pay(paid, header)
    assert offer(again)["error"] == "invalid_exact_evm_nonce_already_used"
    assert len(paid.upstream.calls) == 1 and len(await rows(paid)) == 1


async def test_voided_authorization_cannot_be_replayed_either(paid: Any) -> None:
    account = payer(paid.chain)
    accepted = await requirements(paid)
    header = v2_header(accepted, authorization(account, accepted))
    paid.upstream.failures.append(UpstreamUnavailable("boom", status_code=503))
    assert (await pay(paid, header)).status_code == 502
    assert offer(await pay(paid, header))["error"] == "invalid_exact_evm_nonce_already_used"


async def test_unsettled_payments_count_against_the_balance(paid: Any) -> None:
    account = payer(paid.chain, balance=PRICE + PRICE // 2)
    accepted = await requirements(paid)
    first = await pay(paid, v2_header(accepted, authorization(account, accepted)))
    assert first.status_code == 200
    second = await pay(paid, v2_header(accepted, authorization(account, accepted)))
    assert offer(second)["error"] == "invalid_exact_evm_insufficient_balance"
    assert len(paid.upstream.calls) == 1


async def test_chain_unreachable_is_a_503_and_nothing_is_reserved(paid: Any) -> None:
    class DownChain(FakeChain):
        async def usdc_balance(self, account: str) -> int:
            raise ConnectionError("rpc down")

    paid.runtime.payments.gate.configure(DownChain(), TERMS)
    account = Account.create()
    accepted = await requirements(paid)
    reply = await pay(paid, v2_header(accepted, authorization(account, accepted)))
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "payment_verification_unavailable"
    assert paid.upstream.calls == [] and await rows(paid) == []


async def test_one_authorization_sent_100_times_at_once_is_served_once(paid: Any) -> None:
    account = payer(paid.chain)
    accepted = await requirements(paid)
    header = v2_header(accepted, authorization(account, accepted))
    paid.upstream.delay = 0.05  # keep the winner in flight while the others arrive
    replies = await asyncio.gather(*(pay(paid, header) for _ in range(100)))
    statuses = sorted(r.status_code for r in replies)
    assert statuses.count(200) == 1 and statuses.count(402) == 99, statuses
    reasons = {offer(r)["error"] for r in replies if r.status_code == 402}
    assert reasons == {"invalid_exact_evm_nonce_already_used"}
    assert len(paid.upstream.calls) == 1
    assert [r.status for r in await rows(paid)] == ["captured"]
    assert paid.chain.balance_reads <= 3  # the balance is cached (and concurrent reads shared)


async def test_settlement_status_of_unknown_id_is_404(paid: Any) -> None:
    reply = await paid.client.get("/v1/settlements/x402_999")
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "settlement_not_found"
    assert (await paid.client.get("/v1/settlements/nope")).status_code == 400


async def test_metrics_count_x402_outcomes(paid: Any) -> None:
    account = payer(paid.chain)
    accepted = await requirements(paid)
    await pay(paid, v2_header(accepted, authorization(account, accepted)))
    await pay(paid, "%%%")
    text = (await paid.client.get("/metrics")).text
    assert 'quotra_x402_payments_total{outcome="captured"} 1.0' in text
    assert 'quotra_x402_payments_total{outcome="invalid_payload"} 1.0' in text


async def test_row_count_helper_sees_nothing_for_a_fresh_relay(paid: Any) -> None:
    from quotra.store.models import X402Payment

    async with paid.runtime.store.sessions() as session:
        assert (await session.execute(select(func.count()).select_from(X402Payment))).scalar_one() == 0
