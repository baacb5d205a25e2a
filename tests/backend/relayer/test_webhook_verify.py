"""`POST /v1/webhooks/relayer`: 1Shot and Standard Webhooks formats, Ed25519 keys from a JWKS,
timestamp window, dedupe. Every refusal has its exact status and changes nothing."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from quotra.app import create_app
from quotra.config import Settings
from quotra.store.claims_repo import ClaimsRepo, new_claim_id
from quotra.webhooks import (
    Ed25519Signer,
    JwksCache,
    WebhookRejected,
    WebhookVerifier,
    canonical_json,
    check_jwks_url,
    parse_jwks,
)

JWKS_URL = "https://relayer.example/.well-known/jwks.json"
PROVIDER = "0x1111111111111111111111111111111111111111"
TX_HASH = "0x" + "ab" * 32
TASK = "0x" + "12" * 32


class FakeJwks:
    """The relayer's JWKS endpoint: counts fetches, can rotate keys or go down."""

    def __init__(self, *signers: Ed25519Signer) -> None:
        self.keys = [s.jwk() for s in signers]
        self.fetches = 0
        self.down = False

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path != "/.well-known/jwks.json":
            return httpx.Response(404)
        self.fetches += 1
        if self.down:
            return httpx.Response(503)
        return httpx.Response(200, json={"keys": self.keys})


def status_data(status: int = 110, *, memo: str | None = None, task: str = TASK) -> dict[str, Any]:
    data: dict[str, Any] = {"id": task, "chainId": "84532", "createdAt": int(time.time()), "status": status}
    if memo is not None:
        data["memo"] = memo
    if status >= 110:
        data["hash"] = TX_HASH
    if status == 200:
        data["receipt"] = {
            "blockHash": "0x" + "cd" * 32,
            "blockNumber": 42,
            "gasUsed": "81234",
            "transactionHash": TX_HASH,
        }
    return data


def oneshot_body(
    signer: Ed25519Signer,
    data: dict[str, Any],
    *,
    type_: int = 4,
    timestamp: int | None = None,
    key_id: str | None = None,
) -> dict[str, Any]:
    envelope = {"apiVersion": 0, "type": type_, "data": data, "timestamp": timestamp or int(time.time())}
    body = {**envelope, "keyId": key_id or signer.kid}
    return {**body, "signature": signer.sign(canonical_json(body))}


def standard_request(
    signer: Ed25519Signer,
    data: dict[str, Any],
    *,
    type_: int = 4,
    msg_id: str = "msg_1",
    timestamp: int | None = None,
) -> tuple[bytes, dict[str, str]]:
    ts = timestamp or int(time.time())
    body = json.dumps({"apiVersion": 0, "type": type_, "data": data, "timestamp": ts}).encode()
    return body, {"content-type": "application/json", **signer.sign_standard(msg_id, ts, body)}


