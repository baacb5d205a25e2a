"""Fixtures of the escrow's unit tests: one escrow deployed per session (ape reverts the chain
between tests) and closure factories that sign x402 payments, deposits, spend permissions,
delegations and revocations exactly as wallets do, through `quotra.chain.eip712`."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from typing import Any

import ape.exceptions
import ape_ethereum.trace
import pytest
from escrow_helpers import (
    REFUND_WINDOW,
    STARTING_BALANCE,
    USDC,
    WITHDRAWAL_DELAY,
    ZERO_ADDRESS,
    Delegation,
    Payment,
    Settled,
    SpendPermission,
    Wallet,
    address_of,
    settlement,
)
from eth_account import Account
from eth_utils import keccak
from quotra.chain import eip712

# ---------------------------------------------------------------- ape overhead
# Per test, ape's overhead dominates this suite's runtime; these patches cut it by about half:
# - most tests here revert on purpose, and ape renders every revert twice, a call tree printed
#   to stdout and a source-level traceback, each re-tracing the transaction;
# - ape's isolation asks anvil `anvil_getAutomine` for every fixture of every test (this
#   suite runs with automine on throughout).
# They are installed around each test of this directory only (conftest hooks apply to the
# items below them) and removed after it. Revert messages, which the tests match exactly,
# are unaffected. QUOTRA_PLAIN_APE=1 turns them off (call trees, tracebacks) for debugging.
_APE_PATCHES = pytest.MonkeyPatch()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item):
    if not os.environ.get("QUOTRA_PLAIN_APE"):
        provider = ape.chain.provider
        original = getattr(type(provider), "auto_mine", None)
        if isinstance(original, property):
            auto_mine = provider.auto_mine
            # Only for the connected provider; any other instance reads through.
            cached = property(
                lambda self: auto_mine if self is provider else original.fget(self), original.fset
            )
            _APE_PATCHES.setattr(type(provider), "auto_mine", cached)
        _APE_PATCHES.setattr(ape.exceptions, "_get_ape_traceback_from_tx", lambda txn: None)
        _APE_PATCHES.setattr(ape_ethereum.trace.Trace, "show", lambda self, *args, **kwargs: None)
    return (yield)


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item, nextitem):
    try:
        return (yield)
    finally:
        _APE_PATCHES.undo()


# ---------------------------------------------------------------- the escrow
# Actors (owner, operator, provider, provider2, consumer, consumer2, relayer, stranger), `usdc`,
# `mint` and `deploy_escrow` come from tests/contracts/conftest.py.


@pytest.fixture(scope="session")
def escrow(deploy_escrow, usdc, owner, operator, mint, consumer, consumer2):
    """The escrow under test (WITHDRAWAL_DELAY, REFUND_WINDOW) with `operator` set; both
    consumers hold STARTING_BALANCE USDC, and so does the operator, which has approved the
    escrow to take it (it pays for reconciled front-runs)."""
    contract = deploy_escrow(WITHDRAWAL_DELAY, REFUND_WINDOW)
    contract.set_operator(operator, True, sender=owner)
    for account in (consumer, consumer2, operator):
        mint(account, STARTING_BALANCE)
    usdc.approve(contract, 2**256 - 1, sender=operator)
    return contract


@pytest.fixture(scope="session")
def escrow_domain(chain, escrow) -> eip712.Domain:
    return eip712.escrow_domain(chain.chain_id, str(escrow.address))


@pytest.fixture(scope="session")
def usdc_eip712(usdc) -> eip712.Domain:
    """USDC's EIP-712 domain as read from the chain (never hard-coded)."""
    _, name, version, chain_id, verifying_contract, *_ = usdc.eip712Domain()
    return eip712.Domain(name, version, chain_id, str(verifying_contract))


@pytest.fixture(scope="session")
def new_wallet(mint) -> Callable[..., Wallet]:
    """A fresh EOA with USDC and no ETH."""

    def _new_wallet(balance: int = STARTING_BALANCE) -> Wallet:
        account = Account.from_key(keccak(secrets.token_bytes(32)))
        wallet = Wallet(account.address, account.key.hex())
        if balance:
            mint(wallet, balance)
        return wallet

    return _new_wallet


@pytest.fixture(scope="session")
def assert_solvent(usdc, escrow, provider, provider2, consumer, consumer2):
    """Checks the design's solvency invariant and that the totals match the per-account books."""

    def _assert_solvent(stray: int = 0, providers: tuple = (), consumers: tuple = ()) -> None:
        liabilities = escrow.liabilities()
        assert liabilities == escrow.total_deposits() + escrow.total_earnings() + escrow.platform_fees()
        assert usdc.balanceOf(escrow) == liabilities + stray
        earners = {address_of(p) for p in (provider, provider2, *providers)}
        assert sum(escrow.earnings(p) for p in earners) == escrow.total_earnings()
        depositors = {address_of(c) for c in (consumer, consumer2, *consumers)}
        assert sum(escrow.deposits(c) for c in depositors) == escrow.total_deposits()

    return _assert_solvent


