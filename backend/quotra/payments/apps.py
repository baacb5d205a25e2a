"""Apps: Quota's billing model on USDC and the escrow.

A signed-in developer creates apps, each with a markup; the app's keys are the developer's and
bill its deposit (developer billing): a call costs the base price plus the markup, the provider
and the platform split the base 90/10 and the escrow credits the markup, all of it, to the
developer's earnings, within what the developer's own SpendPermission allows (it names the
developer and the most markup). An app identifies its end users (`X-Quotra-User`); the developer
may limit what each spends and give it grants, spent before the user's own money: off-chain
sub-budgets of the developer's deposit for hosted users, on-chain deposits for wallets. An end user
with a wallet may instead pay itself (user billing): it signs a SpendPermission for the app, which
names the developer and allows the markup, and its calls are charged to its own deposit within that
permission. A wallet may pay for several apps at once, each under its own permission. Disconnected
(by the wallet signed in, or by the app), the user is hosted again: developer billing, within its
grants and spend limit; the permission is never charged again.
"""

from __future__ import annotations

import secrets
from typing import Any, Final, Protocol

from eth_utils import to_checksum_address

from quotra.errors import BadRequest, NotFound, ServiceUnavailable, chain_read
from quotra.money import usdc
from quotra.payments.prepaid import MAX_MARKUP_BPS, InsufficientBalance, PrepaidService
from quotra.store.apps_repo import AppsStore, AppView, GrantView, UserView
from quotra.store.prepaid_repo import ApiKeyView, KeyMode

MAX_APPS_PER_WALLET: Final = 50


class DepositReader(Protocol):
    """What wallet grants need of `quotra.chain.client.EscrowClient` (tests pass a fake)."""

    async def deposits_in(self, tx_hash: str) -> list[tuple[str, str, int]]: ...


