"""Prepaid payments with an API key: the consumer's account, keys, permission and deposits, and
the gate that reserves a keyed call's maximum cost (the call store captures the actual cost or
voids it).

Rules:
- Live keys (`sk-quotra-live-…`) call any listing and are charged from the wallet's escrow
  deposit under its active SpendPermission: each call reserves against
  min(deposit - pending withdrawal, allowance - permission spent) - unsettled - reserved, and
  against the key's own spend cap, in one transaction (see `quotra.calls.store`).
- An app's keys are the app owner's (the developer's) and bill its deposit: each call costs the
  base price plus the app's markup (`quotra.money.markup_of`), under a permission that names the
  developer and allows that markup; a call for a hosted end user (`X-Quotra-User`) also reserves
  within that user's grants and spend limit, and one for an end user who connected its wallet is
  charged to that wallet's deposit instead, within the permission it signed for that app (one per
  app it connected; see `quotra.calls.store`).
- Sandbox keys (`sk-quotra-test-…`) may name any listed model: the relay's sandbox answers
  (synthetic OpenAI, Anthropic or Gemini shapes by model name, no upstream call), priced as the
  listing that serves it. Their calls are metered against the key's spend cap (so a client can
  exercise the whole flow, 402 included) and recorded like any call (usage, an app's end users),
  but never touch the account or the listing's quota and are never settled; they need no
  deposit and no permission.
- Chain reads (account mirror, revocation, nonces) go through the async `EscrowClient`; nothing
  here blocks the event loop. Gasless deposits are put on-chain by any `Relayer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Protocol

from eth_utils import is_address, to_checksum_address

from quotra.calls.records import Refused
from quotra.calls.store import CallStore, Hold
from quotra.chain import eip712
from quotra.chain.relayer import ChainCall, Relayer, RelayerError, TxState, wait_final
from quotra.errors import (
    AuthenticationFailed,
    BadRequest,
    NotFound,
    PaymentRequired,
    QuotraError,
    ServiceUnavailable,
    chain_read,
)
from quotra.money import MAX_BPS, markup_of, usdc
from quotra.services.gate import Reservation, not_servable
from quotra.store.prepaid_repo import (
    AccountView,
    ApiKeyView,
    KeyMode,
    KeyRef,
    PermissionView,
    PrepaidStore,
    Shortfall,
    hash_key,
)
from quotra.store.repositories import ListingRecord

log = logging.getLogger("quotra.prepaid")

KEY_PREFIX: Final = "sk-quotra-"
_KEY_MODE_PREFIX: Final[dict[KeyMode, str]] = {"live": "sk-quotra-live-", "sandbox": "sk-quotra-test-"}
_MAX_CACHED_KEYS: Final = 10_000
_MAX_AMOUNT: Final = 2**63 - 1  # BIGINT columns
_CLOCK_SKEW: Final = 60
# The most markup an app may add, and so a permission allow: 1,000% of the base cost.
MAX_MARKUP_BPS: Final = 100_000
ZERO_ADDRESS: Final = "0x0000000000000000000000000000000000000000"
Erc1271Check = Callable[[str, bytes, bytes], Awaitable[bool]]


class ChainReader(Protocol):
    """What this module needs of `quotra.chain.client.EscrowClient` (tests pass a fake)."""

    @property
    def escrow_address(self) -> str: ...

    @property
    def escrow_domain(self) -> eip712.Domain: ...

    async def deposit_of(self, consumer: str) -> int: ...

    async def withdrawal_of(self, consumer: str) -> tuple[int, int]: ...

    async def permission_spent(self, digest: bytes) -> int: ...

    async def is_revoked(self, account: str, digest: bytes) -> bool: ...

    async def usdc_domain(self) -> eip712.Domain: ...

    async def usdc_balance(self, account: str) -> int: ...

    async def authorization_used(self, payer: str, nonce: bytes) -> bool: ...

    def encode_deposit_with_authorization(
        self,
        consumer: str,
        amount: int,
        valid_after: int,
        valid_before: int,
        nonce: bytes,
        signature: eip712.Signature,
    ) -> ChainCall: ...


class InsufficientBalance(PaymentRequired):
    """402 for a prepaid call the budget cannot cover; the message says how to top up."""

    type = "insufficient_quota"
    code = "insufficient_balance"


class PrepaidUnavailable(NotFound):
    """This relay has no escrow, operator or relayer configured: the endpoint does not exist here."""

    code = "prepaid_unavailable"


class InvalidPermission(BadRequest):
    code = "invalid_permission"


class InvalidDeposit(BadRequest):
    code = "invalid_deposit"


@dataclass(frozen=True)
class PrepaidSettings:
    key_cache_seconds: float = 5.0
    max_keys_per_wallet: int = 50
    refresh_seconds: float = 30.0
    permission_margin_seconds: int = 600
    deposit_wait_seconds: float = 30.0
    key_rate_per_minute: int = 100  # unless the key has its own


def _uint(value: Any, name: str, maximum: int = 2**256 - 1) -> int:
    if isinstance(value, bool):
        raise BadRequest(f"{name} must be an integer", param=name)
    try:
        number = int(value, 0) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name} must be an integer", param=name) from None
    if not 0 <= number <= maximum:
        raise BadRequest(f"{name} is out of range", param=name)
    return number


def _address(value: Any, name: str) -> str:
    if not isinstance(value, str) or not is_address(value):
        raise BadRequest(f"{name} must be an address", param=name)
    return to_checksum_address(value)


def _bytes(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be 0x-hex", param=name)
    try:
        return bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise BadRequest(f"{name} must be 0x-hex", param=name) from None


class PrepaidService:
    def __init__(
        self,
        repo: PrepaidStore,
        calls: CallStore,
        *,
        settings: PrepaidSettings,
        chain: ChainReader | None = None,
        relayer: Relayer | None = None,
        operator: str | None = None,
        erc1271: Erc1271Check | None = None,
    ) -> None:
        self.repo = repo
        self.calls = calls
        self.settings = settings
        self.chain = chain
        self.relayer = relayer
        self.operator = to_checksum_address(operator) if operator else None
        self.erc1271 = erc1271
        self._keys: dict[str, tuple[KeyRef | None, float]] = {}
        self._usdc_domain: eip712.Domain | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # ---- API keys --------------------------------------------------------------------------------

    async def authenticate(self, secret: str) -> KeyRef:
        """The live, unrevoked key for a bearer secret (cached briefly); 401 otherwise."""
        digest = hash_key(secret)
        now = time.monotonic()
        cached = self._keys.get(digest)
        if cached is not None and cached[1] > now:
            key = cached[0]
        else:
            key = await self.repo.key_by_hash(digest)
            if len(self._keys) >= _MAX_CACHED_KEYS:
                self._keys.clear()
            self._keys[digest] = (key, now + self.settings.key_cache_seconds)
        if key is None:
            raise AuthenticationFailed(
                "Incorrect API key provided. Create a key with POST /v1/account/keys "
                "(signed in with Ethereum); revoked keys stop working at once."
            )
        return key

    async def create_key(
        self,
        wallet: str,
        *,
        name: str,
        mode: KeyMode,
        spend_cap: int | None,
        app_id: str | None = None,
        rate_per_minute: int | None = None,
    ) -> tuple[ApiKeyView, str]:
        """A new key (of an app of `wallet`'s, if `app_id`) and its secret (shown once; only its
        SHA-256 is stored)."""
        if await self.repo.count_active_keys(wallet) >= self.settings.max_keys_per_wallet:
            raise BadRequest(
                f"A wallet may hold at most {self.settings.max_keys_per_wallet} active keys; "
                "revoke one first",
                code="too_many_keys",
            )
        secret = _KEY_MODE_PREFIX[mode] + secrets.token_urlsafe(32)
        view = await self.repo.create_key(
            key_id="key_" + secrets.token_hex(8),
            secret_hash=hash_key(secret),
            wallet=wallet,
            name=name,
            mode=mode,
            spend_cap=spend_cap,
            app_id=app_id,
            rate_per_minute=rate_per_minute,
        )
        return view, secret

    async def revoke_key(self, wallet: str, key_id: str) -> ApiKeyView:
        view, digest = await self.repo.revoke_key(wallet, key_id)
        self._keys.pop(digest, None)  # effective at once here; other replicas fail at reserve
        return view

    # ---- the gate ----------------------------------------------------------------------------------

    async def reserve(
        self,
        key: KeyRef,
        listing: ListingRecord,
        max_cost: int,
        deadline: datetime,
        end_user: str | None = None,
    ) -> Reservation:
        now = int(time.time())
        base = max(max_cost, 1)
        amount = base + markup_of(base, key.markup_bps)
        hold = Hold(
            key.wallet,
            listing.id,
            listing.owner,
            amount,
            deadline,
            app_id=key.app_id,
            markup_bps=key.markup_bps,
            end_user=end_user,
            rate_per_minute=key.rate_per_minute or self.settings.key_rate_per_minute,
        )
        try:
            call_id, rate = await self.calls.reserve_key(
                hold, key_id=key.id, live=key.live, now_ts=now, margin=self.settings.permission_margin_seconds
            )
        except Refused as refused:
            if refused.reason == "listing_unavailable":
                raise not_servable(listing) from None
            if refused.reason == "user_limit":
                raise await self._user_limit(key, end_user, amount) from None
            if refused.reason == "deposit" and key.app_id is not None and end_user is not None:
                connected = await self.repo.connection(key.app_id, end_user)
                if connected is not None:
                    raise await self._user_wallet_short(key, end_user, *connected, amount) from None
            if refused.reason == "rate_limited":
                assert refused.rate is not None
                raise refused.rate.refusal("this API key") from None
            shortfall = await self.repo.diagnose(
                key,
                now,
                self.settings.permission_margin_seconds,
                "key_cap" if refused.reason == "key_cap" else "deposit",
            )
            if shortfall == "key_revoked":
                self._keys = {h: v for h, v in self._keys.items() if v[0] is None or v[0].id != key.id}
                raise AuthenticationFailed("This API key has been revoked") from None
            raise await self._insufficient(key, amount, shortfall) from None
        return Reservation(
            call_id,
            "prepaid" if key.live else "sandbox",
            amount,
            markup_bps=key.markup_bps,
            base_reserved=base,
            rate=rate,
        )

    async def _user_wallet_short(
        self, key: KeyRef, end_user: str, wallet: str, permission: PermissionView | None, needed: int
    ) -> QuotraError:
        """402 for an end user paying with its own wallet whose permission for the app was revoked
        (never charged again), has expired, no longer allows the app's markup, or with the
        wallet's deposit cannot cover the call."""
        account = await self.refresh(wallet)
        renew = "The user signs a new permission for the app (POST /v1/apps/{app_id}/users/{user_id}/wallet)"
        remaining = 0
        if permission is None or permission.revoked_at is not None:
            code = "user_permission_revoked"
            reason = (
                f"was revoked. {renew}, or the app disconnects the wallet "
                "(DELETE /v1/apps/{app_id}/users/{user_id}/wallet) and pays for the user itself."
            )
        elif permission.valid_until - self.settings.permission_margin_seconds <= int(time.time()):
            code, reason = "user_permission_expired", f"has expired (or expires within minutes). {renew}."
        elif permission.max_markup_bps < key.markup_bps:
            code = "user_markup_not_permitted"
            reason = (
                f"allows a markup of {permission.max_markup_bps} basis points, less than the app's "
                f"{key.markup_bps} now. {renew}."
            )
        else:
            code, remaining = "user_insufficient_balance", max(0, permission.remaining)
            reason = (
                f"or the wallet's deposit cannot cover the call: it may cost up to {usdc(needed)} USDC. "
                "The user deposits more, or signs a new permission for the app "
                "(POST /v1/apps/{app_id}/users/{user_id}/wallet)."
            )
        return InsufficientBalance(
            f"End user '{end_user}' pays with its wallet {wallet}, whose spend permission for this "
            f"app {reason}",
            code=code,
            extra={
                "end_user": {
                    "id": end_user,
                    "wallet": wallet,
                    "deposit": usdc(account.deposit),
                    "permission_remaining": usdc(remaining),
                }
            },
        )

    async def _user_limit(self, key: KeyRef, end_user: str | None, needed: int) -> QuotraError:
        """402 for an end user whose grants and spend limit cannot cover the call."""
        assert key.app_id is not None and end_user is not None
        left = await self.repo.user_headroom(key.app_id, end_user)
        return InsufficientBalance(
            f"End user '{end_user}' has reached its spend limit: the call may cost up to "
            f"{usdc(needed)} USDC and {usdc(max(0, left))} USDC is left of its grants and limit. "
            f"Raise the limit (PUT /v1/apps/{key.app_id}/users/{{user}}/limit) or grant it more "
            "(POST /v1/funding/grant).",
            code="user_spend_limit_reached",
            extra={"end_user": {"id": end_user, "needed": usdc(needed), "left": usdc(max(0, left))}},
        )

    async def _insufficient(self, key: KeyRef, needed: int, shortfall: Shortfall) -> QuotraError:
        account = await self.repo.get_account(key.wallet) or AccountView.empty(key.wallet)
        this = next((k for k in await self.repo.list_keys(key.wallet) if k.id == key.id), None)
        key_left = None if this is None else this.remaining
        deposit_how = (
            "Deposit more USDC into the escrow: `ape run consumer deposit <amount>` or any wallet "
            "calling deposit(amount, you), or gasless: sign an EIP-3009 ReceiveWithAuthorization to "
            "the escrow and POST it to /v1/account/deposits."
        )
        permission_how = (
            "Sign a new SpendPermission with a higher allowance: GET "
            "/v1/account/permission/typed-data?allowance=<USDC>&days=<days>, sign it "
            "(eth_signTypedData_v4) and POST it to /v1/account/permission."
        )
        markup_how = (
            f"Sign a new SpendPermission that allows your app's markup of {key.markup_bps} basis "
            f"points: GET /v1/account/permission/typed-data?allowance=<USDC>&max_markup_bps="
            f"{key.markup_bps}, sign it (eth_signTypedData_v4) and POST it to /v1/account/permission."
        )
        if shortfall == "key_cap":
            reason = (
                f"This API key's spend cap is reached: the call may cost up to {usdc(needed)} USDC and "
                f"the key has {usdc(key_left or 0)} USDC left. Raise its cap (PATCH "
                f"/v1/account/keys/{key.id}) or use another key."
            )
            code = "key_spend_cap_reached"
        elif shortfall == "no_permission":
            reason = (
                "This wallet has no usable spend permission (none yet, expired, expiring within "
                f"{self.settings.permission_margin_seconds} s, or revoked). {permission_how}"
            )
            code = "no_spend_permission"
        elif shortfall == "markup":
            reason = (
                f"Your spend permission does not allow this app's markup "
                f"({key.markup_bps * 100 / MAX_BPS:g}%) to be paid to you. {markup_how}"
            )
            code = "markup_not_permitted"
        elif shortfall == "permission":
            reason = (
                f"Your spend permission is used up: the call may cost up to {usdc(needed)} USDC and "
                f"{usdc(max(0, account.permission_remaining))} USDC of its allowance is left. "
                f"{permission_how}"
            )
            code = "permission_exhausted"
        else:
            reason = (
                f"Insufficient prepaid balance: the call may cost up to {usdc(needed)} USDC and "
                f"{usdc(max(0, account.deposit_available))} USDC is available. {deposit_how}"
            )
            code = "insufficient_balance"
        return InsufficientBalance(
            reason,
            code=code,
            extra={
                "prepaid": {
                    "wallet": key.wallet,
                    "needed": usdc(needed),
                    "available": usdc(account.available),
                    "deposit_available": usdc(max(0, account.deposit_available)),
                    "permission_remaining": usdc(max(0, account.permission_remaining)),
                    "key_remaining": None if key_left is None else usdc(key_left),
                    "top_up": {
                        "deposit": "POST /v1/account/deposits or escrow.deposit(amount, wallet)",
                        "permission": "GET /v1/account/permission/typed-data, POST /v1/account/permission",
                        "key_cap": f"PATCH /v1/account/keys/{key.id}",
                    },
                }
            },
        )

    # ---- the account mirror ------------------------------------------------------------------------

    async def refresh(self, wallet: str) -> AccountView:
        """Reads deposit, pending withdrawal and the active permission's spent/revoked state from
        the chain and writes them to the mirror (compare-and-set); the stale view on RPC errors."""
        return (await self._refresh(wallet))[0]

    async def _refresh(self, wallet: str) -> tuple[AccountView, int | None]:
        """`refresh`, and when the pending withdrawal unlocks (unix seconds) as the chain said it
        (None when the chain was not read)."""
        await self.repo.ensure_account(wallet)
        seen = await self.repo.get_account(wallet) or AccountView.empty(wallet)
        if self.chain is None:
            return seen, None
        digest = bytes.fromhex(seen.permission_digest[2:]) if seen.permission_digest else None
        connected = await self.repo.connected_permissions(wallet)
        try:
            reads: list[Awaitable[Any]] = [self.chain.deposit_of(wallet), self.chain.withdrawal_of(wallet)]
            reads += [self.chain.is_revoked(wallet, bytes.fromhex(d[2:])) for d in connected]
            if digest is not None:
                reads += [self.chain.permission_spent(digest), self.chain.is_revoked(wallet, digest)]
            results = await asyncio.gather(*reads)
        except Exception as exc:  # an unreachable node must not fail the caller
            log.warning("prepaid.refresh_failed", extra={"wallet": wallet, "error": str(exc)[:200]})
            return seen, None
        deposit, (pending, unlock_at) = results[0], results[1]
        for connected_digest, revoked in zip(connected, results[2 : 2 + len(connected)], strict=True):
            if revoked:  # revoked on-chain: the app's calls for its user are refused from now on
                await self.repo.mark_permission_revoked(connected_digest)
        own = results[2 + len(connected) :]
        spent = own[0] if digest is not None else None
        if digest is not None and own[1]:
            assert seen.permission_digest is not None
            await self.repo.mark_permission_revoked(seen.permission_digest)
        await self.repo.sync_account(
            wallet, seen=seen, deposit=deposit, pending_withdrawal=pending, permission_spent=spent
        )
        return await self.repo.get_account(wallet) or seen, unlock_at

    def refresh_soon(self, wallet: str) -> None:
        """Refresh in the background (sign-in must not wait for the chain)."""
        if self.chain is not None:
            self._spawn(self.refresh(wallet))

    def _spawn(self, work: Awaitable[Any]) -> None:
        async def run() -> None:
            try:
                await work
            except Exception:
                log.exception("prepaid.background_failed")

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run_background(self) -> None:
        """Every `refresh_seconds`: refresh accounts from the chain."""
        while True:
            await asyncio.sleep(self.settings.refresh_seconds)
            if self.chain is None:
                continue
            try:
                for wallet in await self.repo.wallets_to_refresh(200):
                    await self.refresh(wallet)
            except Exception:
                log.exception("prepaid.background_round_failed")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def account(self, wallet: str) -> dict[str, Any]:
        view, unlock_at = await self._refresh(wallet)
        permission = (
            await self.repo.get_permission(view.permission_digest) if view.permission_digest else None
        )
        settled = await self.repo.settled_total(wallet)
        usable = permission is not None and permission.revoked_at is None
        now = int(time.time())
        return {
            "wallet": wallet,
            "deposit": view.deposit,
            "pending_withdrawal": view.pending_withdrawal,
            "pending_withdrawal_unlocks_at": unlock_at if view.pending_withdrawal else None,
            "reserved": view.reserved,
            "unsettled": view.unsettled,
            "settled_total": settled,
            "permission": None
            if permission is None
            else {
                "digest": permission.digest,
                "spender": permission.spender,
                "developer": permission.developer,
                "max_markup_bps": permission.max_markup_bps,
                "allowance": permission.allowance,
                "spent": view.permission_spent,
                "valid_after": permission.valid_after,
                "valid_until": permission.valid_until,
                "revoked": permission.revoked_at is not None,
                "active": usable
                and permission.valid_after
                <= now
                < permission.valid_until - self.settings.permission_margin_seconds,
            },
            "remaining_allowance": max(0, view.permission_remaining) if usable else 0,
            "available": view.available if usable else 0,
            "synced_at": view.synced_at,
        }

    # ---- the spend permission ----------------------------------------------------------------------

    def _require_chain(self) -> ChainReader:
        if self.chain is None or self.operator is None:
            raise PrepaidUnavailable(
                "Prepaid payments are not configured on this relay (no escrow or operator)"
            )
        return self.chain

    def permission_typed_data(
        self, wallet: str, allowance: int, days: int, max_markup_bps: int = 0, developer: str | None = None
    ) -> dict[str, Any]:
        """The permission for `wallet` to sign. With `max_markup_bps` it also lets an app's markup
        (up to that rate) be charged on top of the base cost and credited to the app's
        `developer`: by default the wallet itself, for its own apps (developer billing), or
        another developer whose app the wallet pays for (user billing)."""
        chain = self._require_chain()
        now = int(time.time())
        message = {
            "consumer": wallet,
            "spender": self.operator,
            "allowance": allowance,
            "valid_after": now - _CLOCK_SKEW,
            "valid_until": now + days * 86_400,
            "salt": secrets.randbits(52),  # exact as a JavaScript number
            "developer": developer or (wallet if max_markup_bps else ZERO_ADDRESS),
            "max_markup_bps": max_markup_bps,
        }
        digest = eip712.digest(chain.escrow_domain, "SpendPermission", message)
        return {
            "typed_data": eip712.typed_data(chain.escrow_domain, "SpendPermission", message),
            "digest": "0x" + digest.hex(),
        }

    async def revocation_typed_data(self, wallet: str, digest: str | None = None) -> dict[str, Any]:
        """The `Revocation` of the wallet's current spend permission, or of another of its
        permissions (`digest`: one it connected to an app), to sign and hand to
        `POST /v1/revocations` (the relayer submits it: no ETH needed)."""
        chain = self._require_chain()
        if digest is None:
            view = await self.repo.get_account(wallet)
            digest = None if view is None else view.permission_digest
        else:
            permission = await self.repo.get_permission(digest.lower())
            digest = None if permission is None or permission.consumer != wallet else permission.digest
        if digest is None:
            raise NotFound("This account has no such spend permission to revoke", code="no_permission")
        message = {"account": wallet, "item": bytes.fromhex(digest.removeprefix("0x"))}
        return {
            "typed_data": eip712.typed_data(chain.escrow_domain, "Revocation", message),
            "digest": "0x" + eip712.digest(chain.escrow_domain, "Revocation", message).hex(),
        }

    async def deposit_typed_data(self, wallet: str, amount: int) -> dict[str, Any]:
        """A `ReceiveWithAuthorization` of `amount` from the wallet to the escrow under USDC's
        domain, valid for an hour, with a fresh nonce: what `POST /v1/account/deposits` takes."""
        chain = self._require_chain()
        with chain_read():
            domain = await self._usdc(chain)
        message = {
            "from": wallet,
            "to": chain.escrow_address,
            "value": amount,
            "validAfter": 0,
            "validBefore": int(time.time()) + 3_600,
            "nonce": secrets.token_bytes(32),
        }
        return {
            "typed_data": eip712.typed_data(domain, "ReceiveWithAuthorization", message),
            "digest": "0x" + eip712.digest(domain, "ReceiveWithAuthorization", message).hex(),
        }

    async def register_permission(
        self, wallet: str, message: dict[str, Any], signature_hex: str
    ) -> dict[str, Any]:
        """Verifies a signed SpendPermission and makes it the wallet's active one (one connected
        to an app stays that app's)."""
        permission, spent = await self.verify_permission(wallet, message, signature_hex)
        if await self.repo.is_connected(permission.digest):
            raise InvalidPermission(
                "This permission is connected to an app; sign a new one for your own keys",
                code="permission_connected",
            )
        await self.repo.activate_permission(permission, spent)
        return await self.account(wallet)

    async def verify_permission(
        self, wallet: str, message: dict[str, Any], signature_hex: str
    ) -> tuple[PermissionView, int]:
        """A signed SpendPermission of `wallet`'s for this relay, checked against the chain (not
        revoked, not used up), and what of it is spent."""
        chain = self._require_chain()
        consumer = _address(message.get("consumer"), "permission.consumer")
        spender = _address(message.get("spender"), "permission.spender")
        allowance = _uint(message.get("allowance"), "permission.allowance")
        valid_after = _uint(message.get("valid_after"), "permission.valid_after", _MAX_AMOUNT)
        valid_until = _uint(message.get("valid_until"), "permission.valid_until", _MAX_AMOUNT)
        salt = _uint(message.get("salt"), "permission.salt")
        developer = _address(message.get("developer", ZERO_ADDRESS), "permission.developer")
        max_markup_bps = _uint(message.get("max_markup_bps", 0), "permission.max_markup_bps")
        if consumer != wallet:
            raise InvalidPermission(
                f"The permission's consumer {consumer} is not the signed-in wallet {wallet}",
                code="wrong_consumer",
            )
        if spender != self.operator:
            raise InvalidPermission(
                f"The permission's spender must be this relay's operator {self.operator}",
                code="wrong_spender",
            )
        if not 0 < allowance <= _MAX_AMOUNT:
            raise InvalidPermission(
                "The allowance must be positive and below 2**63", param="permission.allowance"
            )
        if max_markup_bps > MAX_MARKUP_BPS:
            raise InvalidPermission(
                f"max_markup_bps must be at most {MAX_MARKUP_BPS}", param="permission.max_markup_bps"
            )
        if max_markup_bps and developer == ZERO_ADDRESS:
            raise InvalidPermission(
                "A permission that allows a markup must name the developer it is paid to",
                param="permission.developer",
            )
        now = int(time.time())
        if valid_until <= now + self.settings.permission_margin_seconds:
            raise InvalidPermission(
                "The permission has expired or expires within "
                f"{self.settings.permission_margin_seconds} seconds",
                code="permission_expired",
            )
        if valid_after > now + _CLOCK_SKEW:
            raise InvalidPermission("The permission is not valid yet", code="permission_not_yet_valid")
        fields = {
            "consumer": consumer,
            "spender": spender,
            "allowance": allowance,
            "valid_after": valid_after,
            "valid_until": valid_until,
            "salt": salt,
            "developer": developer,
            "max_markup_bps": max_markup_bps,
        }
        digest = eip712.digest(chain.escrow_domain, "SpendPermission", fields)
        signature = _bytes(signature_hex, "signature")
        if not await self._signed_by(consumer, digest, signature):
            raise InvalidPermission(
                f"The signature is not {consumer}'s signature of this permission", code="invalid_signature"
            )
        digest_hex = "0x" + digest.hex()
        known = await self.repo.get_permission(digest_hex)
        with chain_read():
            revoked, spent = await asyncio.gather(
                chain.is_revoked(consumer, digest), chain.permission_spent(digest)
            )
        if revoked or (known is not None and known.revoked_at is not None):
            raise InvalidPermission(
                "This permission has been revoked (on-chain, or disconnected from its app)",
                code="permission_revoked",
            )
        if spent >= allowance:
            raise InvalidPermission(
                "This permission's allowance is already spent", code="permission_exhausted"
            )
        permission = PermissionView(
            digest_hex,
            consumer,
            spender,
            allowance,
            valid_after,
            valid_until,
            f"0x{salt:064x}",
            "0x" + signature.hex(),
            None,
            developer,
            max_markup_bps,
        )
        return permission, spent

    async def _signed_by(self, signer: str, digest: bytes, signature: bytes) -> bool:
        if len(signature) > 65:  # settle_charges takes Bytes[65]
            return False
        if len(signature) == 65:
            try:
                if eip712.recover(digest, eip712.Signature.from_bytes(signature)) == signer:
                    return True
            except eip712.InvalidSignature:
                pass
        return self.erc1271 is not None and await self.erc1271(signer, digest, signature)

    # ---- gasless deposits --------------------------------------------------------------------------

    async def _usdc(self, chain: ChainReader) -> eip712.Domain:
        """USDC's EIP-712 domain, read from the token once (never assumed per network)."""
        if self._usdc_domain is None:
            self._usdc_domain = await chain.usdc_domain()
        return self._usdc_domain

    async def deposit(self, wallet: str, authorization: dict[str, Any], signature_hex: str) -> dict[str, Any]:
        """Submits the wallet's `ReceiveWithAuthorization` to the escrow through the relayer, waits
        (bounded) for it, then refreshes the account from the chain."""
        chain = self._require_chain()
        if self.relayer is None:
            raise PrepaidUnavailable("No relayer is configured for gasless deposits on this relay")
        payer = _address(authorization.get("from"), "authorization.from")
        to = _address(authorization.get("to"), "authorization.to")
        value = _uint(authorization.get("value"), "authorization.value", _MAX_AMOUNT)
        valid_after = _uint(authorization.get("validAfter"), "authorization.validAfter")
        valid_before = _uint(authorization.get("validBefore"), "authorization.validBefore")
        nonce = _bytes(authorization.get("nonce"), "authorization.nonce")
        if len(nonce) != 32:
            raise BadRequest("authorization.nonce must be 32 bytes", param="authorization.nonce")
        if payer != wallet:
            raise InvalidDeposit(f"The authorization's payer {payer} is not the signed-in wallet {wallet}")
        if to != chain.escrow_address:
            raise InvalidDeposit(f"The authorization must pay the escrow {chain.escrow_address}")
        if value <= 0:
            raise InvalidDeposit("The deposit must be positive")
        now = int(time.time())
        if valid_after > now or valid_before <= now + 30:
            raise InvalidDeposit("The authorization is not valid now (validAfter/validBefore)")
        try:
            signature = eip712.Signature.from_bytes(_bytes(signature_hex, "signature"))
        except eip712.InvalidSignature as exc:
            raise InvalidDeposit(f"Bad signature: {exc}", code="invalid_signature") from None
        message = {
            "from": payer,
            "to": to,
            "value": value,
            "validAfter": valid_after,
            "validBefore": valid_before,
            "nonce": nonce,
        }
        with chain_read():
            domain = await self._usdc(chain)
            digest = eip712.digest(domain, "ReceiveWithAuthorization", message)
            try:
                signer = eip712.recover(digest, signature)
            except eip712.InvalidSignature:
                signer = None
            if signer != payer:
                raise InvalidDeposit(
                    f"The signature is not {payer}'s ReceiveWithAuthorization under USDC's domain "
                    f"({domain.name!r}, version {domain.version!r})",
                    code="invalid_signature",
                )
            used, balance = await asyncio.gather(
                chain.authorization_used(payer, nonce), chain.usdc_balance(payer)
            )
        if used:
            raise InvalidDeposit("This authorization's nonce is already used", code="nonce_already_used")
        if balance < value:
            raise InvalidDeposit(
                f"The wallet holds {usdc(balance)} USDC, less than the {usdc(value)} USDC authorized",
                code="insufficient_usdc",
            )
        call = chain.encode_deposit_with_authorization(
            payer, value, valid_after, valid_before, nonce, signature
        )
        nonce_hex = "0x" + nonce.hex()
        try:
            submission = await self.relayer.send(call, memo=f"deposit:{nonce_hex}")
        except RelayerError as exc:
            raise ServiceUnavailable(
                "The relayer is unavailable; try again", code="relayer_unavailable"
            ) from exc
        if submission.state is TxState.REJECTED:
            raise InvalidDeposit(f"The deposit was refused: {submission.error}", code="deposit_refused")
        final = await wait_final(
            self.relayer, submission.id, within=self.settings.deposit_wait_seconds, poll=0.1
        )
        if not final.state.final:
            self._spawn(self._finish_deposit(wallet, submission.id))
            return {"status": "submitted", "tx_hash": final.tx_hash, "amount": value, "account": None}
        self._check_deposit(final.state, final.error)
        return {
            "status": "confirmed",
            "tx_hash": final.tx_hash,
            "amount": value,
            "account": await self.account(wallet),
        }

    async def _finish_deposit(self, wallet: str, submission_id: str) -> None:
        assert self.relayer is not None
        final = await wait_final(self.relayer, submission_id, within=600.0, poll=1.0)
        if final.state.final:
            await self.refresh(wallet)

    @staticmethod
    def _check_deposit(state: TxState, error: str | None) -> None:
        """A confirmed deposit is on-chain: the account mirror reads it from there."""
        if state is not TxState.CONFIRMED:
            raise InvalidDeposit(
                f"The deposit transaction failed: {error or state.name.lower()}", code="deposit_failed"
            )
