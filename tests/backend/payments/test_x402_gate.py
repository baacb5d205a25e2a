"""x402 on the paid-call path (in-process relay, the chain's reads faked as of a block): the 402
offer, every refusal with its x402 reason and nothing reserved or served, capture, void, replay
(answered with the call it paid for), the payer's balance snapshot per block, races, and
`GET /v1/calls/{id}` for the payer only."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from eth_account import Account
from quotra.calls.records import CALL_ID_PATTERN, CallView
from quotra.chain import eip712
from quotra.chain.deployment import BASE_SEPOLIA_USDC
from quotra.payments.receipts import InvalidReceipt, ReceiptSigner, verify_receipt
from quotra.store.models import Call, Listing, X402Authorization, X402Payer, table
from quotra.upstream.base import UpstreamUnavailable
from relay_helpers import FakeAdapter, chat_body, sign_in
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
# A flat-priced call is charged all it authorized: nothing goes back to the payer's deposit.
FLAT_CHARGE = {"authorized": str(PRICE), "returned_to_deposit": "0"}
CALLS = table(Call)
AUTHS = table(X402Authorization)


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
    chain.fund(account.address, balance)
    return account


async def requirements(relay: Any, **body: Any) -> dict[str, Any]:
    reply = await relay.client.post("/v1/chat/completions", json=chat_body(**body))
    (accepted,) = offer(reply)["accepts"]
    return accepted


async def pay(relay: Any, header: str, name: str = "PAYMENT-SIGNATURE", **body: Any) -> Any:
    return await relay.client.post("/v1/chat/completions", json=chat_body(**body), headers={name: header})


async def _rows(relay: Any, query: Any) -> list[Any]:
    async with relay.runtime.store.engine.connect() as connection:
        return list((await connection.execute(query)).all())


async def calls(relay: Any) -> list[CallView]:
    """The relay's calls, oldest first."""
    return [
        CallView.of(r) for r in await _rows(relay, select(CALLS).order_by(CALLS.c.created_at, CALLS.c.id))
    ]


async def auths(relay: Any) -> list[Any]:
    return await _rows(relay, select(AUTHS))


async def auth_of(relay: Any, call_id: str) -> Any:
    (row,) = await _rows(relay, select(AUTHS).where(AUTHS.c.call_id == call_id))
    return row


async def calls_used(relay: Any) -> int:
    (row,) = await _rows(relay, select(Listing.calls_used).where(Listing.id == relay.listing_record["id"]))
    return int(row[0])


async def call_status(relay: Any, call_id: str, **headers: str) -> Any:
    return await relay.client.get(f"/v1/calls/{call_id}", headers=headers)


def call_id_of(reply: Any) -> str:
    call_id = reply.headers["quotra-call-id"]
    assert re.fullmatch(CALL_ID_PATTERN, call_id), call_id
    return str(call_id)


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
    assert "quotra-call-id" not in reply.headers and await calls(paid) == []  # nothing was reserved
    assert paid.chain.reads == 0  # an offer costs no chain read


async def test_per_token_listing_offers_its_maximum_cost(paid: Any) -> None:
    _, headers = await paid.provider()
    listing = await paid.listing(
        headers, models=["tok"], price_per_call="0.001", price_output_per_mtok="1", max_output_tokens=1000
    )
    accepted = await requirements(paid, model=f"listing/{listing['id']}")
    assert int(accepted["amount"]) == PRICE + 1_000  # 1000 output tokens at 1 USDC per million


