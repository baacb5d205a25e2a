"""Prepaid deposits: `deposit`, gasless `deposit_with_authorization`, and the delayed withdrawal."""

import ape
import pytest
from escrow_helpers import USDC, WITHDRAWAL_DELAY, ZERO_ADDRESS, charge, events

# ---------------------------------------------------------------- deposit


def test_deposit__credits_caller(escrow, usdc, consumer, assert_solvent):
    before = usdc.balanceOf(consumer)
    usdc.approve(escrow, 50 * USDC, sender=consumer)

    tx = escrow.deposit(50 * USDC, consumer, sender=consumer)

    assert escrow.deposits(consumer) == 50 * USDC
    assert escrow.total_deposits() == 50 * USDC
    assert usdc.balanceOf(consumer) == before - 50 * USDC
    assert usdc.allowance(consumer, escrow) == 0
    assert events(tx, escrow.Deposited) == [
        escrow.Deposited(sender=consumer, beneficiary=consumer, amount=50 * USDC)
    ]
    assert_solvent()


def test_deposit__for_another_beneficiary(escrow, consumer, new_wallet, deposit, assert_solvent):
    grantee = new_wallet(balance=0)
    tx = deposit(consumer, 20 * USDC, grantee.address)
    assert escrow.deposits(grantee.address) == 20 * USDC
    assert escrow.deposits(consumer) == 0
    assert events(tx, escrow.Deposited) == [
        escrow.Deposited(sender=consumer, beneficiary=grantee.address, amount=20 * USDC)
    ]
    assert_solvent(consumers=(grantee.address,))


def test_deposit__accumulates(escrow, consumer, consumer2, deposit, assert_solvent):
    deposit(consumer, 5 * USDC)
    deposit(consumer, 7 * USDC)
    deposit(consumer2, 3 * USDC, consumer)
    assert escrow.deposits(consumer) == 15 * USDC
    assert escrow.total_deposits() == 15 * USDC
    assert_solvent()


def test_deposit__zero_amount__reverts(escrow, consumer):
    with ape.reverts("escrow: zero amount"):
        escrow.deposit(0, consumer, sender=consumer)


def test_deposit__zero_beneficiary__reverts(escrow, usdc, consumer):
    usdc.approve(escrow, USDC, sender=consumer)
    with ape.reverts("escrow: zero beneficiary"):
        escrow.deposit(USDC, ZERO_ADDRESS, sender=consumer)


def test_attack__deposit_for_the_escrow__reverts(escrow, usdc, consumer, assert_solvent):
    # Issue 15, item 6: a deposit credited to the escrow itself could never be withdrawn.
    usdc.approve(escrow, USDC, sender=consumer)
    with ape.reverts("escrow: escrow as beneficiary"):
        escrow.deposit(USDC, escrow, sender=consumer)
    assert_solvent()


def test_deposit__without_approval__reverts(escrow, consumer):
    with ape.reverts("erc20: insufficient allowance"):
        escrow.deposit(USDC, consumer, sender=consumer)


def test_deposit__paused__reverts(escrow, usdc, owner, consumer):
    usdc.approve(escrow, USDC, sender=consumer)
    escrow.pause(sender=owner)
    with ape.reverts("pausable: contract is paused"):
        escrow.deposit(USDC, consumer, sender=consumer)


# ---------------------------------------------------------------- deposit_with_authorization


def _deposit_with_authorization(escrow, payment, sender):
    return escrow.deposit_with_authorization(
        payment.payer,
        payment.amount,
        payment.valid_after,
        payment.valid_before,
        payment.nonce,
        payment.v,
        payment.r,
        payment.s,
        sender=sender,
    )


def test_deposit_with_authorization__no_eth_wallet_via_relayer(
    chain, escrow, usdc, relayer, new_wallet, sign_payment, assert_solvent
):
    wallet = new_wallet()
    authorization = sign_payment(wallet, 30 * USDC, ZERO_ADDRESS, primary="ReceiveWithAuthorization")

    tx = _deposit_with_authorization(escrow, authorization, relayer)

    assert chain.provider.get_balance(wallet.address) == 0
    assert escrow.deposits(wallet.address) == 30 * USDC
    assert escrow.deposits(relayer) == 0
    assert usdc.balanceOf(wallet.address) == 970 * USDC
    assert usdc.authorizationState(wallet.address, authorization.nonce)
    assert events(tx, escrow.Deposited) == [
        escrow.Deposited(sender=relayer, beneficiary=wallet.address, amount=30 * USDC)
    ]
    assert_solvent(consumers=(wallet.address,))


