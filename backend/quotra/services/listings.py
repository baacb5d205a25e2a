"""Listing management for providers, and a short-lived cache of live listings for the hot path.

The cache only holds static configuration; quotas, status and expiry are enforced again by the
conditional UPDATE that reserves each call, so a stale cache entry can never overspend.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from datetime import datetime
from typing import Any, Final

from quotra.errors import BadRequest, Forbidden, NotFound, UpstreamFailed
from quotra.netguard import NetGuard
from quotra.services.upstreams import AdapterRegistry
from quotra.store.models import utcnow
from quotra.store.repositories import ListingRecord, Store
from quotra.upstream.base import UpstreamAuthError, UpstreamError
from quotra.vault import Vault

log = logging.getLogger("quotra.listings")
REVOKED_SEAL = ""  # a revoked listing keeps no key material at all


class InvalidUpstreamKey(BadRequest):
    code = "invalid_upstream_key"


class ListingCache:
    def __init__(self, store: Store, ttl: float) -> None:
        self._store = store
        self._ttl = ttl
        self._live: list[ListingRecord] = []
        self._by_id: dict[str, ListingRecord] = {}
        self._loaded_at = float("-inf")
        self._lock = asyncio.Lock()

    def invalidate(self) -> None:
        self._loaded_at = float("-inf")

    async def live(self) -> list[ListingRecord]:
        if time.monotonic() - self._loaded_at > self._ttl:
            async with self._lock:
                if time.monotonic() - self._loaded_at > self._ttl:
                    started = time.monotonic()
                    rows = await self._store.live_listings()
                    self._live = rows
                    self._by_id = {r.id: r for r in rows}
                    self._loaded_at = started
        return self._live

    async def get(self, listing_id: str) -> ListingRecord | None:
        await self.live()
        record = self._by_id.get(listing_id)
        if record is None:  # not live (or brand new): ask the database, do not cache
            record = await self._store.get_listing(listing_id)
        return record


_OPENED_MAX = 10_000


LISTING_ID_PATTERN: Final = r"^lst_[0-9a-f]{16}$"


def new_listing_id() -> str:
    return "lst_" + secrets.token_hex(8)


class ListingService:
    def __init__(
        self,
        store: Store,
        vault: Vault,
        cache: ListingCache,
        adapters: AdapterRegistry,
        netguard: NetGuard,
        *,
        check_keys: bool,
    ) -> None:
        self.store = store
        self.vault = vault
        self.cache = cache
        self.adapters = adapters
        self.netguard = netguard
        self.check_keys = check_keys
        # Opened keys by (listing, sealed key): a rotated or revoked key is a new sealed value,
        # so an entry is never stale. Decrypting once per call cost more than the call's SQL.
        self._opened: dict[tuple[str, str], str] = {}

    async def _check_key(self, kind: str, base_url: str | None, api_key: str) -> None:
        if kind == "sandbox" or not self.check_keys:
            return
        try:
            await self.adapters.get(kind, base_url).check_key(api_key)
        except UpstreamAuthError as exc:
            raise InvalidUpstreamKey("The upstream refused this API key", param="api_key") from exc
        except UpstreamError as exc:
            raise UpstreamFailed(
                f"Could not check the API key with the upstream ({type(exc).__name__})",
                code="upstream_unavailable",
            ) from exc

    async def create(self, owner: str, fields: dict[str, Any]) -> ListingRecord:
        kind = fields["kind"]
        base_url = fields.get("base_url")
        if base_url is not None:
            fields["base_url"] = base_url = await self.netguard.check_url(base_url)
        api_key = fields.pop("api_key")
        await self._check_key(kind, base_url, api_key)
        listing_id = new_listing_id()
        active = fields.pop("active", True)
        record = await self.store.create_listing(
            id=listing_id,
            owner=owner,
            api_key_sealed=self.vault.seal(listing_id, api_key),
            status="active" if active else "paused",
            calls_used=0,
            failure_streak=0,
            **fields,
        )
        self.cache.invalidate()
        log.info("listing created", extra={"listing": listing_id, "owner": owner, "kind": kind})
        return record

    async def owned(self, owner: str, listing_id: str) -> ListingRecord:
        record = await self.store.get_listing(listing_id)
        if record is None:
            raise NotFound(f"No listing {listing_id}", code="listing_not_found")
        if record.owner != owner:
            raise Forbidden("Only the wallet that owns this listing can change it")
        return record

    async def update(self, owner: str, listing_id: str, changes: dict[str, Any]) -> ListingRecord:
        record = await self.owned(owner, listing_id)
        if record.status == "revoked":
            raise BadRequest("This listing is revoked and cannot change", code="listing_revoked")
        values: dict[str, Any] = dict(changes)
        if "base_url" in values:
            if record.kind != "openai-compatible":
                raise BadRequest("base_url applies only to openai-compatible listings", param="base_url")
            values["base_url"] = await self.netguard.check_url(values["base_url"])
        if "active" in values:
            active = values.pop("active")
            if active is not None:
                values["status"] = "active" if active else "paused"
        if "api_key" in values:
            api_key = values.pop("api_key")
            await self._check_key(record.kind, values.get("base_url", record.base_url), api_key)
            values["api_key_sealed"] = self.vault.seal(listing_id, api_key)
            values["failure_streak"] = 0
            values["cooldown_until"] = None
        if (
            "max_calls" in values
            and values["max_calls"] is not None
            and values["max_calls"] < record.calls_used
        ):
            raise BadRequest(
                f"max_calls cannot go below the {record.calls_used} calls already served", param="max_calls"
            )
        updated = await self.store.update_listing(listing_id, **values)
        if updated is None:
            raise NotFound(f"No listing {listing_id}", code="listing_not_found")
        self.cache.invalidate()
        log.info("listing updated", extra={"listing": listing_id, "fields": ",".join(sorted(changes))})
        return updated

    async def set_status(self, owner: str, listing_id: str, status: str) -> ListingRecord:
        record = await self.owned(owner, listing_id)
        if record.status == "revoked":
            raise BadRequest("This listing is revoked and cannot change", code="listing_revoked")
        values: dict[str, Any] = {"status": status}
        if status == "revoked":
            values["api_key_sealed"] = REVOKED_SEAL
        updated = await self.store.update_listing(listing_id, **values)
        assert updated is not None
        self.cache.invalidate()
        log.info("listing status changed", extra={"listing": listing_id, "status": status})
        return updated

    def api_key(self, record: ListingRecord) -> str:
        entry = (record.id, record.api_key_sealed)
        key = self._opened.get(entry)
        if key is None:
            if len(self._opened) >= _OPENED_MAX:
                self._opened.clear()
            key = self._opened[entry] = self.vault.open(record.id, record.api_key_sealed)
        return key


def is_usable(record: ListingRecord, now: datetime | None = None) -> bool:
    now = now or utcnow()
    return record.is_live(now) and not record.in_cooldown(now)