async def test_per_token_call_is_charged_what_it_used_not_the_maximum(paid: Any) -> None:
    # Signed for the listing's maximum (1000 output tokens), charged the tokens it used: the rest
    # is the payer's, credited to its escrow deposit when the payment settles.
    _, headers = await paid.provider()
    listing = await paid.listing(
        headers, models=["tok"], price_per_call="0.001", price_output_per_mtok="1000", max_output_tokens=1000
    )
    model = f"listing/{listing['id']}"
    accepted = await requirements(paid, model=model)
    authorized = int(accepted["amount"])
    assert authorized == PRICE + 1_000_000  # 1000 output tokens at 1000 USDC per million
    account = payer(paid.chain, 10 * 10**6)
    payload = authorization(account, accepted)
    header = v2_header(accepted, payload)

    reply = await pay(paid, header, model=model)

    assert reply.status_code == 200, reply.text
    used = reply.json()["usage"]["completion_tokens"]
    charged = PRICE + used * 1_000
    assert 0 < used < 1000 and reply.headers["x-quotra-cost"] == str(charged)
    call_id = call_id_of(reply)
    (call,) = await calls(paid)
    assert (call.id, call.state, call.reserved, call.amount, call.returned) == (
        call_id,
        "captured",
        authorized,
        charged,
        authorized - charged,
    )
    assert (await auth_of(paid, call_id)).value == authorized
    settled = unb64(reply.headers["payment-response"])
    assert settled["amount"] == str(charged)
    assert settled["extra"] == {
        "call": call_id,
        "status": "pending",
        "authorized": str(authorized),
        "returned_to_deposit": str(authorized - charged),
    }
    claims, _ = verify_receipt(reply.headers["quotra-receipt"])
    assert (claims["price"], claims["authorized"], claims["returned_to_deposit"]) == (
        str(charged),
        str(authorized),
        str(authorized - charged),
    )
    status = (await call_status(paid, call_id, **{"PAYMENT-SIGNATURE": header})).json()
    assert (status["amount_atomic"], status["reserved_atomic"], status["returned_to_deposit_atomic"]) == (
        charged,
        authorized,
        authorized - charged,
    )


async def test_playground_calls_come_before_the_offer(start_relay: Any) -> None:
    async with start_relay() as relay:
        relay.runtime.payments.gate.configure(FakeChain(), TERMS)
        _, headers = await relay.provider()
        await relay.listing(headers)
        statuses = [
            (await relay.client.post("/v1/chat/completions", json=chat_body())).status_code for _ in range(4)
        ]
        assert statuses == [200, 200, 200, 402]
        free = await calls(relay)
        assert [(c.gate, c.state, c.amount, c.reserved) for c in free] == [
            ("playground", "settled", 0, 0)
        ] * 3


# ---- paying ---------------------------------------------------------------------------------------


