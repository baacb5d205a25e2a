"""ETH-free exits: a consumer signs `RequestWithdrawal`, `Withdraw` and `CancelWithdrawal`
(EIP-712, EOA or ERC-1271) and any relayer submits them; the relayer's fee comes out of the
amount withdrawn, never out of the deposit before the delay."""

import ape
import pytest
from escrow_helpers import USDC, WITHDRAWAL_DELAY, charge, events


@pytest.fixture
def depositor(new_wallet, deposit, consumer):
    """A consumer wallet without ETH holding a 10 USDC deposit (granted by `consumer`)."""
    wallet = new_wallet(balance=0)
    deposit(consumer, 10 * USDC, wallet.address)
    return wallet


def _request(escrow, sign_withdrawal_step, wallet, amount, relayer):
    deadline, signature = sign_withdrawal_step(wallet, "RequestWithdrawal", amount)
    return escrow.request_withdrawal_with_signature(
        wallet.address, amount, deadline, signature, sender=relayer
    )


# ---------------------------------------------------------------- the whole exit


def test_signed_exit__completes_with_no_eth(
    chain, escrow, usdc, relayer, depositor, sign_withdrawal_step, assert_solvent
):
    tx = _request(escrow, sign_withdrawal_step, depositor, 4 * USDC, relayer)
    unlock_at = tx.timestamp + WITHDRAWAL_DELAY
    assert escrow.withdrawals(depositor.address) == (4 * USDC, unlock_at)
    assert events(tx, escrow.WithdrawalRequested) == [
        escrow.WithdrawalRequested(consumer=depositor.address, amount=4 * USDC, unlock_at=unlock_at)
    ]
    chain.pending_timestamp = unlock_at
    deadline, signature = sign_withdrawal_step(depositor, "Withdraw", 50_000)
    relayer_before = usdc.balanceOf(relayer)

    tx = escrow.withdraw_with_signature(depositor.address, 50_000, deadline, signature, sender=relayer)

    assert tx.return_value == 4 * USDC
    assert usdc.balanceOf(depositor.address) == 4 * USDC - 50_000
    assert usdc.balanceOf(relayer) == relayer_before + 50_000
    assert escrow.deposits(depositor.address) == 6 * USDC
    assert escrow.withdrawals(depositor.address) == (0, 0)
    assert escrow.withdrawal_nonces(depositor.address) == 2
    assert events(tx, escrow.Withdrawn) == [escrow.Withdrawn(consumer=depositor.address, amount=4 * USDC)]
    assert chain.provider.get_balance(depositor.address) == 0
    assert_solvent(consumers=(depositor.address,))


def test_withdraw_with_signature__fee_out_of_what_is_left_after_charges(
    chain,
    escrow,
    usdc,
    relayer,
    provider,
    depositor,
    sign_withdrawal_step,
    sign_permission,
    settle_charges,
    assert_solvent,
):
    _request(escrow, sign_withdrawal_step, depositor, 10 * USDC, relayer)
    permission, signature = sign_permission(depositor, 10 * USDC)
    settle_charges(permission, signature, [charge(provider, 9 * USDC)])
    chain.pending_timestamp += WITHDRAWAL_DELAY
    deadline, signature = sign_withdrawal_step(depositor, "Withdraw", USDC)

    tx = escrow.withdraw_with_signature(depositor.address, USDC, deadline, signature, sender=relayer)

    assert tx.return_value == USDC
    assert usdc.balanceOf(depositor.address) == 0
    assert escrow.deposits(depositor.address) == 0
    assert_solvent(consumers=(depositor.address,))


def test_withdraw_with_signature__fee_above_what_is_left__reverts(
    chain, escrow, relayer, provider, depositor, sign_withdrawal_step, sign_permission, settle_charges
):
    _request(escrow, sign_withdrawal_step, depositor, 10 * USDC, relayer)
    permission, signature = sign_permission(depositor, 10 * USDC)
    settle_charges(permission, signature, [charge(provider, 9 * USDC)])
    chain.pending_timestamp += WITHDRAWAL_DELAY
    deadline, signature = sign_withdrawal_step(depositor, "Withdraw", USDC + 1)
    with ape.reverts("escrow: fee exceeds withdrawal"):
        escrow.withdraw_with_signature(depositor.address, USDC + 1, deadline, signature, sender=relayer)


def test_withdraw_with_signature__zero_fee(chain, escrow, usdc, relayer, depositor, sign_withdrawal_step):
    _request(escrow, sign_withdrawal_step, depositor, 3 * USDC, relayer)
    chain.pending_timestamp += WITHDRAWAL_DELAY
    deadline, signature = sign_withdrawal_step(depositor, "Withdraw", 0)
    before = usdc.balanceOf(relayer)
    escrow.withdraw_with_signature(depositor.address, 0, deadline, signature, sender=relayer)
    assert usdc.balanceOf(depositor.address) == 3 * USDC
    assert usdc.balanceOf(relayer) == before