# ---------------------------------------------------------------- signing factories


@pytest.fixture(scope="session")
def sign_payment(chain, escrow, usdc_eip712) -> Callable[..., Payment]:
    """An x402 `exact` payment: the payer's EIP-3009 authorization of `amount` to the escrow,
    charging `charged` of it (all of it unless given)."""

    def _sign_payment(
        payer: Any,
        amount: int,
        provider: Any,
        *,
        charged: int | None = None,
        valid_after: int = 0,
        valid_before: int | None = None,
        nonce: bytes | None = None,
        to: Any = None,
        domain: eip712.Domain | None = None,
        primary: str = "TransferWithAuthorization",
        signer: Any = None,
    ) -> Payment:
        valid_before = chain.pending_timestamp + 3_600 if valid_before is None else valid_before
        nonce = secrets.token_bytes(32) if nonce is None else nonce
        message = {
            "from": address_of(payer),
            "to": address_of(escrow if to is None else to),
            "value": amount,
            "validAfter": valid_after,
            "validBefore": valid_before,
            "nonce": nonce,
        }
        key = (signer or payer).private_key
        sig = eip712.sign(key, domain or usdc_eip712, primary, message)
        return Payment(
            address_of(payer),
            address_of(provider),
            amount,
            amount if charged is None else charged,
            valid_after,
            valid_before,
            nonce,
            sig.v,
            sig.r,
            sig.s,
        )

    return _sign_payment


@pytest.fixture(scope="session")
def sign_permission(chain, operator, escrow_domain) -> Callable[..., tuple[SpendPermission, bytes]]:
    """A consumer's SpendPermission and its signature (by `signer`, default the consumer); with
    `developer` and `max_markup_bps`, an app's permission that may pay that developer a markup."""

    def _sign_permission(
        consumer: Any,
        allowance: int = 100 * USDC,
        *,
        spender: Any = None,
        valid_after: int = 0,
        valid_until: int | None = None,
        salt: int | None = None,
        developer: Any = ZERO_ADDRESS,
        max_markup_bps: int = 0,
        domain: eip712.Domain | None = None,
        signer: Any = None,
    ) -> tuple[SpendPermission, bytes]:
        permission = SpendPermission(
            address_of(consumer),
            address_of(spender or operator),
            allowance,
            valid_after,
            chain.pending_timestamp + 86_400 if valid_until is None else valid_until,
            secrets.randbits(256) if salt is None else salt,
            address_of(developer),
            max_markup_bps,
        )
        sig = eip712.sign(
            (signer or consumer).private_key, domain or escrow_domain, "SpendPermission", permission._asdict()
        )
        return permission, sig.raw

    return _sign_permission


@pytest.fixture(scope="session")
def sign_delegation(chain, escrow_domain) -> Callable[..., tuple[Delegation, bytes]]:
    """A provider's Delegation and its signature (by `signer`, default the provider)."""

    def _sign_delegation(
        provider: Any,
        payee: Any = None,
        *,
        delegate: Any = None,
        max_amount: int = 100 * USDC,
        relayer_fee: int = 0,
        valid_until: int | None = None,
        salt: int | None = None,
        domain: eip712.Domain | None = None,
        signer: Any = None,
    ) -> tuple[Delegation, bytes]:
        delegation = Delegation(
            address_of(provider),
            ZERO_ADDRESS if delegate is None else address_of(delegate),
            address_of(payee or provider),
            max_amount,
            relayer_fee,
            chain.pending_timestamp + 86_400 if valid_until is None else valid_until,
            secrets.randbits(256) if salt is None else salt,
        )
        sig = eip712.sign(
            (signer or provider).private_key, domain or escrow_domain, "Delegation", delegation._asdict()
        )
        return delegation, sig.raw

    return _sign_delegation


@pytest.fixture(scope="session")
def sign_revocation(escrow_domain) -> Callable[..., bytes]:
    """`account`'s signature of `Revocation(account, item)` (by `signer`, default the account)."""

    def _sign_revocation(account: Any, item: bytes, *, signer: Any = None) -> bytes:
        message = {"account": address_of(account), "item": bytes(item)}
        return eip712.sign((signer or account).private_key, escrow_domain, "Revocation", message).raw

    return _sign_revocation