class AppService:
    def __init__(self, repo: AppsStore, prepaid: PrepaidService, chain: DepositReader | None) -> None:
        self.repo = repo
        self.prepaid = prepaid
        self.chain = chain

    # ---- apps and their keys ---------------------------------------------------------------------

    async def create_app(self, owner: str, *, name: str, markup_bps: int) -> AppView:
        _check_markup(markup_bps)
        if await self.repo.count_apps(owner) >= MAX_APPS_PER_WALLET:
            raise BadRequest(f"A wallet may have at most {MAX_APPS_PER_WALLET} apps", code="too_many_apps")
        return await self.repo.create_app(
            app_id="app_" + secrets.token_hex(8), owner=owner, name=name, markup_bps=markup_bps
        )

    async def app_of(self, owner: str, app_id: str) -> AppView:
        """The app, if `owner`'s; 404 otherwise (another developer's app is not told apart)."""
        app = await self.repo.get_app(app_id)
        if app is None or app.owner != owner:
            raise NotFound(f"No app '{app_id}' of this wallet", code="app_not_found")
        return app

    async def update_app(self, owner: str, app_id: str, **values: Any) -> AppView:
        await self.app_of(owner, app_id)
        if "markup_bps" in values:
            _check_markup(values["markup_bps"])
        return await self.repo.update_app(app_id, **values)

    async def create_key(
        self,
        owner: str,
        app_id: str,
        *,
        name: str,
        mode: KeyMode,
        spend_cap: int | None,
        rate_per_minute: int | None,
    ) -> tuple[ApiKeyView, str]:
        await self.app_of(owner, app_id)
        return await self.prepaid.create_key(
            owner, name=name, mode=mode, spend_cap=spend_cap, app_id=app_id, rate_per_minute=rate_per_minute
        )

    async def keys(self, owner: str, app_id: str) -> list[ApiKeyView]:
        await self.app_of(owner, app_id)
        return [k for k in await self.prepaid.repo.list_keys(owner) if k.app_id == app_id]

    async def permission_allows(self, owner: str, markup_bps: int) -> bool:
        """Whether the developer's active permission lets a markup of `markup_bps` be paid to it."""
        account = await self.prepaid.repo.get_account(owner)
        if account is None or account.permission_digest is None:
            return False
        permission = await self.prepaid.repo.get_permission(account.permission_digest)
        return (
            permission is not None
            and permission.revoked_at is None
            and (
                markup_bps == 0 or (permission.developer == owner and permission.max_markup_bps >= markup_bps)
            )
        )

    # ---- user billing ----------------------------------------------------------------------------

    async def connect_wallet(
        self, app: AppView, external_id: str, message: dict[str, Any], signature: str
    ) -> UserView:
        """An end user connects its wallet: the app's calls for that user are charged to the
        wallet's own deposit from then on, within its SpendPermission for this app (naming the
        app's developer and allowing at least the app's markup). The wallet's own permission and
        its connections to other apps stay as they are."""
        try:
            consumer = to_checksum_address(str(message.get("consumer")))
            developer = to_checksum_address(str(message.get("developer")))
            max_markup_bps = int(str(message.get("max_markup_bps", 0)), 0)
        except ValueError:
            raise BadRequest(
                "The permission needs a consumer, a developer and max_markup_bps", param="permission"
            ) from None
        if developer != app.owner or max_markup_bps < app.markup_bps:
            raise BadRequest(
                f"The permission must name this app's developer {app.owner} and allow its markup of "
                f"{app.markup_bps} basis points (max_markup_bps)",
                param="permission",
                code="permission_not_for_app",
            )
        if consumer == app.owner:
            raise BadRequest(
                "The app's own developer pays for its users already (developer billing)",
                param="permission",
                code="permission_not_for_app",
            )
        permission, spent = await self.prepaid.verify_permission(consumer, message, signature)
        account = await self.prepaid.repo.get_account(consumer)
        if account is not None and account.permission_digest == permission.digest:
            raise BadRequest(
                "This permission is the wallet's own (for its keys); sign one for the app",
                param="permission",
                code="permission_not_for_app",
            )
        user = await self.repo.connect_wallet(app.id, external_id, permission, spent)
        await self.prepaid.refresh(consumer)  # its deposit, from the chain
        return user

    async def disconnect_user(self, app: AppView, external_id: str) -> UserView:
        """The app unlinks its end user's wallet: the user is hosted again (developer billing)."""
        if not await self.repo.disconnect(app.id, external_id=external_id):
            raise NotFound(
                f"End user '{external_id}' of app '{app.id}' has no wallet connected",
                code="wallet_not_connected",
            )
        return await self.repo.user(app.id, external_id)

    async def disconnect_app(self, wallet: str, app_id: str) -> list[str]:
        """The wallet (signed in) disconnects an app: every user of the app it paid for is hosted
        again; the ids of those users."""
        users = await self.repo.disconnect(app_id, wallet=wallet)
        if not users:
            raise NotFound(f"This wallet is not connected to app '{app_id}'", code="app_not_connected")
        return users

    # ---- grants ----------------------------------------------------------------------------------

    async def grant_user(
        self, app: AppView, external_id: str, amount: int, description: str
    ) -> tuple[GrantView, UserView]:
        """A hosted end user's grant: a sub-budget of the developer's deposit, which must cover it
        beside every grant not spent yet."""
        account = await self.prepaid.account(app.owner)
        outstanding = await self.repo.outstanding_grants(app.owner)
        free = account["available"] - outstanding
        if amount > free:
            raise InsufficientBalance(
                f"A grant of {usdc(amount)} USDC is more than your deposit can back: "
                f"{usdc(max(0, free))} USDC is available beside {usdc(outstanding)} USDC of grants "
                "not spent yet. Deposit more (POST /v1/account/deposits) or raise your spend "
                "permission (GET /v1/account/permission/typed-data).",
                code="insufficient_balance",
            )
        return await self.repo.grant_user(
            grant_id="grant_" + secrets.token_hex(8),
            app_id=app.id,
            external_id=external_id,
            amount=amount,
            description=description,
        )

    async def grant_wallet(
        self, app: AppView, wallet: str, amount: int, description: str, tx_hash: str | None
    ) -> GrantView:
        """A wallet's grant is USDC the developer deposited for it on-chain
        (`escrow.deposit(amount, wallet)` from the developer's wallet); the relay checks the
        transaction and records it, once."""
        wallet = to_checksum_address(wallet)
        if tx_hash is None:
            raise BadRequest(
                "A grant to a wallet is an on-chain deposit out of your own USDC: call "
                f"escrow.deposit({amount}, {wallet}) from your wallet (`ape run consumer deposit "
                f"{usdc(amount)} --for {wallet}`), then send its transaction hash here as `tx_hash`.",
                param="tx_hash",
                code="grant_needs_deposit",
            )
        if self.chain is None:
            raise ServiceUnavailable(
                "This relay has no chain to check the deposit on", code="chain_unavailable"
            )
        with chain_read():
            deposits = await self.chain.deposits_in(tx_hash)
        if (app.owner, wallet, amount) not in deposits:
            raise BadRequest(
                f"Transaction {tx_hash} is no confirmed deposit of {usdc(amount)} USDC from {app.owner} "
                f"for {wallet}",
                param="tx_hash",
                code="grant_deposit_not_found",
            )
        grant = await self.repo.record_wallet_grant(
            grant_id="grant_" + secrets.token_hex(8),
            app_id=app.id,
            wallet=wallet,
            amount=amount,
            description=description,
            tx_hash=tx_hash.lower(),
        )
        if grant is None:
            raise BadRequest(f"Transaction {tx_hash} is recorded as a grant already", code="grant_exists")
        return grant

    # ---- balances --------------------------------------------------------------------------------

    async def balance(self, wallet: str, app: AppView | None, end_user: str | None) -> dict[str, Any]:
        """The developer's balance (what calls can reserve, and what its hosted users' grants
        hold of it), and with `end_user` that user's grants, spending and limit."""
        account = await self.prepaid.account(wallet)
        outstanding = await self.repo.outstanding_grants(wallet)
        view: dict[str, Any] = {
            "wallet": wallet,
            "app": None if app is None else app.id,
            "available": account["available"],
            "deposit": account["deposit"],
            "reserved": account["reserved"],
            "unsettled": account["unsettled"],
            "grants_outstanding": outstanding,
            "user": None,
        }
        if app is not None and end_user is not None:
            user = await self.repo.user(app.id, end_user)
            available = (
                account["available"] if user.headroom is None else min(account["available"], user.headroom)
            )
            if user.wallet is not None:  # it pays from its own deposit, within its permission
                available = await self._connected_available(user)
            view["user"] = {
                "id": end_user,
                "granted": user.granted,
                "grant_used": user.grant_used,
                "grant_remaining": user.grant_remaining,
                "spent": user.spent,
                "reserved": user.reserved,
                "spend_limit": user.spend_limit,
                "limit_remaining": user.limit_remaining,
                "available": available,
            }
        return view

    async def _connected_available(self, user: UserView) -> int:
        """What a connected end user's calls can reserve: its wallet's deposit, within what is
        left of the permission it signed for the app (nothing once revoked)."""
        assert user.wallet is not None
        account = await self.prepaid.refresh(user.wallet)
        connected = await self.prepaid.repo.connection(user.app_id, user.external_id)
        permission = None if connected is None else connected[1]
        if permission is None or permission.revoked_at is not None:
            return 0
        return max(0, min(account.deposit_available, permission.remaining))


def _check_markup(markup_bps: int) -> None:
    if not 0 <= markup_bps <= MAX_MARKUP_BPS:
        raise BadRequest(f"The markup must be between 0 and {MAX_MARKUP_BPS // 100}%", param="markup_percent")
