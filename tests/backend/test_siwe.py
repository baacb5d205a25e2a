"""Sign-In with Ethereum: message format, verification failures, nonces, ERC-1271, sessions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from eth_account import Account
from quotra.siwe import SiweError, SiweMessage, SiweVerifier, format_time
from relay_helpers import sign

ACCOUNT = Account.from_key("0x" + "42" * 32)
CONTRACT_WALLET = "0x000000000000000000000000000000000000c0DE"


def message(**overrides: object) -> SiweMessage:
    now = datetime.now(UTC)
    fields: dict[str, object] = dict(
        domain="testserver",
        address=ACCOUNT.address,
        statement="Sign in to Quotra.",
        uri="http://testserver",
        chain_id=84532,
        nonce="0123456789abcdef",
        issued_at=format_time(now),
        expiration_time=format_time(now + timedelta(minutes=5)),
    )
    fields.update(overrides)
    return SiweMessage(**fields)  # type: ignore[arg-type]


def test_message_text_roundtrips_with_and_without_optional_fields() -> None:
    full = message(
        request_id="r-1", not_before=format_time(datetime.now(UTC)), resources=["https://a/b", "ipfs://x"]
    )
    assert SiweMessage.parse(full.to_text()) == full
    bare = message(statement=None, expiration_time=None)
    text = bare.to_text()
    assert f"{ACCOUNT.address}\n\n\nURI: " in text  # EIP-4361: no statement, two blank lines
    assert SiweMessage.parse(text) == bare


@pytest.mark.parametrize(
    "text",
    [
        "hello",
        message().to_text().replace(ACCOUNT.address, ACCOUNT.address.lower()),  # not EIP-55
        message().to_text().replace("Version: 1", "Version: 2"),
        message().to_text().replace("Nonce: 0123456789abcdef", "Nonce: short"),
        message().to_text().replace("Chain ID: 84532", "Chain ID: abc"),
        message().to_text() + "\nUnknown: field",
        message().to_text().replace("\nURI: http://testserver", ""),
    ],
)
def test_malformed_messages_are_refused(text: str) -> None:
    with pytest.raises(SiweError):
        SiweMessage.parse(text)


def verifier(erc1271: object = None) -> SiweVerifier:
    return SiweVerifier(domain="testserver", uri="http://testserver", chain_id=84532, erc1271=erc1271)  # type: ignore[arg-type]


async def test_good_signature_verifies() -> None:
    text = message().to_text()
    parsed = await verifier().verify(text, sign(ACCOUNT, text))
    assert parsed.address == ACCOUNT.address


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"domain": "evil.example"}, "domain"),
        ({"uri": "https://testserver"}, "URI"),
        ({"uri": "http://evil.example/login"}, "URI"),
        ({"chain_id": 1}, "chain"),
        ({"expiration_time": format_time(datetime.now(UTC) - timedelta(seconds=1))}, "expired"),
        (
            {"issued_at": format_time(datetime.now(UTC) - timedelta(hours=1)), "expiration_time": None},
            "too old",
        ),
        ({"issued_at": format_time(datetime.now(UTC) + timedelta(hours=1))}, "future"),
        ({"not_before": format_time(datetime.now(UTC) + timedelta(hours=1))}, "not yet valid"),
    ],
)
async def test_message_checks_refuse(overrides: dict[str, object], reason: str) -> None:
    text = message(**overrides).to_text()
    with pytest.raises(SiweError, match=reason):
        await verifier().verify(text, sign(ACCOUNT, text))


async def test_signature_by_another_key_is_refused() -> None:
    text = message().to_text()
    with pytest.raises(SiweError, match="signature"):
        await verifier().verify(text, sign(Account.create(), text))
    with pytest.raises(SiweError):
        await verifier().verify(text, "0xnothex")
    with pytest.raises(SiweError):
        await verifier().verify(text, "0x" + "00" * 65)


async def test_contract_wallet_signature_goes_through_erc1271() -> None:
    seen: list[tuple[str, bytes, bytes]] = []

    async def fake_erc1271(address: str, digest: bytes, signature: bytes) -> bool:
        seen.append((address, digest, signature))
        return signature == b"\xc0\xde" * 10

    text = message(address=CONTRACT_WALLET).to_text()
    parsed = await verifier(fake_erc1271).verify(text, "0x" + "c0de" * 10)
    assert parsed.address == CONTRACT_WALLET
    from eth_account.messages import defunct_hash_message

    assert seen[0][0] == CONTRACT_WALLET and seen[0][1] == bytes(defunct_hash_message(text=text))
    with pytest.raises(SiweError, match="signature"):
        await verifier(fake_erc1271).verify(text, "0x" + "bad0" * 10)
    with pytest.raises(SiweError):  # no ERC-1271 checker configured: contract wallets cannot sign in
        await verifier().verify(text, "0x" + "c0de" * 10)


# ---- over HTTP -----------------------------------------------------------------------------------


async def test_sign_in_flow_issues_a_session_token(relay) -> None:
    account = Account.create()
    nonce = (await relay.client.post("/v1/auth/nonce", json={"address": account.address})).json()
    assert nonce["domain"] == "testserver" and nonce["chain_id"] == 84532
    text = nonce["message"]
    reply = await relay.client.post(
        "/v1/auth/verify", json={"message": text, "signature": sign(account, text)}
    )
    assert reply.status_code == 200
    token = reply.json()["access_token"]
    assert reply.json()["address"] == account.address
    who = await relay.client.get("/v1/auth/session", headers={"Authorization": f"Bearer {token}"})
    assert who.json() == {"address": account.address}


async def test_replayed_nonce_is_refused(relay) -> None:
    account = Account.create()
    text = (await relay.client.post("/v1/auth/nonce", json={"address": account.address})).json()["message"]
    body = {"message": text, "signature": sign(account, text)}
    assert (await relay.client.post("/v1/auth/verify", json=body)).status_code == 200
    again = await relay.client.post("/v1/auth/verify", json=body)
    assert again.status_code == 401
    assert again.json()["error"]["code"] == "invalid_nonce"


async def test_nonce_not_issued_by_server_is_refused(relay) -> None:
    text = message(address=ACCOUNT.address, nonce="madeupnonce12345").to_text()
    reply = await relay.client.post(
        "/v1/auth/verify", json={"message": text, "signature": sign(ACCOUNT, text)}
    )
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_nonce"


async def test_bad_signature_over_http_does_not_burn_the_nonce(relay) -> None:
    account = Account.create()
    text = (await relay.client.post("/v1/auth/nonce", json={"address": account.address})).json()["message"]
    bad = await relay.client.post(
        "/v1/auth/verify", json={"message": text, "signature": sign(Account.create(), text)}
    )
    assert bad.status_code == 401
    assert bad.json()["error"] == {
        "message": "Sign-in refused: signature does not match the address",
        "type": "authentication_error",
        "param": None,
        "code": "invalid_siwe",
    }
    good = await relay.client.post(
        "/v1/auth/verify", json={"message": text, "signature": sign(account, text)}
    )
    assert good.status_code == 200


async def test_erc1271_wallet_signs_in_over_http(start_relay) -> None:
    async def fake_erc1271(address: str, digest: bytes, signature: bytes) -> bool:
        return address == CONTRACT_WALLET and signature == b"\x01\x02\x03"

    async with start_relay(erc1271=fake_erc1271) as relay:
        text = (await relay.client.post("/v1/auth/nonce", json={"address": CONTRACT_WALLET})).json()[
            "message"
        ]
        reply = await relay.client.post("/v1/auth/verify", json={"message": text, "signature": "0x010203"})
        assert reply.status_code == 200 and reply.json()["address"] == CONTRACT_WALLET


@pytest.mark.parametrize(
    "header",
    ["Bearer qs_e30.bad", "Bearer qs_", "Basic abc", "Bearer ", "Bearer sk-unknown"],
)
async def test_bad_session_tokens_are_refused(relay, header: str) -> None:
    reply = await relay.client.get("/v1/auth/session", headers={"Authorization": header})
    assert reply.status_code == 401
    assert reply.json()["error"]["type"] == "authentication_error"


async def test_tampered_session_token_is_refused(relay) -> None:
    _, headers = await relay.provider()
    token = headers["Authorization"].removeprefix("Bearer ")
    payload, mac = token.removeprefix("qs_").split(".")
    import base64
    import json

    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data["a"] = ACCOUNT.address
    forged = base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).rstrip(b"=").decode()
    reply = await relay.client.get("/v1/auth/session", headers={"Authorization": f"Bearer qs_{forged}.{mac}"})
    assert reply.status_code == 401


async def test_expired_session_token_is_refused(relay) -> None:
    sessions = relay.runtime.sessions
    token, _ = sessions.issue(ACCOUNT.address, now=1_000_000.0)
    assert sessions.verify(token, now=1_000_000.0 + 10) == ACCOUNT.address
    reply = await relay.client.get("/v1/auth/session", headers={"Authorization": f"Bearer {token}"})
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_session"
