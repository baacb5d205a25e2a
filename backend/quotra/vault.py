"""AES-256-GCM envelope encryption of provider API keys.

Each listing's key is encrypted with its own random data key; the data key is wrapped by a
master key (the key-encryption key, from the environment). The listing id is associated data
of both layers, so a sealed key copied onto another listing does not open. Rotating the master
key only re-wraps data keys (`Vault.rewrap`); the encrypted API keys themselves do not change.

Sealed format (ASCII, one column): `v1.<kek id>.<wrap nonce>.<wrapped dek>.<nonce>.<ciphertext>`,
binary parts base64url without padding.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from quotra.config import master_key_id

_VERSION = "v1"


class VaultError(Exception):
    """A sealed key could not be opened (wrong master key, tampered data or wrong listing)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Sealed:
    kek_id: str
    wrap_nonce: bytes
    wrapped_dek: bytes
    nonce: bytes
    ciphertext: bytes

    def dumps(self) -> str:
        parts = [self.wrap_nonce, self.wrapped_dek, self.nonce, self.ciphertext]
        return ".".join([_VERSION, self.kek_id, *(_b64(p) for p in parts)])

    @classmethod
    def loads(cls, text: str) -> Sealed:
        try:
            version, kek_id, *rest = text.split(".")
            if version != _VERSION or len(rest) != 4:
                raise ValueError(version)
            wrap_nonce, wrapped, nonce, ciphertext = (_unb64(p) for p in rest)
        except ValueError as exc:
            raise VaultError("malformed sealed key") from exc
        return cls(kek_id, wrap_nonce, wrapped, nonce, ciphertext)


class Vault:
    def __init__(self, keys: dict[str, bytes], primary_id: str) -> None:
        if primary_id not in keys:
            raise ValueError("primary master key missing from the keyring")
        for kid, key in keys.items():
            if len(key) != 32 or master_key_id(key) != kid:
                raise ValueError("keyring entries must be 32-byte keys under their own id")
        self._keks = {kid: AESGCM(key) for kid, key in keys.items()}
        self.primary_id = primary_id

    @classmethod
    def from_key(cls, key: bytes) -> Vault:
        kid = master_key_id(key)
        return cls({kid: key}, kid)

    @staticmethod
    def _wrap_aad(listing_id: str, kek_id: str) -> bytes:
        return f"quotra-dek|{kek_id}|{listing_id}".encode()

    @staticmethod
    def _data_aad(listing_id: str) -> bytes:
        return f"quotra-api-key|{listing_id}".encode()

    def seal(self, listing_id: str, secret: str) -> str:
        dek = AESGCM.generate_key(bit_length=256)
        nonce, wrap_nonce = os.urandom(12), os.urandom(12)
        ciphertext = AESGCM(dek).encrypt(nonce, secret.encode(), self._data_aad(listing_id))
        wrapped = self._keks[self.primary_id].encrypt(
            wrap_nonce, dek, self._wrap_aad(listing_id, self.primary_id)
        )
        return Sealed(self.primary_id, wrap_nonce, wrapped, nonce, ciphertext).dumps()

    def _unwrap(self, listing_id: str, sealed: Sealed) -> bytes:
        kek = self._keks.get(sealed.kek_id)
        if kek is None:
            raise VaultError(f"sealed with unknown master key {sealed.kek_id}")
        try:
            return kek.decrypt(
                sealed.wrap_nonce, sealed.wrapped_dek, self._wrap_aad(listing_id, sealed.kek_id)
            )
        except InvalidTag as exc:
            raise VaultError("data key does not open (tampered or wrong listing)") from exc

    def open(self, listing_id: str, sealed_text: str) -> str:
        sealed = Sealed.loads(sealed_text)
        dek = self._unwrap(listing_id, sealed)
        try:
            return AESGCM(dek).decrypt(sealed.nonce, sealed.ciphertext, self._data_aad(listing_id)).decode()
        except InvalidTag as exc:
            raise VaultError("API key does not open (tampered or wrong listing)") from exc

    def needs_rewrap(self, sealed_text: str) -> bool:
        return Sealed.loads(sealed_text).kek_id != self.primary_id

    def rewrap(self, listing_id: str, sealed_text: str) -> str:
        """Re-wrap the data key under the primary master key; the ciphertext is unchanged."""
        sealed = Sealed.loads(sealed_text)
        dek = self._unwrap(listing_id, sealed)
        wrap_nonce = os.urandom(12)
        wrapped = self._keks[self.primary_id].encrypt(
            wrap_nonce, dek, self._wrap_aad(listing_id, self.primary_id)
        )
        return Sealed(self.primary_id, wrap_nonce, wrapped, sealed.nonce, sealed.ciphertext).dumps()