@dataclass
class Relay:
    client: httpx.AsyncClient
    repo: ClaimsRepo
    jwks: FakeJwks

    async def post(self, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.client.post(
            "/v1/webhooks/relayer", content=content, headers=headers or {"content-type": "application/json"}
        )

    async def claim(self) -> str:
        claim_id = new_claim_id()
        await self.repo.create_claim(
            claim_id=claim_id,
            provider=PROVIDER,
            payee=PROVIDER,
            delegation_digest="0x" + "ee" * 32,
            amount=1_000_000,
            relayer_fee=10_000,
            relayer="oneshot",
            task_id=TASK,
        )
        return claim_id

    async def unchanged(self, claim_id: str) -> None:
        claim = await self.repo.get_claim(claim_id)
        assert claim is not None
        assert (claim.status, claim.tx_hash) == ("requested", None)
        assert await self.repo.events_count() == 0


@pytest.fixture
def signer() -> Ed25519Signer:
    return Ed25519Signer.generate()


@pytest.fixture
def start(make_settings: Callable[..., Settings], signer: Ed25519Signer) -> Callable[..., Any]:
    @asynccontextmanager
    async def run(jwks: FakeJwks | None = None, **overrides: Any) -> AsyncIterator[Relay]:
        jwks = jwks or FakeJwks(signer)
        values = {"relayer_jwks_url": JWKS_URL, "prepaid_refresh_seconds": 0, "jwks_min_refetch_seconds": 30}
        settings = make_settings(**{**values, **overrides})
        app = create_app(settings, http_transport=httpx.MockTransport(jwks.handler))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
                yield Relay(client, app.state.runtime.claims_repo, jwks)

    return run


@pytest.fixture
async def relay(start: Callable[..., Any]) -> AsyncIterator[Relay]:
    async with start() as running:
        yield running


# ---- accepted -----------------------------------------------------------------------------------


async def test_oneshot__valid__moves_the_claim_submitted_then_confirmed(relay: Relay, signer: Ed25519Signer):
    claim_id = await relay.claim()
    reply = await relay.post(oneshot_body(signer, status_data(110, memo=claim_id)))
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"received": True, "duplicate": False, "event_id": TASK, "type": 4}
    claim = await relay.repo.get_claim(claim_id)
    assert claim is not None and (claim.status, claim.tx_hash) == ("submitted", TX_HASH)

    reply = await relay.post(oneshot_body(signer, status_data(200, memo=claim_id), type_=0))
    assert reply.status_code == 200
    claim = await relay.repo.get_claim(claim_id)
    assert claim is not None and (claim.status, claim.block_number) == ("confirmed", 42)


async def test_oneshot__failure_event__fails_the_claim_with_the_relayers_message(relay: Relay, signer):
    claim_id = await relay.claim()
    data = {**status_data(500, memo=claim_id), "message": "execution reverted", "data": "0x"}
    assert (await relay.post(oneshot_body(signer, data, type_=1))).status_code == 200
    claim = await relay.repo.get_claim(claim_id)
    assert claim is not None and (claim.status, claim.error) == ("failed", "execution reverted")


async def test_oneshot__late_submitted_after_confirmed__changes_nothing(relay: Relay, signer):
    claim_id = await relay.claim()
    await relay.post(oneshot_body(signer, status_data(200, memo=claim_id), type_=0))
    assert (await relay.post(oneshot_body(signer, status_data(110, memo=claim_id)))).status_code == 200
    claim = await relay.repo.get_claim(claim_id)
    assert claim is not None and claim.status == "confirmed"


async def test_standard_webhooks__valid__is_applied(relay: Relay, signer: Ed25519Signer):
    claim_id = await relay.claim()
    body, headers = standard_request(signer, status_data(110, memo=claim_id))
    reply = await relay.post(body, headers)
    assert reply.status_code == 200, reply.text
    assert reply.json()["event_id"] == "msg_1"
    claim = await relay.repo.get_claim(claim_id)
    assert claim is not None and claim.status == "submitted"


async def test_standard_webhooks__one_good_signature_among_several__is_accepted(relay: Relay, signer):
    claim_id = await relay.claim()
    body, headers = standard_request(signer, status_data(110, memo=claim_id))
    other = Ed25519Signer.generate().sign_standard("msg_1", int(headers["webhook-timestamp"]), body)
    signatures = ["v1,bm90LWhtYWM=", other["webhook-signature"], headers["webhook-signature"]]
    headers["webhook-signature"] = " ".join(signatures)
    assert (await relay.post(body, headers)).status_code == 200


async def test_non_ascii_memo__verifies_over_unescaped_utf8(relay: Relay, signer: Ed25519Signer):
    data = status_data(110, memo="dépôt été · 提款 ✓")
    body = oneshot_body(signer, data)
    # On the wire the JSON escapes non-ASCII; the signature covers the unescaped canonical form.
    wire = json.dumps(body, ensure_ascii=True).encode()
    assert b"\\u00e9" in wire
    reply = await relay.post(wire)
    assert reply.status_code == 200, reply.text
    assert await relay.repo.events_count() == 1