def test_cancel_withdrawal_with_signature(escrow, relayer, depositor, sign_withdrawal_step):
    _request(escrow, sign_withdrawal_step, depositor, 4 * USDC, relayer)
    deadline, signature = sign_withdrawal_step(depositor, "CancelWithdrawal", 4 * USDC)

    tx = escrow.cancel_withdrawal_with_signature(depositor.address, deadline, signature, sender=relayer)

    assert escrow.withdrawals(depositor.address) == (0, 0)
    assert events(tx, escrow.WithdrawalCancelled) == [escrow.WithdrawalCancelled(consumer=depositor.address)]


def test_cancel_withdrawal_with_signature__for_another_amount__reverts(
    escrow, relayer, depositor, sign_withdrawal_step
):
    # Signed to cancel a request of 4; the pending request is now 5: it must not be cancelled.
    _request(escrow, sign_withdrawal_step, depositor, 4 * USDC, relayer)
    deadline, signature = sign_withdrawal_step(
        depositor, "CancelWithdrawal", 4 * USDC, nonce=escrow.withdrawal_nonces(depositor.address) + 1
    )
    _request(escrow, sign_withdrawal_step, depositor, 5 * USDC, relayer)
    with ape.reverts("escrow: invalid signature"):
        escrow.cancel_withdrawal_with_signature(depositor.address, deadline, signature, sender=relayer)


def test_cancel_withdrawal_with_signature__none_pending__reverts(
    escrow, relayer, depositor, sign_withdrawal_step
):
    deadline, signature = sign_withdrawal_step(depositor, "CancelWithdrawal", 0)
    with ape.reverts("escrow: no pending withdrawal"):
        escrow.cancel_withdrawal_with_signature(depositor.address, deadline, signature, sender=relayer)


# ---------------------------------------------------------------- signatures, nonces, deadlines


def test_request_withdrawal_with_signature__replay__reverts(escrow, relayer, depositor, sign_withdrawal_step):
    deadline, signature = sign_withdrawal_step(depositor, "RequestWithdrawal", 4 * USDC)
    escrow.request_withdrawal_with_signature(depositor.address, 4 * USDC, deadline, signature, sender=relayer)
    with ape.reverts("escrow: invalid signature"):
        escrow.request_withdrawal_with_signature(
            depositor.address, 4 * USDC, deadline, signature, sender=relayer
        )


def test_request_withdrawal_with_signature__expired__reverts(
    chain, escrow, relayer, depositor, sign_withdrawal_step
):
    deadline, signature = sign_withdrawal_step(depositor, "RequestWithdrawal", 4 * USDC)
    chain.pending_timestamp = deadline + 1
    with ape.reverts("escrow: signature expired"):
        escrow.request_withdrawal_with_signature(
            depositor.address, 4 * USDC, deadline, signature, sender=relayer
        )


def test_request_withdrawal_with_signature__at_deadline(
    chain, escrow, relayer, depositor, sign_withdrawal_step
):
    deadline, signature = sign_withdrawal_step(depositor, "RequestWithdrawal", 4 * USDC)
    chain.pending_timestamp = deadline
    escrow.request_withdrawal_with_signature(depositor.address, 4 * USDC, deadline, signature, sender=relayer)
    assert escrow.withdrawals(depositor.address)[0] == 4 * USDC


@pytest.mark.parametrize("change", ["amount", "consumer", "signer", "type", "future nonce"])
def test_request_withdrawal_with_signature__not_what_was_signed__reverts(
    escrow, relayer, stranger, depositor, new_wallet, deposit, consumer, sign_withdrawal_step, change
):
    other = new_wallet(balance=0)
    deposit(consumer, 10 * USDC, other.address)
    kwargs = {}
    if change == "signer":
        kwargs["signer"] = other
    if change == "future nonce":
        kwargs["nonce"] = 1
    primary = "CancelWithdrawal" if change == "type" else "RequestWithdrawal"
    deadline, signature = sign_withdrawal_step(depositor, primary, 4 * USDC, **kwargs)
    consumer_address = other.address if change == "consumer" else depositor.address
    amount = 3 * USDC if change == "amount" else 4 * USDC
    with ape.reverts("escrow: invalid signature"):
        escrow.request_withdrawal_with_signature(
            consumer_address, amount, deadline, signature, sender=relayer
        )


def test_withdraw_with_signature__fee_other_than_signed__reverts(
    chain, escrow, relayer, depositor, sign_withdrawal_step
):
    _request(escrow, sign_withdrawal_step, depositor, 4 * USDC, relayer)
    chain.pending_timestamp += WITHDRAWAL_DELAY
    deadline, signature = sign_withdrawal_step(depositor, "Withdraw", 10_000)
    with ape.reverts("escrow: invalid signature"):
        escrow.withdraw_with_signature(depositor.address, 20_000, deadline, signature, sender=relayer)