async def test_paid_call_is_served_captured_and_answered_with_payment_response_and_receipt(paid: Any) -> None:
    account = payer(paid.chain)
    accepted = await requirements(paid)
    body = chat_body()
    payload = authorization(account, accepted)
    reply = await paid.client.post(
        "/v1/chat/completions", json=body, headers={"PAYMENT-SIGNATURE": v2_header(accepted, payload)}
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-quotra-payment"] == "x402"
    call_id = call_id_of(reply)
    settled = unb64(reply.headers["payment-response"])
    assert settled["success"] is True and settled["payer"] == account.address
    assert settled["network"] == "eip155:84532" and settled["transaction"] == ""
    assert settled["amount"] == str(PRICE) and "settlement" not in settled
    assert settled["extra"] == {"call": call_id, "status": "pending", **FLAT_CHARGE}

    usage = reply.json()["usage"]
    (call,) = await calls(paid)
    assert (call.id, call.gate, call.state, call.reserved, call.amount, call.fee) == (
        call_id,
        "x402",
        "captured",
        PRICE,
        PRICE,
        None,
    )
    assert (call.payer, call.provider, call.listing_id) == (
        account.address,
        paid.listing_record["owner"],
        paid.listing_record["id"],
    )
    assert (call.model, call.stream, call.outcome, call.prompt_tokens, call.completion_tokens) == (
        "sandbox-model",
        False,
        "ok",
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert call.duration_ms is not None and call.duration_ms >= 0 and call.tx_hash is None
    request_hash = hashlib.sha256(reply.request.content).hexdigest()
    auth = await auth_of(paid, call_id)
    assert (auth.payer, auth.nonce, auth.value, auth.pending, auth.settled_block) == (
        account.address,
        payload["authorization"]["nonce"].lower(),
        PRICE,
        True,
        None,
    )
    assert auth.request_hash == request_hash and auth.signature == payload["signature"]
    # The payer's balance as of the block it was checked at.
    assert [tuple(r) for r in await _rows(paid, select(X402Payer.balance, X402Payer.block))] == [(10**6, 100)]
    assert await calls_used(paid) == 1

    claims, signer = verify_receipt(reply.headers["quotra-receipt"])
    assert signer == OPERATOR.address
    assert claims["call"] == call_id and claims["payer"] == account.address and claims["price"] == str(PRICE)
    assert claims["usage"] == {
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
    }
    assert claims["request"] == "sha256:" + request_hash
    status = await call_status(paid, call_id, **{"PAYMENT-SIGNATURE": v2_header(accepted, payload)})
    assert status.status_code == 200, status.text
    assert status.json() | {"created_at": None, "updated_at": None} == {
        "id": call_id,
        "object": "quotra.call",
        "gate": "x402",
        "state": "captured",
        "charged": True,
        "amount": "0.001000",
        "amount_atomic": PRICE,
        "returned_to_deposit_atomic": 0,
        "markup_atomic": 0,
        "app": None,
        "end_user": None,
        "reserved_atomic": PRICE,
        "fee_atomic": None,
        "listing": paid.listing_record["id"],
        "provider": paid.listing_record["owner"],
        "model": "sandbox-model",
        "stream": False,
        "usage": {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"]},
        "outcome": "ok",
        "error": None,
        "transaction": None,
        "created_at": None,
        "updated_at": None,
    }


async def test_a_call_is_told_to_its_payer_only(paid: Any) -> None:
    """`GET /v1/calls/{id}`: the payment header that paid for it, or the payer's session; anyone
    else (another payment of the same payer included) is told it does not exist."""
    account = payer(paid.chain)
    accepted = await requirements(paid)
    first = v2_header(accepted, authorization(account, accepted))
    second = v1_header(authorization(account, accepted))
    one = call_id_of(await pay(paid, first))
    two = call_id_of(await pay(paid, second, "X-PAYMENT"))
    assert one != two
    assert (await call_status(paid, one, **{"PAYMENT-SIGNATURE": first})).json()["id"] == one
    assert (await call_status(paid, two, **{"X-PAYMENT": second})).json()["id"] == two
    session = {"Authorization": f"Bearer {await sign_in(paid.client, account)}"}
    assert [(await call_status(paid, c, **session)).json()["state"] for c in (one, two)] == ["captured"] * 2

    _, stranger = await paid.provider()
    someone = payer(paid.chain)
    theirs = v2_header(accepted, authorization(someone, accepted))
    for headers in ({}, stranger, {"X-PAYMENT": second}, {"PAYMENT-SIGNATURE": theirs}):
        refused = await call_status(paid, one, **headers)
        assert (refused.status_code, refused.json()["error"]["code"]) == (404, "call_not_found"), headers
    forged = authorization(someone, accepted)
    forged["authorization"]["from"] = account.address  # claims the payer, signed by someone else
    refused = await call_status(paid, one, **{"PAYMENT-SIGNATURE": v2_header(accepted, forged)})
    assert refused.status_code == 404
    missing = await call_status(paid, "call_" + "0" * 26, **session)
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "call_not_found")
    assert (await call_status(paid, "x402_1", **session)).status_code == 400  # not a call id


async def test_a_tampered_receipt_does_not_verify_as_the_operator(paid: Any) -> None:
    header = ReceiptSigner(bytes(OPERATOR.key)).sign({"call": "call_" + "1" * 26, "price": "1000"})
    payload, _, signature = header.partition(".")
    forged = base64.urlsafe_b64encode(json.dumps({"v": 1, "call": "call_" + "1" * 26, "price": "1"}).encode())
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
    assert settled["extra"] == {"call": call_id_of(reply), "status": "pending", **FLAT_CHARGE}
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


async def test_paid_stream_says_pending_first_and_ends_with_the_payment_event(paid: Any) -> None:
    account = payer(paid.chain)
    accepted = await requirements(paid, stream=True)
    reply = await pay(paid, v2_header(accepted, authorization(account, accepted)), stream=True)
    assert reply.status_code == 200
    call_id = call_id_of(reply)
    # Sent before the stream: the charge is not known yet, only the authorization.
    assert unb64(reply.headers["payment-response"])["extra"] == {
        "call": call_id,
        "status": "pending",
        "authorized": str(PRICE),
    }
    events = [line.removeprefix("data: ") for line in reply.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    # The payment rides on the stream's last chunk, the one that ends it (a choice with its finish
    # reason), so `chunk.choices[0]` loops never meet a chunk without choices.
    last = json.loads(events[-2])
    assert last["object"] == "chat.completion.chunk" and last["choices"][0]["finish_reason"] == "stop"
    assert all(json.loads(e)["choices"] for e in events[:-1])
    event = last["quotra"]
    assert (event["object"], event["call"], event["status"], event["charged"]) == (
        "quotra.payment",
        call_id,
        "pending",
        True,
    )
    assert (event["amount"], event["payer"], event["transaction"]) == (str(PRICE), account.address, "")
    assert (event["authorized"], event["returned_to_deposit"]) == (str(PRICE), "0")
    claims, signer = verify_receipt(event["receipt"])
    assert signer == OPERATOR.address and claims["call"] == call_id
    # No usage chunk: the client did not ask for one (stream_options.include_usage); metered all the same.
    assert not any("usage" in json.loads(e) for e in events[:-1])
    usage = FakeAdapter._usage(chat_body(stream=True)).to_openai()
    (call,) = await calls(paid)
    assert (call.id, call.state, call.amount, call.stream, call.outcome) == (
        call_id,
        "captured",
        PRICE,
        True,
        "ok",
    )
    assert (call.prompt_tokens, call.completion_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )


async def test_upstream_failure_voids_the_payment(paid: Any) -> None:
    account = payer(paid.chain)
    model = f"listing/{paid.listing_record['id']}/sandbox-error-503"
    accepted = await requirements(paid, model=model)
    header = v2_header(accepted, authorization(account, accepted))
    paid.upstream.failures.append(UpstreamUnavailable("boom", status_code=503))
    reply = await pay(paid, header, model=model)
    assert reply.status_code == 502 and "nothing was charged" in reply.json()["error"]["message"]
    call_id = call_id_of(reply)  # an error after the reservation still names the call
    (call,) = await calls(paid)
    assert (call.id, call.state, call.amount, call.outcome, call.error) == (
        call_id,
        "voided",
        0,
        "upstream_error",
        "UpstreamUnavailable",
    )
    assert (await auth_of(paid, call_id)).pending is False  # no longer held against the balance
    assert await calls_used(paid) == 0  # the listing's call is given back
    status = (await call_status(paid, call_id, **{"PAYMENT-SIGNATURE": header})).json()
    assert (status["state"], status["charged"], status["amount_atomic"]) == ("voided", False, 0)


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
    assert "quotra.payment" not in reply.text  # no payment event: nothing was charged
    (call,) = await calls(paid)
    assert (call.id, call.state, call.amount) == (call_id_of(reply), "voided", 0)


# ---- refusals: a 402 naming the reason, no upstream call, nothing reserved --------------------------


BAD_INPUTS = [
    ("malformed_base64", "invalid_payload"),
    ("malformed_json", "invalid_payload"),
    ("nested_past_the_recursion_limit", "invalid_payload"),
    ("not_an_object", "invalid_payload"),
    ("fractional_value", "invalid_payload"),
    ("value_in_exponent_notation", "invalid_payload"),
    ("value_as_a_json_number", "invalid_payload"),
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
    if case == "nested_past_the_recursion_limit":  # within the header's 8 kB
        return header, base64.b64encode(b"[" * 3_000 + b"]" * 3_000).decode()
    if case == "not_an_object":
        return header, b64([1, 2, 3])
    if case in ("fractional_value", "value_in_exponent_notation", "value_as_a_json_number"):
        # The signature covers PRICE; the header must still say exactly that, as x402 writes it.
        written = {
            "fractional_value": f"{PRICE}.5",
            "value_in_exponent_notation": f"{PRICE / 1000:g}e3",
            "value_as_a_json_number": PRICE,
        }[case]
        good["authorization"]["value"] = written
        return header, v2_header(accepted, good)
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
    if case == "payer_without_funds":
        chain.fund(account.address, PRICE - 1)
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
    assert "quotra-call-id" not in reply.headers
    assert await calls(paid) == [] and await auths(paid) == []
    assert await calls_used(paid) == 0


async def test_a_replayed_payment_is_answered_with_the_call_it_paid_for(paid: Any) -> None:
    account = payer(paid.chain)
    accepted = await requirements(paid)
    payload = authorization(account, accepted)
    header = v2_header(accepted, payload)
    first = await pay(paid, header)
    assert first.status_code == 200
    call_id = call_id_of(first)
    again = await pay(paid, header)
    assert again.status_code == 409, again.text
    error = again.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "payment_already_used")
    assert f"GET /v1/calls/{call_id}" in error["message"] and "charged once" in error["message"]
    assert (error["call"]["id"], error["call"]["state"], error["call"]["charged"]) == (
        call_id,
        "captured",
        True,
    )
    assert error["call"]["amount_atomic"] == PRICE
    assert call_id_of(again) == call_id
    # Once settled on-chain (USDC marks the nonce used) the replay is still told its call.
    nonce = bytes.fromhex(payload["authorization"]["nonce"][2:])
    paid.chain.used.add((account.address, nonce))
    paid.chain.mine()
    paid.runtime.payments.gate.head_ttl = 0
    later = await pay(paid, header)
    assert (later.status_code, later.json()["error"]["call"]["id"]) == (409, call_id)
    assert len(paid.upstream.calls) == 1 and [c.id for c in await calls(paid)] == [call_id]
    assert await calls_used(paid) == 1


async def test_a_voided_payment_may_pay_for_one_new_call(paid: Any) -> None:
    """Nothing was charged for a voided call, so its authorization is still good: presented
    again it pays for a new call (once); the voided call stays voided."""
    account = payer(paid.chain)
    accepted = await requirements(paid)
    header = v2_header(accepted, authorization(account, accepted))
    paid.upstream.failures.append(UpstreamUnavailable("boom", status_code=503))
    failed = await pay(paid, header)
    assert failed.status_code == 502
    voided = call_id_of(failed)
    served = await pay(paid, header)
    assert served.status_code == 200, served.text
    call_id = call_id_of(served)
    assert call_id != voided
    states = {c.id: (c.state, c.amount) for c in await calls(paid)}
    assert states == {voided: ("voided", 0), call_id: ("captured", PRICE)}
    (auth,) = await auths(paid)
    assert (auth.call_id, auth.pending) == (call_id, True)
    again = await pay(paid, header)
    assert (again.status_code, again.json()["error"]["call"]["id"]) == (409, call_id)
    assert len(paid.upstream.calls) == 2  # the failed attempt and the one served


async def test_unsettled_payments_count_against_the_balance(paid: Any) -> None:
    account = payer(paid.chain, balance=PRICE + PRICE // 2)
    accepted = await requirements(paid)
    first = await pay(paid, v2_header(accepted, authorization(account, accepted)))
    assert first.status_code == 200
    second = await pay(paid, v2_header(accepted, authorization(account, accepted)))
    assert offer(second)["error"] == "invalid_exact_evm_insufficient_balance"
    assert len(paid.upstream.calls) == 1 and len(await calls(paid)) == 1


async def test_the_balance_is_read_as_of_a_block_and_settlements_after_it_still_count(paid: Any) -> None:
    """Each call is checked against the payer's balance at one block minus every payment not
    settled in or before that block: a settlement the balance already shows is not counted twice,
    one it does not show yet is still counted, however stale the block the relay reads."""
    gate, chain, outbox = paid.runtime.payments.gate, paid.chain, paid.runtime.payments.outbox
    gate.head_ttl = 3600  # this relay keeps reading block 100
    account = payer(chain, balance=2 * PRICE)
    accepted = await requirements(paid)

    async def attempt() -> Any:
        return await pay(paid, v2_header(accepted, authorization(account, accepted)))

    first = call_id_of(await attempt())
    # The first payment settles at block 105: from there the payer holds one price less.
    chain.mine(5)
    chain.fund(account.address, PRICE)
    assert await outbox.settle_x402(first, tx_hash="0x" + "ab" * 32, fee=100, block=105)
    # Still at block 100 (2 prices): the settled payment is not in that balance, so it counts.
    second = await attempt()
    assert second.status_code == 200
    assert offer(await attempt())["error"] == "invalid_exact_evm_insufficient_balance"
    # At block 105 (1 price): the first payment is in the balance, the second is not.
    gate.head_ttl = 0
    assert offer(await attempt())["error"] == "invalid_exact_evm_insufficient_balance"
    # A top-up at block 106 pays for one more call.
    chain.mine()
    chain.fund(account.address, 2 * PRICE)
    third = await attempt()
    assert third.status_code == 200
    assert offer(await attempt())["error"] == "invalid_exact_evm_insufficient_balance"
    # What the block 106 balance shows is no longer held against it; the rest is.
    pending = {c: (await auth_of(paid, c)).pending for c in (first, call_id_of(second), call_id_of(third))}
    assert pending == {first: False, call_id_of(second): True, call_id_of(third): True}
    assert len(paid.upstream.calls) == 3  # 2 prices before, 1 more after the top-up: never more
    snapshots = await _rows(paid, select(X402Payer.payer, X402Payer.balance, X402Payer.block))
    assert [tuple(r) for r in snapshots] == [(account.address, 2 * PRICE, 106)]
    assert sorted(set(chain.blocks_read)) == [100, 105, 106]


async def test_the_head_block_is_read_at_most_every_head_ttl(paid: Any) -> None:
    gate, chain = paid.runtime.payments.gate, paid.chain
    account = payer(chain)
    accepted = await requirements(paid)
    gate.head_ttl = 30
    for _ in range(3):
        assert (await pay(paid, v2_header(accepted, authorization(account, accepted)))).status_code == 200
    assert chain.head_reads == 1
    read_at, block = gate._head
    gate._head = (read_at - 31, block)  # 31 s later: stale, read again (no block was mined meanwhile)
    for _ in range(3):
        assert (await pay(paid, v2_header(accepted, authorization(account, accepted)))).status_code == 200
    assert chain.head_reads == 2
    assert chain.balance_reads == 1  # one read per (payer, block): a block's state never changes


async def test_when_the_head_moves_a_recent_payer_is_not_kept_waiting_on_the_node(paid: Any) -> None:
    """A payer read within two `head_ttl` is checked against its snapshot while the new head's
    read goes on in the background; then the new block's balance is used. A payer not read that
    recently waits for the read, as a new one does."""
    gate, chain = paid.runtime.payments.gate, paid.chain
    gate.head_ttl = 30
    account = payer(chain, balance=3 * PRICE)
    accepted = await requirements(paid)

    async def attempt() -> Any:
        return await pay(paid, v2_header(accepted, authorization(account, accepted)))

    assert (await attempt()).status_code == 200  # block 100, read before the call
    chain.mine()  # block 101: the payer's USDC moved (its first payment settled elsewhere)
    chain.fund(account.address, PRICE)
    release, real = asyncio.Event(), chain.usdc_balance

    async def slow_node(address: str, block: int | None = None) -> int:
        await release.wait()
        return await real(address, block)

    chain.usdc_balance = slow_node
    read_at, block = gate._head
    gate._head = (read_at - 31, block)  # the head cache expired: the next call reads block 101
    served = await asyncio.wait_for(attempt(), 5)  # on the block 100 snapshot, the node still busy
    assert served.status_code == 200
    assert chain.blocks_read == [100]
    release.set()
    for _ in range(100):  # the background read lands
        if (account.address, 101) in gate._balances:
            break
        await asyncio.sleep(0.01)
    assert chain.blocks_read == [100, 101]
    # Block 101 holds one price against two unsettled calls: refused (block 100's three prices
    # would have paid for a third).
    assert offer(await attempt())["error"] == "invalid_exact_evm_insufficient_balance"
    # Not read within two head_ttl: the call waits for the new head's read.
    chain.mine()
    gate.head_ttl = 0
    release.clear()
    waiting = asyncio.ensure_future(attempt())
    await asyncio.sleep(0.2)
    assert not waiting.done()
    release.set()
    assert offer(await waiting)["error"] == "invalid_exact_evm_insufficient_balance"
    assert chain.blocks_read == [100, 101, 102]
    assert len(paid.upstream.calls) == 2


@pytest.mark.parametrize("failing", ["block_number", "usdc_balance"])
async def test_chain_unreachable_is_a_503_and_nothing_is_reserved(paid: Any, failing: str) -> None:
    async def down(*args: Any) -> Any:
        raise ConnectionError("rpc down")

    chain = FakeChain()
    setattr(chain, failing, down)
    paid.runtime.payments.gate.configure(chain, TERMS)
    account = payer(chain)
    accepted = await requirements(paid)
    reply = await pay(paid, v2_header(accepted, authorization(account, accepted)))
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "payment_verification_unavailable"
    assert reply.headers["retry-after"] == "2" and "nothing was charged" in reply.json()["error"]["message"]
    assert paid.upstream.calls == [] and await calls(paid) == [] and await calls_used(paid) == 0


async def test_a_payer_whose_authorization_went_unpaid_is_refused(paid: Any) -> None:
    account = payer(paid.chain)
    accepted = await requirements(paid)
    served = await pay(paid, v2_header(accepted, authorization(account, accepted)))
    assert served.status_code == 200
    # Settlement: USDC refused it (the payer moved its money away, or cancelled the nonce).
    outbox = paid.runtime.payments.outbox
    assert await outbox.fail_x402(call_id_of(served), "USDC refused the authorization", payer_fault=True)
    reply = await pay(paid, v2_header(accepted, authorization(account, accepted)))
    assert reply.status_code == 402
    assert reply.json()["error"]["code"] == "invalid_exact_evm_payer_unpaid"
    assert "prepaid" in reply.json()["error"]["message"]
    assert len(paid.upstream.calls) == 1 and len(await calls(paid)) == 1  # nothing reserved
    # Another wallet with money is served as before.
    other = payer(paid.chain)
    assert (await pay(paid, v2_header(accepted, authorization(other, accepted)))).status_code == 200


async def test_one_authorization_sent_100_times_at_once_is_served_once(paid: Any) -> None:
    account = payer(paid.chain)
    accepted = await requirements(paid)
    header = v2_header(accepted, authorization(account, accepted))
    paid.upstream.delay = 0.05  # keep the winner in flight while the others arrive
    replies = await asyncio.gather(*(pay(paid, header) for _ in range(100)))
    statuses = sorted(r.status_code for r in replies)
    assert statuses.count(200) == 1 and statuses.count(409) == 99, statuses
    (winner,) = [call_id_of(r) for r in replies if r.status_code == 200]
    replays = [r for r in replies if r.status_code == 409]
    assert {r.json()["error"]["code"] for r in replays} == {"payment_already_used"}
    assert {r.json()["error"]["call"]["id"] for r in replays} == {winner}
    assert {call_id_of(r) for r in replays} == {winner}
    assert len(paid.upstream.calls) == 1
    assert [(c.id, c.state) for c in await calls(paid)] == [(winner, "captured")]
    assert await calls_used(paid) == 1  # the losers' quota was given back
    assert paid.chain.balance_reads == 1  # one block: its balance read once, shared by all


async def test_metrics_count_x402_outcomes(paid: Any) -> None:
    account = payer(paid.chain)
    accepted = await requirements(paid)
    header = v2_header(accepted, authorization(account, accepted))
    await pay(paid, header)
    await pay(paid, header)
    await pay(paid, "%%%")
    paid.upstream.failures.append(UpstreamUnavailable("boom", status_code=503))
    await pay(paid, v2_header(accepted, authorization(account, accepted)))
    text = (await paid.client.get("/metrics")).text
    assert 'quotra_x402_payments_total{outcome="reserved"} 2.0' in text
    assert 'quotra_x402_payments_total{outcome="captured"} 1.0' in text
    assert 'quotra_x402_payments_total{outcome="voided"} 1.0' in text
    assert 'quotra_x402_payments_total{outcome="replayed"} 1.0' in text
    assert 'quotra_x402_payments_total{outcome="invalid_payload"} 1.0' in text


async def test_a_fresh_relay_has_no_calls(paid: Any) -> None:
    for model in (Call, X402Authorization, X402Payer):
        (row,) = await _rows(paid, select(func.count()).select_from(model))
        assert row[0] == 0


async def test_paid_stream_with_include_usage_ends_with_the_usage_chunk_and_the_payment(paid: Any) -> None:
    account = payer(paid.chain)
    accepted = await requirements(paid, stream=True)
    reply = await pay(
        paid,
        v2_header(accepted, authorization(account, accepted)),
        stream=True,
        stream_options={"include_usage": True},
    )
    assert reply.status_code == 200
    events = [line.removeprefix("data: ") for line in reply.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    finish, last = json.loads(events[-3]), json.loads(events[-2])
    # OpenAI's order: the chunk with the finish reason, then the usage chunk (no choices), asked for.
    assert finish["choices"][0]["finish_reason"] == "stop" and "quotra" not in finish
    assert last["choices"] == [] and last["usage"] == FakeAdapter._usage(chat_body()).to_openai()
    assert last["quotra"]["object"] == "quotra.payment" and last["quotra"]["call"] == call_id_of(reply)


def _junk(rng: random.Random, depth: int = 0) -> Any:
    """A JSON value of any type, size or content (control characters, huge and fractional numbers)."""
    kind = rng.randrange(10 if depth < 3 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 2**63, 2**256, -(2**255), 10**77 + 1, PRICE])
    if kind == 3:
        return rng.choice([0.5, -1e300, 1e-300, float(PRICE) + 0.5, 1000.0])
    if kind == 4:
        return rng.choice(
            [
                "",
                "\x00",
                "0x",
                "0x" + "f" * 64,
                f"{PRICE}.5",
                "1e3",
                " 1000",
                "\uff11\uff10\uff10\uff10",
                "é" * 300,
            ]
        )
    if kind == 5:
        return "".join(chr(rng.randrange(0x110000) % 0xD800) for _ in range(rng.randrange(40)))
    if kind == 6:
        return str(rng.choice([PRICE, 2**256, -1, 0]))
    if kind in (7, 8):
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        rng.choice(["from", "to", "value", "x", ""]): _junk(rng, depth + 1) for _ in range(rng.randrange(4))
    }


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*path, index))
    return found


async def test_any_value_anywhere_in_a_payment_is_refused_or_served_never_a_5xx(paid: Any) -> None:
    accepted = await requirements(paid)
    account = payer(paid.chain)
    rng = random.Random(11)
    for attempt in range(100):  # within the consumer rate limit (120 a minute)
        header = json.loads(base64.b64decode(v2_header(accepted, authorization(account, accepted))))
        for _ in range(rng.randrange(1, 3)):  # one or two fields replaced by junk
            *parent, last = rng.choice(_paths(header)[1:])
            target = header
            for key in parent:
                target = target[key]
            target[last] = _junk(rng)
        before = len(await calls(paid))
        reply = await pay(paid, base64.b64encode(json.dumps(header).encode()).decode())
        assert reply.status_code in (200, 402), (attempt, header, reply.text)
        if reply.status_code == 402:
            assert set(reply.json()["error"]) >= {"message", "type", "param", "code"}
            assert len(await calls(paid)) == before, (attempt, header)
    assert len(await calls(paid)) == len(await auths(paid))  # each call served was paid once