async def test_non_ascii_memo__signed_over_escaped_json__is_refused(relay: Relay, signer: Ed25519Signer):
    data = status_data(110, memo="été")
    envelope = {"apiVersion": 0, "type": 4, "data": data, "timestamp": int(time.time()), "keyId": signer.kid}
    escaped = json.dumps(envelope, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    reply = await relay.post({**envelope, "signature": signer.sign(escaped)})
    assert (reply.status_code, reply.json()["error"]["code"]) == (401, "invalid_signature")
    assert await relay.repo.events_count() == 0


async def test_replay__is_acknowledged_without_effect(relay: Relay, signer: Ed25519Signer):
    claim_id = await relay.claim()
    body = oneshot_body(signer, status_data(110, memo=claim_id))
    first = await relay.post(body)
    before = await relay.repo.get_claim(claim_id)
    second = await relay.post(oneshot_body(signer, status_data(110, memo=claim_id)))  # re-sent, re-signed
    assert (first.status_code, second.status_code) == (200, 200)
    assert second.json()["duplicate"] is True
    assert await relay.repo.get_claim(claim_id) == before
    assert await relay.repo.events_count() == 1


async def test_standard_webhooks__replayed_id__is_acknowledged_without_effect(relay: Relay, signer):
    claim_id = await relay.claim()
    body, headers = standard_request(signer, status_data(110, memo=claim_id))
    assert (await relay.post(body, headers)).json()["duplicate"] is False
    assert (await relay.post(body, headers)).json()["duplicate"] is True
    assert await relay.repo.events_count() == 1


# ---- refused: 401 ---------------------------------------------------------------------------------


async def test_tampered_body__401_and_nothing_changes(relay: Relay, signer: Ed25519Signer):
    claim_id = await relay.claim()
    body = oneshot_body(signer, status_data(110, memo=claim_id))
    body["data"]["hash"] = "0x" + "66" * 32
    reply = await relay.post(body)
    assert reply.status_code == 401
    assert reply.json()["error"] == {
        "message": "webhook signature does not verify",
        "type": "authentication_error",
        "param": None,
        "code": "invalid_signature",
    }
    await relay.unchanged(claim_id)


async def test_wrong_key_under_a_known_kid__401(relay: Relay, signer: Ed25519Signer):
    claim_id = await relay.claim()
    body = oneshot_body(Ed25519Signer.generate(), status_data(110, memo=claim_id), key_id=signer.kid)
    reply = await relay.post(body)
    assert (reply.status_code, reply.json()["error"]["code"]) == (401, "invalid_signature")
    await relay.unchanged(claim_id)


async def test_unknown_kid__401_after_one_refetch(relay: Relay):
    claim_id = await relay.claim()
    stranger = Ed25519Signer.generate()
    reply = await relay.post(oneshot_body(stranger, status_data(110, memo=claim_id)))
    assert (reply.status_code, reply.json()["error"]["code"]) == (401, "unknown_key")
    assert relay.jwks.fetches == 2  # the first fetch, then one refetch for the unknown kid
    # Refetches are rate-limited: a flood of unknown kids does not hammer the JWKS.
    for _ in range(3):
        assert (await relay.post(oneshot_body(stranger, status_data(110, memo=claim_id)))).status_code == 401
    assert relay.jwks.fetches == 2
    await relay.unchanged(claim_id)


async def test_unknown_kid_then_rotated_jwks__refetched_once_and_accepted(start, signer: Ed25519Signer):
    rotated = Ed25519Signer.generate()
    jwks = FakeJwks(signer)
    async with start(jwks, jwks_min_refetch_seconds=0) as relay:
        claim_id = await relay.claim()
        assert (await relay.post(oneshot_body(signer, status_data(110, memo=claim_id)))).status_code == 200
        assert jwks.fetches == 1
        jwks.keys = [rotated.jwk()]  # the relayer rotates its key
        reply = await relay.post(oneshot_body(rotated, status_data(200, memo=claim_id), type_=0))
        assert reply.status_code == 200, reply.text
        assert jwks.fetches == 2
        claim = await relay.repo.get_claim(claim_id)
        assert claim is not None and claim.status == "confirmed"


async def test_several_keys_under_one_kid__each_is_tried(start, signer: Ed25519Signer):
    other = Ed25519Signer.generate()
    jwks = FakeJwks()
    jwks.keys = [{**other.jwk(), "kid": signer.kid}, signer.jwk()]
    async with start(jwks) as relay:
        assert (await relay.post(oneshot_body(signer, status_data(110, memo="x")))).status_code == 200


@pytest.mark.parametrize("skew", [-305, 305])
async def test_stale_or_future_timestamp__401(relay: Relay, signer: Ed25519Signer, skew: int):
    claim_id = await relay.claim()
    body = oneshot_body(signer, status_data(110, memo=claim_id), timestamp=int(time.time()) + skew)
    reply = await relay.post(body)
    assert (reply.status_code, reply.json()["error"]["code"]) == (401, "stale_timestamp")
    await relay.unchanged(claim_id)


@pytest.mark.parametrize("skew", [-290, 290])
async def test_timestamp_inside_the_window__accepted(relay: Relay, signer: Ed25519Signer, skew: int):
    body = oneshot_body(signer, status_data(110, memo="m"), timestamp=int(time.time()) + skew)
    assert (await relay.post(body)).status_code == 200


@pytest.mark.parametrize("skew", [-400, 400])
async def test_standard_webhooks__stale_or_future_timestamp__401(relay: Relay, signer, skew: int):
    body, headers = standard_request(signer, status_data(110, memo="m"), timestamp=int(time.time()) + skew)
    reply = await relay.post(body, headers)
    assert (reply.status_code, reply.json()["error"]["code"]) == (401, "stale_timestamp")
    assert await relay.repo.events_count() == 0


async def test_standard_webhooks__tampered_body__401(relay: Relay, signer: Ed25519Signer):
    claim_id = await relay.claim()
    body, headers = standard_request(signer, status_data(110, memo=claim_id))
    reply = await relay.post(body.replace(b"110", b"200"), headers)
    assert (reply.status_code, reply.json()["error"]["code"]) == (401, "invalid_signature")
    await relay.unchanged(claim_id)


async def test_standard_webhooks__only_hmac_signatures__401(relay: Relay, signer: Ed25519Signer):
    body, headers = standard_request(signer, status_data(110, memo="m"))
    headers["webhook-signature"] = "v1,c2VjcmV0LWhtYWM="
    reply = await relay.post(body, headers)
    assert (reply.status_code, reply.json()["error"]["code"]) == (401, "missing_signature")


async def test_missing_signature__401(relay: Relay, signer: Ed25519Signer):
    body = oneshot_body(signer, status_data(110, memo="m"))
    del body["signature"]
    reply = await relay.post(body)
    assert (reply.status_code, reply.json()["error"]["code"]) == (401, "missing_signature")
    assert await relay.repo.events_count() == 0


# ---- refused: 400 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b.pop("keyId"), "webhook field `keyId` must be a non-empty string"),
        (lambda b: b.pop("data"), "webhook field `data` must be an object"),
        (lambda b: b.pop("timestamp"), "webhook field `timestamp` must be an integer"),
        (lambda b: b.pop("type"), "webhook field `type` must be an integer"),
        (lambda b: b.update(type=7), "unknown webhook type 7"),
        (lambda b: b.update(apiVersion=1), "unsupported webhook apiVersion 1"),
        (
            lambda b: b["data"].pop("id"),
            "webhook field `data.id` must be a task id of 1 to 100 printable characters",
        ),
        (
            lambda b: b["data"].update(id="task\x00"),
            "webhook field `data.id` must be a task id of 1 to 100 printable characters",
        ),
        (
            lambda b: b["data"].update(memo="clm\x00" + "x" * 300),
            "webhook field `data.memo` must be at most 256 printable characters",
        ),
    ],
)
async def test_missing_or_bad_fields__400(relay: Relay, signer: Ed25519Signer, mutate, message: str):
    claim_id = await relay.claim()
    body = oneshot_body(signer, status_data(110, memo=claim_id))
    mutate(body)
    reply = await relay.post(body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["code"] == "malformed_webhook"
    assert reply.json()["error"]["message"] == message
    await relay.unchanged(claim_id)


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"[1, 2]",
        b"\xff\xfe",
        b"",
        # Nested past the parser's recursion limit (unauthenticated: parsed before any signature).
        b'{"data": ' + b"[" * 5_000 + b"]" * 5_000 + b"}",
        b'{"data": ' + b'{"a": ' * 3_000 + b"1" + b"}" * 3_000 + b"}",
        b'{"timestamp": NaN}',
        b'{"timestamp": 1' + b"0" * 5_000 + b"}",
    ],
    ids=["not-json", "array", "not-utf8", "empty", "deep-arrays", "deep-objects", "nan", "huge-int"],
)
async def test_malformed_json__400(relay: Relay, raw: bytes):
    reply = await relay.post(raw)
    assert (reply.status_code, reply.json()["error"]["code"]) == (400, "malformed_webhook")
    assert await relay.repo.events_count() == 0