def test_deposit_with_authorization__cannot_be_front_run(usdc, escrow, relayer, new_wallet, sign_payment):
    wallet = new_wallet()
    p = sign_payment(wallet, USDC, ZERO_ADDRESS, primary="ReceiveWithAuthorization")
    with ape.reverts("FiatTokenV2: caller must be the payee"):
        usdc.receiveWithAuthorization(
            p.payer, escrow, p.amount, p.valid_after, p.valid_before, p.nonce, p.v, p.r, p.s, sender=relayer
        )


def test_deposit_with_authorization__replay__reverts(escrow, relayer, new_wallet, sign_payment):
    authorization = sign_payment(new_wallet(), USDC, ZERO_ADDRESS, primary="ReceiveWithAuthorization")
    _deposit_with_authorization(escrow, authorization, relayer)
    with ape.reverts("FiatTokenV2: authorization is used or canceled"):
        _deposit_with_authorization(escrow, authorization, relayer)


def test_deposit_with_authorization__transfer_type__reverts(escrow, relayer, new_wallet, sign_payment):
    authorization = sign_payment(new_wallet(), USDC, ZERO_ADDRESS)  # TransferWithAuthorization
    with ape.reverts("FiatTokenV2: invalid signature"):
        _deposit_with_authorization(escrow, authorization, relayer)


def test_deposit_with_authorization__credit_other_consumer__reverts(
    escrow, relayer, consumer2, new_wallet, sign_payment
):
    authorization = sign_payment(new_wallet(), USDC, ZERO_ADDRESS, primary="ReceiveWithAuthorization")
    with ape.reverts("FiatTokenV2: invalid signature"):
        _deposit_with_authorization(escrow, authorization._replace(payer=consumer2.address), relayer)


def test_deposit_with_authorization__expired__reverts(chain, escrow, relayer, new_wallet, sign_payment):
    authorization = sign_payment(
        new_wallet(),
        USDC,
        ZERO_ADDRESS,
        primary="ReceiveWithAuthorization",
        valid_before=chain.pending_timestamp + 10,
    )
    chain.pending_timestamp += 20
    with ape.reverts("FiatTokenV2: authorization is expired"):
        _deposit_with_authorization(escrow, authorization, relayer)


def test_deposit_with_authorization__zero_amount__reverts(escrow, relayer, new_wallet, sign_payment):
    authorization = sign_payment(new_wallet(), 0, ZERO_ADDRESS, primary="ReceiveWithAuthorization")
    with ape.reverts("escrow: zero amount"):
        _deposit_with_authorization(escrow, authorization, relayer)


def test_deposit_with_authorization__paused__reverts(escrow, owner, relayer, new_wallet, sign_payment):
    authorization = sign_payment(new_wallet(), USDC, ZERO_ADDRESS, primary="ReceiveWithAuthorization")
    escrow.pause(sender=owner)
    with ape.reverts("pausable: contract is paused"):
        _deposit_with_authorization(escrow, authorization, relayer)


# ---------------------------------------------------------------- withdrawals


def test_request_withdrawal(chain, escrow, consumer, deposit):
    deposit(consumer, 10 * USDC)
    tx = escrow.request_withdrawal(4 * USDC, sender=consumer)
    unlock_at = tx.timestamp + WITHDRAWAL_DELAY
    assert escrow.withdrawals(consumer) == (4 * USDC, unlock_at)
    assert escrow.deposits(consumer) == 10 * USDC  # still chargeable until withdrawn
    assert events(tx, escrow.WithdrawalRequested) == [
        escrow.WithdrawalRequested(consumer=consumer, amount=4 * USDC, unlock_at=unlock_at)
    ]


def test_request_withdrawal__replaces_pending(chain, escrow, consumer, deposit):
    deposit(consumer, 10 * USDC)
    escrow.request_withdrawal(4 * USDC, sender=consumer)
    chain.pending_timestamp += 100
    tx = escrow.request_withdrawal(6 * USDC, sender=consumer)
    assert escrow.withdrawals(consumer) == (6 * USDC, tx.timestamp + WITHDRAWAL_DELAY)


def test_request_withdrawal__above_deposit__reverts(escrow, consumer, deposit):
    deposit(consumer, 10 * USDC)
    with ape.reverts("escrow: amount exceeds deposit"):
        escrow.request_withdrawal(10 * USDC + 1, sender=consumer)


def test_request_withdrawal__zero__reverts(escrow, consumer):
    with ape.reverts("escrow: zero amount"):
        escrow.request_withdrawal(0, sender=consumer)


def test_cancel_withdrawal(escrow, consumer, deposit):
    deposit(consumer, 10 * USDC)
    escrow.request_withdrawal(4 * USDC, sender=consumer)
    tx = escrow.cancel_withdrawal(sender=consumer)
    assert escrow.withdrawals(consumer) == (0, 0)
    assert events(tx, escrow.WithdrawalCancelled) == [escrow.WithdrawalCancelled(consumer=consumer)]
    with ape.reverts("escrow: no pending withdrawal"):
        escrow.withdraw(sender=consumer)