@pytest.fixture(scope="session")
def sign_withdrawal_step(chain, escrow, escrow_domain) -> Callable[..., tuple[int, bytes]]:
    """A consumer's signed withdrawal step (`RequestWithdrawal`, `Withdraw` or `CancelWithdrawal`)
    of `amount` (the fee for `Withdraw`) under its current nonce: (deadline, signature)."""

    def _sign(
        consumer: Any,
        primary: str,
        amount: int,
        *,
        nonce: int | None = None,
        deadline: int | None = None,
        signer: Any = None,
    ) -> tuple[int, bytes]:
        deadline = chain.pending_timestamp + 600 if deadline is None else deadline
        field = "relayer_fee" if primary == "Withdraw" else "amount"
        message = {
            "consumer": address_of(consumer),
            field: amount,
            "nonce": escrow.withdrawal_nonces(address_of(consumer)) if nonce is None else nonce,
            "deadline": deadline,
        }
        return deadline, eip712.sign((signer or consumer).private_key, escrow_domain, primary, message).raw

    return _sign


# ---------------------------------------------------------------- common scenarios


@pytest.fixture(scope="session")
def settle_batch(escrow, operator) -> Callable[..., tuple[Any, list[Settled]]]:
    """Settles x402 payments that will all be credited (at the current fee); returns the
    receipt and each payment's credit, root and proof."""

    def _settle_batch(payments: list[Payment]) -> tuple[Any, list[Settled]]:
        settled = settlement(payments, escrow.fee_bps())
        tx = escrow.settle_authorizations(payments, sender=operator)
        assert tx.return_value == settled[0].root
        return tx, settled

    return _settle_batch


@pytest.fixture(scope="session")
def settle(sign_payment, settle_batch) -> Callable[..., Settled]:
    """Signs and settles one x402 payment (a batch of one: its root is its leaf)."""

    def _settle(payer: Any, amount: int, provider: Any, **kwargs: Any) -> Settled:
        _, (settled,) = settle_batch([sign_payment(payer, amount, provider, **kwargs)])
        return settled

    return _settle


@pytest.fixture(scope="session")
def refund(escrow, operator) -> Callable[..., Any]:
    """Refunds a settled payment with its credit, root and proof (as given)."""

    def _refund(settled: Settled, *, sender: Any = None) -> Any:
        return escrow.refund_payment(settled.credit, settled.root, settled.proof, sender=sender or operator)

    return _refund


@pytest.fixture(scope="session")
def earn(settle, consumer2) -> Callable[[Any, int], None]:
    """Credits `amount` of earnings to `provider` (paid by consumer2); the fee goes to the platform."""

    def _earn(provider: Any, gross: int) -> None:
        settle(consumer2, gross, provider)

    return _earn


@pytest.fixture(scope="session")
def deposit(escrow, usdc) -> Callable[[Any, int], Any]:
    """Approves and deposits `amount` of `account`'s USDC as its own prepaid balance."""

    def _deposit(account: Any, amount: int, beneficiary: Any = None) -> Any:
        usdc.approve(escrow, amount, sender=account)
        return escrow.deposit(amount, beneficiary or account, sender=account)

    return _deposit


@pytest.fixture(scope="session")
def wallet_owner(accounts):
    """The EOA behind `smart_wallet`."""
    return accounts[8]


@pytest.fixture(scope="session")
def smart_wallet(project, owner, wallet_owner):
    """An ERC-1271 smart account (contracts/test/TestWallet.vy) controlled by `wallet_owner`."""
    return owner.deploy(project.TestWallet, wallet_owner)


@pytest.fixture(scope="session")
def front_run(usdc, escrow, relayer) -> Callable[[Payment], Any]:
    """Submits a payment's authorization straight to USDC, as anyone holding it can."""

    def _front_run(payment: Payment) -> Any:
        return usdc.transferWithAuthorization(
            payment.payer,
            escrow,
            payment.amount,
            payment.valid_after,
            payment.valid_before,
            payment.nonce,
            payment.v,
            payment.r,
            payment.s,
            sender=relayer,
        )

    return _front_run


@pytest.fixture(scope="session")
def cancel_authorization(usdc, relayer, sign_usdc_typed) -> Callable[[Any, Payment], Any]:
    """`payer` burns a payment's nonce with EIP-3009 `cancelAuthorization` (no funds move)."""

    def _cancel(payer: Any, payment: Payment) -> Any:
        message = {"authorizer": address_of(payer), "nonce": payment.nonce}
        sig = sign_usdc_typed(payer, "CancelAuthorization", message)
        return usdc.cancelAuthorization(payer.address, payment.nonce, sig.v, sig.r, sig.s, sender=relayer)

    return _cancel


@pytest.fixture(scope="session")
def settle_charges(escrow, operator) -> Callable[..., Any]:
    """`settle_charges` under a fresh reference unless given, with no markup unless given."""

    def _settle_charges(
        permission: SpendPermission,
        signature: bytes,
        charges: list[int],
        *,
        markup: int = 0,
        reference: bytes | None = None,
        sender: Any = None,
    ) -> Any:
        return escrow.settle_charges(
            permission,
            signature,
            secrets.token_bytes(32) if reference is None else reference,
            charges,
            markup,
            sender=sender or operator,
        )

    return _settle_charges