async def test_signed_but_without_a_status_code__400(relay: Relay, signer: Ed25519Signer):
    data = status_data(110, memo="m")
    del data["status"]
    reply = await relay.post(oneshot_body(signer, data))
    assert (reply.status_code, reply.json()["error"]["code"]) == (400, "malformed_webhook")
    assert await relay.repo.events_count() == 0


async def test_standard_webhooks__missing_id__400(relay: Relay, signer: Ed25519Signer):
    body, headers = standard_request(signer, status_data(110, memo="m"))
    del headers["webhook-id"]
    reply = await relay.post(body, headers)
    assert (reply.status_code, reply.json()["error"]["code"]) == (400, "malformed_webhook")


# ---- keys -----------------------------------------------------------------------------------------


async def test_jwks_down_with_no_key_known__503_so_the_relayer_retries(start, signer: Ed25519Signer):
    jwks = FakeJwks(signer)
    jwks.down = True
    async with start(jwks) as relay:
        reply = await relay.post(oneshot_body(signer, status_data(110, memo="m")))
        assert (reply.status_code, reply.json()["error"]["code"]) == (503, "relayer_keys_unavailable")
        assert await relay.repo.events_count() == 0


async def test_pinned_keys__verify_without_any_fetch(start, signer: Ed25519Signer):
    jwks = FakeJwks()
    pinned = json.dumps({"keys": [signer.jwk()]})
    async with start(jwks, relayer_jwks_url=None, relayer_pinned_jwks=pinned) as relay:
        assert (await relay.post(oneshot_body(signer, status_data(110, memo="m")))).status_code == 200
        assert jwks.fetches == 0


