"""A failure after the upstream answered never charges (issue 9): when the call's finish cannot be
written, the client gets a clear 503 naming the call, the reservation is voided (by the relay, or
by the sweeper if the store is down altogether) and the payment pays for nothing; the same x402
payment then pays for a retry, once."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from eth_account import Account
from quotra.calls.records import CallView
from quotra.payments.receipts import ReceiptSigner
from quotra.store.models import utcnow
from relay_helpers import chat_body
from x402_helpers import OPERATOR, TERMS, FakeChain, authorization, offer, v2_header

PRICE = 1_000


@pytest.fixture
async def paid(start_relay: Any) -> AsyncIterator[Any]:
    async with start_relay(playground_free_calls=0) as relay:
        chain = FakeChain()
        relay.runtime.payments.gate.configure(chain, TERMS, ReceiptSigner(bytes(OPERATOR.key)))
        _, headers = await relay.provider()
        relay.listing_record = await relay.listing(headers, models=["sandbox-model"], price_per_call="0.001")
        relay.chain = chain
        yield relay


async def payment_header(relay: Any, **body: Any) -> tuple[Any, str]:
    payer = Account.create()
    relay.chain.fund(payer.address, 10 * PRICE)
    reply = await relay.client.post("/v1/chat/completions", json=chat_body(**body))
    (requirements,) = offer(reply)["accepts"]
    return payer, v2_header(requirements, authorization(payer, requirements))


def failing(*_: Any, **__: Any) -> Any:
    raise RuntimeError("the database went away")


async def the_call(relay: Any, call_id: str) -> CallView:
    call = await relay.runtime.calls.get(call_id)
    assert call is not None
    return call


async def test_finish_fails__503_voided_and_the_payment_pays_for_the_retry(
    paid: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    payer, header = await payment_header(paid)
    calls = paid.runtime.calls
    finish = calls.finish
    monkeypatch.setattr(calls, "finish", failing)

    reply = await paid.client.post(
        "/v1/chat/completions", json=chat_body(), headers={"PAYMENT-SIGNATURE": header}
    )

    assert reply.status_code == 503, reply.text
    assert reply.json()["error"]["code"] == "call_not_recorded"
    assert "nothing was charged" in reply.json()["error"]["message"]
    assert reply.headers["retry-after"] == "1"
    call_id = reply.headers["quotra-call-id"]
    failed = await the_call(paid, call_id)
    assert (failed.state, failed.amount) == ("voided", 0)
    assert "payment-response" not in reply.headers  # nothing claims a payment

    monkeypatch.setattr(calls, "finish", finish)
    retry = await paid.client.post(
        "/v1/chat/completions", json=chat_body(), headers={"PAYMENT-SIGNATURE": header}
    )
    assert retry.status_code == 200, retry.text
    served = await the_call(paid, retry.headers["quotra-call-id"])
    assert (served.state, served.amount, served.payer) == ("captured", PRICE, payer.address)
    again = await paid.client.post(
        "/v1/chat/completions", json=chat_body(), headers={"PAYMENT-SIGNATURE": header}
    )
    assert again.status_code == 409 and again.json()["error"]["call"]["id"] == served.id


async def test_finish_fails_at_the_end_of_a_stream__error_event_no_done_not_charged(
    paid: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, header = await payment_header(paid)
    monkeypatch.setattr(paid.runtime.calls, "finish", failing)

    reply = await paid.client.post(
        "/v1/chat/completions", json=chat_body(stream=True), headers={"PAYMENT-SIGNATURE": header}
    )

    assert reply.status_code == 200  # the stream had started
    events = [line.removeprefix("data: ") for line in reply.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] != "[DONE]"
    assert json.loads(events[-1])["error"]["code"] == "call_not_recorded"
    call = await the_call(paid, reply.headers["quotra-call-id"])
    assert (call.state, call.amount) == ("voided", 0)


async def test_store_down_at_the_end__the_sweeper_voids_the_call_later(
    paid: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, header = await payment_header(paid)
    calls = paid.runtime.calls
    monkeypatch.setattr(calls, "finish", failing)
    monkeypatch.setattr(calls, "void", failing)

    reply = await paid.client.post(
        "/v1/chat/completions", json=chat_body(), headers={"PAYMENT-SIGNATURE": header}
    )

    assert reply.status_code == 503 and reply.json()["error"]["code"] == "call_not_recorded"
    stuck = await the_call(paid, reply.headers["quotra-call-id"])
    assert stuck.state == "reserved"  # nothing could be written: not charged, not ended yet
    monkeypatch.undo()
    assert await calls.sweep(utcnow() + timedelta(hours=1)) >= 1
    voided = await the_call(paid, stuck.id)
    assert (voided.state, voided.amount) == ("voided", 0)
    assert voided.error and "never finished" in voided.error


async def test_upstream_answered_but_the_client_hung_up__finished_once(paid: Any) -> None:
    """The sweeper never voids a call its relay finished: a finish and a late sweep race once."""
    _, header = await payment_header(paid)
    reply = await paid.client.post(
        "/v1/chat/completions", json=chat_body(), headers={"PAYMENT-SIGNATURE": header}
    )
    assert reply.status_code == 200
    calls = paid.runtime.calls
    assert await calls.sweep(utcnow() + timedelta(hours=1)) == 0
    call = await the_call(paid, reply.headers["quotra-call-id"])
    assert (call.state, call.amount) == ("captured", PRICE)
    assert not await calls.void(call.id, outcome="error")