def test_cancel_withdrawal__none_pending__reverts(escrow, consumer):
    with ape.reverts("escrow: no pending withdrawal"):
        escrow.cancel_withdrawal(sender=consumer)


def test_withdraw__after_delay(chain, escrow, usdc, consumer, deposit, assert_solvent):
    deposit(consumer, 10 * USDC)
    request = escrow.request_withdrawal(4 * USDC, sender=consumer)
    chain.pending_timestamp = request.timestamp + WITHDRAWAL_DELAY  # exactly at unlock_at
    before = usdc.balanceOf(consumer)

    tx = escrow.withdraw(sender=consumer)

    assert tx.return_value == 4 * USDC
    assert usdc.balanceOf(consumer) == before + 4 * USDC
    assert escrow.deposits(consumer) == 6 * USDC
    assert escrow.withdrawals(consumer) == (0, 0)
    assert events(tx, escrow.Withdrawn) == [escrow.Withdrawn(consumer=consumer, amount=4 * USDC)]
    assert_solvent()
    with ape.reverts("escrow: no pending withdrawal"):
        escrow.withdraw(sender=consumer)


def test_withdraw__before_delay__reverts(chain, escrow, consumer, deposit):
    deposit(consumer, 10 * USDC)
    request = escrow.request_withdrawal(4 * USDC, sender=consumer)
    chain.pending_timestamp = request.timestamp + WITHDRAWAL_DELAY - 1
    with ape.reverts("escrow: withdrawal locked"):
        escrow.withdraw(sender=consumer)


def test_withdraw__no_request__reverts(escrow, consumer, deposit):
    deposit(consumer, 10 * USDC)
    with ape.reverts("escrow: no pending withdrawal"):
        escrow.withdraw(sender=consumer)


def test_withdraw__capped_by_deposit_after_charges(
    chain,
    escrow,
    usdc,
    operator,
    consumer,
    provider,
    deposit,
    sign_permission,
    settle_charges,
    assert_solvent,
):
    deposit(consumer, 10 * USDC)
    escrow.request_withdrawal(10 * USDC, sender=consumer)
    # Calls already served settle during the delay.
    permission, signature = sign_permission(consumer, 10 * USDC)
    settle_charges(permission, signature, [charge(provider, 4 * USDC)])
    chain.pending_timestamp += WITHDRAWAL_DELAY
    before = usdc.balanceOf(consumer)

    tx = escrow.withdraw(sender=consumer)

    assert tx.return_value == 6 * USDC
    assert usdc.balanceOf(consumer) == before + 6 * USDC
    assert escrow.deposits(consumer) == 0
    assert_solvent()


def test_withdraw__deposit_fully_charged__pays_nothing(
    chain,
    escrow,
    usdc,
    operator,
    consumer,
    provider,
    deposit,
    sign_permission,
    settle_charges,
    assert_solvent,
):
    deposit(consumer, 5 * USDC)
    escrow.request_withdrawal(5 * USDC, sender=consumer)
    permission, signature = sign_permission(consumer, 5 * USDC)
    settle_charges(permission, signature, [charge(provider, 5 * USDC)])
    chain.pending_timestamp += WITHDRAWAL_DELAY
    before = usdc.balanceOf(consumer)
    tx = escrow.withdraw(sender=consumer)
    assert tx.return_value == 0
    assert usdc.balanceOf(consumer) == before
    assert events(tx, escrow.Withdrawn) == [escrow.Withdrawn(consumer=consumer, amount=0)]
    assert escrow.withdrawals(consumer) == (0, 0)
    assert_solvent()


@pytest.mark.parametrize("step", ["request", "cancel", "withdraw"])
def test_withdrawal__works_while_paused(chain, escrow, usdc, owner, consumer, deposit, assert_solvent, step):
    deposit(consumer, 10 * USDC)
    if step != "request":
        escrow.request_withdrawal(10 * USDC, sender=consumer)
    escrow.pause(sender=owner)
    if step == "request":
        escrow.request_withdrawal(10 * USDC, sender=consumer)
    elif step == "cancel":
        escrow.cancel_withdrawal(sender=consumer)
    else:
        chain.pending_timestamp += WITHDRAWAL_DELAY
        escrow.withdraw(sender=consumer)
        assert escrow.deposits(consumer) == 0
    assert_solvent()


def test_deposit__totals_overflow__reverts(escrow, usdc, consumer, mint):
    # The three sums share one storage word (85 bits each); USDC's supply needs fewer than 57.
    huge = 2**85
    mint(consumer, huge)
    usdc.approve(escrow, huge, sender=consumer)
    with ape.reverts("escrow: totals overflow"):
        escrow.deposit(huge, consumer, sender=consumer)
    escrow.deposit(huge - 1, consumer, sender=consumer)
    assert escrow.total_deposits() == huge - 1
