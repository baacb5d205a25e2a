"""Envelope encryption of provider keys: round trip, tamper detection, AAD binding, rotation."""

from __future__ import annotations

import base64

import pytest
from quotra.config import master_key_id
from quotra.vault import Sealed, Vault, VaultError

KEY_A, KEY_B = b"\x11" * 32, b"\x22" * 32


def flip(data: bytes, index: int = 0) -> bytes:
    return data[:index] + bytes([data[index] ^ 1]) + data[index + 1 :]


def test_seal_then_open_roundtrip_and_ciphertext_hides_the_key() -> None:
    vault = Vault.from_key(KEY_A)
    sealed = vault.seal("lst_1", "sk-live-very-secret")
    assert "sk-live-very-secret" not in sealed
    assert base64.b64encode(b"sk-live-very-secret").decode()[:10] not in sealed
    assert vault.open("lst_1", sealed) == "sk-live-very-secret"
    assert vault.seal("lst_1", "sk-live-very-secret") != sealed  # fresh data key and nonces


@pytest.mark.parametrize("part", ["ciphertext", "nonce", "wrapped_dek", "wrap_nonce"])
def test_tampered_sealed_key_is_refused(part: str) -> None:
    vault = Vault.from_key(KEY_A)
    sealed = Sealed.loads(vault.seal("lst_1", "sk-secret"))
    tampered = Sealed(**{**sealed.__dict__, part: flip(getattr(sealed, part))}).dumps()
    with pytest.raises(VaultError):
        vault.open("lst_1", tampered)


def test_sealed_key_does_not_open_for_another_listing() -> None:
    vault = Vault.from_key(KEY_A)
    sealed = vault.seal("lst_1", "sk-secret")
    with pytest.raises(VaultError, match="wrong listing"):
        vault.open("lst_2", sealed)


def test_wrong_or_unknown_master_key_is_refused() -> None:
    sealed = Vault.from_key(KEY_A).seal("lst_1", "sk-secret")
    with pytest.raises(VaultError, match="unknown master key"):
        Vault.from_key(KEY_B).open("lst_1", sealed)
    forged = sealed.replace(master_key_id(KEY_A), master_key_id(KEY_B))
    with pytest.raises(VaultError):
        Vault({master_key_id(KEY_B): KEY_B}, master_key_id(KEY_B)).open("lst_1", forged)


def test_malformed_sealed_text_is_refused() -> None:
    vault = Vault.from_key(KEY_A)
    for junk in ["", "v1.abc", "v2.x.a.b.c.d", "v1.x.!!.b.c.d"]:
        with pytest.raises(VaultError):
            vault.open("lst_1", junk)


def test_rewrap_moves_to_new_master_key_without_changing_the_ciphertext() -> None:
    old = Vault.from_key(KEY_A)
    sealed = old.seal("lst_1", "sk-secret")
    ring = Vault({master_key_id(KEY_A): KEY_A, master_key_id(KEY_B): KEY_B}, master_key_id(KEY_B))
    assert ring.needs_rewrap(sealed)
    rewrapped = ring.rewrap("lst_1", sealed)
    assert not ring.needs_rewrap(rewrapped)
    assert Sealed.loads(rewrapped).ciphertext == Sealed.loads(sealed).ciphertext
    assert Vault.from_key(KEY_B).open("lst_1", rewrapped) == "sk-secret"
    with pytest.raises(VaultError):
        old.open("lst_1", rewrapped)  # the old key alone no longer opens it


def test_keyring_entries_must_match_their_ids() -> None:
    with pytest.raises(ValueError):
        Vault({"wrong-id": KEY_A}, "wrong-id")
    with pytest.raises(ValueError):
        Vault({master_key_id(KEY_A): KEY_A}, master_key_id(KEY_B))