async def test_not_configured__404(make_settings: Callable[..., Settings]):
    app = create_app(make_settings(prepaid_refresh_seconds=0))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    async with app.router.lifespan_context(app), client:
        reply = await client.post("/v1/webhooks/relayer", json={})
    assert (reply.status_code, reply.json()["error"]["code"]) == (404, "webhooks_unavailable")


async def test_jwks_cache__refetches_after_its_ttl(signer: Ed25519Signer):
    jwks = FakeJwks(signer)
    now = [1000.0]
    async with httpx.AsyncClient(transport=httpx.MockTransport(jwks.handler)) as http:
        cache = JwksCache(http, JWKS_URL, ttl=600, min_refetch=30, clock=lambda: now[0])
        verifier = WebhookVerifier(cache)
        body = canonical_json(oneshot_body(signer, status_data(110)))
        await verifier.verify({}, body)
        now[0] += 599
        await verifier.verify({}, body)
        assert jwks.fetches == 1
        now[0] += 2
        await verifier.verify({}, body)
        assert jwks.fetches == 2


async def test_jwks_cache__keeps_old_keys_when_a_refetch_fails(signer: Ed25519Signer):
    jwks = FakeJwks(signer)
    now = [1000.0]
    async with httpx.AsyncClient(transport=httpx.MockTransport(jwks.handler)) as http:
        verifier = WebhookVerifier(JwksCache(http, JWKS_URL, ttl=10, min_refetch=5, clock=lambda: now[0]))
        body = canonical_json(oneshot_body(signer, status_data(110)))
        await verifier.verify({}, body)
        jwks.down, now[0] = True, now[0] + 11
        await verifier.verify({}, body)  # stale cache, fetch fails: the old key still verifies
        assert jwks.fetches == 2
        stranger = canonical_json(oneshot_body(Ed25519Signer.generate(), status_data(110)))
        with pytest.raises(WebhookRejected) as refused:
            await verifier.verify({}, stranger)
        assert refused.value.status == 401