def test_withdraw_with_signature__before_delay__reverts(
    chain, escrow, relayer, depositor, sign_withdrawal_step
):
    tx = _request(escrow, sign_withdrawal_step, depositor, 4 * USDC, relayer)
    chain.pending_timestamp = tx.timestamp + WITHDRAWAL_DELAY - 1
    deadline, signature = sign_withdrawal_step(depositor, "Withdraw", 0)
    with ape.reverts("escrow: withdrawal locked"):
        escrow.withdraw_with_signature(depositor.address, 0, deadline, signature, sender=relayer)


def test_request_withdrawal_with_signature__above_deposit__reverts(
    escrow, relayer, depositor, sign_withdrawal_step
):
    deadline, signature = sign_withdrawal_step(depositor, "RequestWithdrawal", 10 * USDC + 1)
    with ape.reverts("escrow: amount exceeds deposit"):
        escrow.request_withdrawal_with_signature(
            depositor.address, 10 * USDC + 1, deadline, signature, sender=relayer
        )


def test_signed_steps__use_one_nonce_in_order(chain, escrow, relayer, depositor, sign_withdrawal_step):
    # Signed together: request (nonce 0), then withdraw (nonce 1) with a deadline past the delay.
    now = chain.pending_timestamp
    _, request = sign_withdrawal_step(depositor, "RequestWithdrawal", 2 * USDC, nonce=0, deadline=now + 600)
    _, withdraw = sign_withdrawal_step(
        depositor, "Withdraw", 1_000, nonce=1, deadline=now + WITHDRAWAL_DELAY + 600
    )
    with ape.reverts("escrow: invalid signature"):  # out of order: nonce 1 before nonce 0
        escrow.withdraw_with_signature(
            depositor.address, 1_000, now + WITHDRAWAL_DELAY + 600, withdraw, sender=relayer
        )
    escrow.request_withdrawal_with_signature(depositor.address, 2 * USDC, now + 600, request, sender=relayer)
    chain.pending_timestamp = now + WITHDRAWAL_DELAY + 10
    escrow.withdraw_with_signature(
        depositor.address, 1_000, now + WITHDRAWAL_DELAY + 600, withdraw, sender=relayer
    )
    assert escrow.deposits(depositor.address) == 8 * USDC


@pytest.mark.parametrize("step", ["request", "cancel", "withdraw"])
def test_signed_steps__work_while_paused(
    chain, escrow, owner, relayer, depositor, sign_withdrawal_step, step
):
    if step != "request":
        _request(escrow, sign_withdrawal_step, depositor, 10 * USDC, relayer)
    escrow.pause(sender=owner)
    if step == "request":
        _request(escrow, sign_withdrawal_step, depositor, 10 * USDC, relayer)
        assert escrow.withdrawals(depositor.address)[0] == 10 * USDC
    elif step == "cancel":
        deadline, signature = sign_withdrawal_step(depositor, "CancelWithdrawal", 10 * USDC)
        escrow.cancel_withdrawal_with_signature(depositor.address, deadline, signature, sender=relayer)
    else:
        chain.pending_timestamp += WITHDRAWAL_DELAY
        deadline, signature = sign_withdrawal_step(depositor, "Withdraw", 0)
        escrow.withdraw_with_signature(depositor.address, 0, deadline, signature, sender=relayer)
        assert escrow.deposits(depositor.address) == 0


# ---------------------------------------------------------------- smart accounts (ERC-1271)


def test_signed_exit__smart_account(
    chain,
    escrow,
    usdc,
    relayer,
    consumer,
    smart_wallet,
    wallet_owner,
    deposit,
    sign_withdrawal_step,
    assert_solvent,
):
    deposit(consumer, 5 * USDC, smart_wallet.address)
    deadline, signature = sign_withdrawal_step(
        smart_wallet, "RequestWithdrawal", 5 * USDC, signer=wallet_owner
    )
    escrow.request_withdrawal_with_signature(smart_wallet, 5 * USDC, deadline, signature, sender=relayer)
    chain.pending_timestamp += WITHDRAWAL_DELAY
    deadline, signature = sign_withdrawal_step(smart_wallet, "Withdraw", 10_000, signer=wallet_owner)
    escrow.withdraw_with_signature(smart_wallet, 10_000, deadline, signature, sender=relayer)
    assert usdc.balanceOf(smart_wallet) == 5 * USDC - 10_000
    assert_solvent(consumers=(smart_wallet.address,))


def test_signed_exit__smart_account_wrong_owner__reverts(
    escrow, relayer, consumer, stranger, smart_wallet, deposit, sign_withdrawal_step
):
    deposit(consumer, 5 * USDC, smart_wallet.address)
    deadline, signature = sign_withdrawal_step(smart_wallet, "RequestWithdrawal", 5 * USDC, signer=stranger)
    with ape.reverts("escrow: invalid signature"):
        escrow.request_withdrawal_with_signature(smart_wallet, 5 * USDC, deadline, signature, sender=relayer)