def test_kid_is_the_rfc7638_thumbprint():
    # RFC 8037 appendix A.3's example key and thumbprint.
    signer = Ed25519Signer.from_text("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A")
    assert signer.x == "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
    assert signer.kid == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_parse_jwks__skips_foreign_and_broken_entries(signer: Ed25519Signer):
    document = {
        "keys": [
            {"kty": "RSA", "kid": "r", "n": "x", "e": "AQAB"},
            {"kty": "OKP", "crv": "X25519", "kid": "x", "x": signer.x},
            {"kty": "OKP", "crv": "Ed25519", "kid": "short", "x": "AAAA"},
            signer.jwk(),
        ]
    }
    assert [kid for kid, _ in parse_jwks(document)] == [signer.kid]
    with pytest.raises(ValueError):
        parse_jwks({"nokeys": []})


@pytest.mark.parametrize(
    ("url", "loopback_ok", "accepted"),
    [
        ("https://relayer.1shotapi.com/.well-known/jwks.json", False, True),
        ("http://relayer.1shotapi.com/.well-known/jwks.json", True, False),
        ("http://127.0.0.1:9545/.well-known/jwks.json", True, True),
        ("http://localhost:9545/.well-known/jwks.json", True, True),
        ("http://127.0.0.1:9545/.well-known/jwks.json", False, False),
        ("ftp://relayer.example/jwks.json", True, False),
    ],
)
def test_jwks_url_policy(url: str, loopback_ok: bool, accepted: bool):
    if accepted:
        assert check_jwks_url(url, allow_http_loopback=loopback_ok) == url
    else:
        with pytest.raises(ValueError):
            check_jwks_url(url, allow_http_loopback=loopback_ok)


def test_settings__refuse_a_plain_http_jwks_in_production(make_settings: Callable[..., Settings]):
    assert make_settings(relayer_jwks_url="http://127.0.0.1:9545/.well-known/jwks.json").effective_jwks_url
    with pytest.raises(ValueError, match="https"):
        make_settings(env="production", relayer_jwks_url="http://127.0.0.1:9545/.well-known/jwks.json")
    with pytest.raises(ValueError, match="QUOTRA_RELAYER_URL"):
        make_settings(relayer="oneshot")
    settings = make_settings(relayer="oneshot", relayer_url="http://127.0.0.1:9545/relayers")
    assert settings.effective_jwks_url == "http://127.0.0.1:9545/.well-known/jwks.json"
    assert settings.effective_webhook_url == "http://testserver/v1/webhooks/relayer"
