"""Front-running: an x402 authorization submitted straight to USDC, then `reconcile_authorization`."""

import ape
import pytest
from escrow_helpers import USDC, ZERO_ADDRESS, events, split


def test_front_run__funds_arrive_uncredited(
    escrow, usdc, consumer, provider, sign_payment, front_run, assert_solvent
):
    payment = sign_payment(consumer, 3 * USDC, provider)
    front_run(payment)
    assert usdc.balanceOf(escrow) == 3 * USDC
    assert escrow.liabilities() == 0
    assert escrow.earnings(provider) == 0
    assert_solvent(stray=3 * USDC)


def test_reconcile_authorization__credits_once(
    escrow, operator, consumer, provider, sign_payment, front_run, assert_solvent
):
    payment = sign_payment(consumer, 3 * USDC + 3, provider)
    front_run(payment)
    reference = escrow.payment_reference(consumer, payment.nonce)
    assert not escrow.reconciled(reference)

    tx = escrow.reconcile_authorization(payment, sender=operator)

    share, fee = split(payment.amount)
    assert escrow.earnings(provider) == share
    assert escrow.platform_fees() == fee
    assert escrow.reconciled(reference)
    assert events(tx, escrow.PaymentReconciled) == [
        escrow.PaymentReconciled(
            payer=consumer, provider=provider, nonce=payment.nonce, amount=payment.amount, fee=fee
        )
    ]
    assert_solvent()
    with ape.reverts("escrow: already reconciled"):
        escrow.reconcile_authorization(payment, sender=operator)


def test_reconcile_authorization__after_batch_skipped_it(
    escrow, operator, consumer, provider, provider2, sign_payment, front_run, assert_solvent
):
    payments = [sign_payment(consumer, USDC, provider), sign_payment(consumer, 2 * USDC, provider2)]
    front_run(payments[1])
    escrow.settle_authorizations(payments, sender=operator)
    escrow.reconcile_authorization(payments[1], sender=operator)
    assert escrow.earnings(provider2) == split(2 * USDC)[0]
    assert_solvent()


def test_reconcile_authorization__second_time_other_provider__reverts(
    escrow, operator, consumer, provider, provider2, sign_payment, front_run
):
    payment = sign_payment(consumer, USDC, provider)
    front_run(payment)
    escrow.reconcile_authorization(payment, sender=operator)
    with ape.reverts("escrow: already reconciled"):
        escrow.reconcile_authorization(payment._replace(provider=provider2.address), sender=operator)


def test_reconcile_authorization__settled_normally__no_unowed_funds(
    escrow, operator, consumer, provider, settle, assert_solvent
):
    payment = settle(consumer, USDC, provider)
    with ape.reverts("escrow: no unowed funds"):
        escrow.reconcile_authorization(payment, sender=operator)
    assert_solvent()


def test_reconcile_authorization__excess_below_amount__reverts(
    escrow, operator, consumer, provider, sign_payment, front_run, cancel_authorization, assert_solvent
):
    front_run(small := sign_payment(consumer, USDC, provider))
    # Used (cancelled) on USDC, validly signed, but its 2 USDC never arrived: 1 USDC of excess.
    cancel_authorization(consumer, large := sign_payment(consumer, 2 * USDC, provider))
    with ape.reverts("escrow: no unowed funds"):
        escrow.reconcile_authorization(large, sender=operator)
    escrow.reconcile_authorization(small, sender=operator)
    assert_solvent()


def test_reconcile_authorization__cancelled_authorization__no_unowed_funds(
    escrow, usdc, operator, consumer, provider, sign_payment, cancel_authorization
):
    # USDC marks a cancelled nonce exactly like a used one; no funds arrived.
    payment = sign_payment(consumer, USDC, provider)
    cancel_authorization(consumer, payment)
    assert usdc.authorizationState(consumer, payment.nonce)
    with ape.reverts("escrow: no unowed funds"):
        escrow.reconcile_authorization(payment, sender=operator)


def test_reconcile_authorization__unused__reverts(escrow, operator, consumer, provider, sign_payment):
    payment = sign_payment(consumer, USDC, provider)
    with ape.reverts("escrow: authorization not used"):
        escrow.reconcile_authorization(payment, sender=operator)


def test_reconcile_authorization__wrong_signer__reverts(
    escrow, operator, consumer, consumer2, provider, sign_payment, front_run
):
    front_run(sign_payment(consumer, USDC, provider))
    forged = sign_payment(consumer, USDC, provider, signer=consumer2)
    with ape.reverts("escrow: invalid signature"):
        escrow.reconcile_authorization(forged, sender=operator)


def test_reconcile_authorization__tampered_amount__reverts(
    escrow, operator, consumer, provider, sign_payment, front_run, mint
):
    payment = sign_payment(consumer, USDC, provider)
    front_run(payment)
    with ape.reverts("escrow: invalid signature"):
        escrow.reconcile_authorization(payment._replace(amount=USDC // 2), sender=operator)


def test_reconcile_authorization__paid_to_someone_else__reverts(
    escrow, usdc, relayer, operator, consumer, provider, sign_payment
):
    payment = sign_payment(consumer, USDC, provider, to=relayer)
    usdc.transferWithAuthorization(
        consumer,
        relayer,
        USDC,
        0,
        payment.valid_before,
        payment.nonce,
        payment.v,
        payment.r,
        payment.s,
        sender=relayer,
    )
    with ape.reverts("escrow: invalid signature"):
        escrow.reconcile_authorization(payment, sender=operator)


def test_reconcile_authorization__not_operator__reverts(
    escrow, stranger, consumer, provider, sign_payment, front_run
):
    payment = sign_payment(consumer, USDC, provider)
    front_run(payment)
    with ape.reverts("escrow: caller is not an operator"):
        escrow.reconcile_authorization(payment, sender=stranger)


def test_reconcile_authorization__paused__reverts(
    escrow, owner, operator, consumer, provider, sign_payment, front_run
):
    payment = sign_payment(consumer, USDC, provider)
    front_run(payment)
    escrow.pause(sender=owner)
    with ape.reverts("pausable: contract is paused"):
        escrow.reconcile_authorization(payment, sender=operator)


@pytest.mark.parametrize(
    ("amount", "provider_", "reason"), [(0, "provider", "zero amount"), (1, None, "zero provider")]
)
def test_reconcile_authorization__invalid_payment__reverts(
    escrow, operator, consumer, provider, sign_payment, amount, provider_, reason
):
    payment = sign_payment(consumer, amount, provider if provider_ else ZERO_ADDRESS)
    with ape.reverts(f"escrow: {reason}"):
        escrow.reconcile_authorization(payment, sender=operator)


# The escrow keeps no per-payment record (22k gas a call), so whether a used authorization was
# settled here or front-run is the operator's to know (see the contract's @custom:security note).
# What the escrow does enforce: a reconcile only ever credits the excess nobody is owed.


def test_reconcile_authorization__already_settled__can_only_consume_stray_excess(
    escrow, usdc, operator, stranger, consumer, provider, settle, mint, assert_solvent
):
    payment = settle(consumer, USDC, provider)
    with ape.reverts("escrow: no unowed funds"):  # no excess: nothing to credit it from
        escrow.reconcile_authorization(payment, sender=operator)
    mint(stranger, USDC)
    usdc.transfer(escrow, USDC, sender=stranger)
    escrow.reconcile_authorization(payment, sender=operator)  # an operator mistake, bounded:
    assert escrow.earnings(provider) == 2 * split(USDC)[0]  # it consumed exactly the stray excess
    assert_solvent()
    with ape.reverts("escrow: already reconciled"):
        escrow.reconcile_authorization(payment, sender=operator)


def test_reconcile_authorization__cancelled__is_bounded_by_the_excess(
    escrow,
    operator,
    consumer,
    consumer2,
    provider,
    provider2,
    sign_payment,
    front_run,
    cancel_authorization,
    assert_solvent,
):
    front_run(paid := sign_payment(consumer, USDC, provider))
    cancel_authorization(consumer2, cancelled := sign_payment(consumer2, USDC, provider2))
    escrow.reconcile_authorization(cancelled, sender=operator)  # USDC reports cancelled as used
    assert_solvent()
    with ape.reverts("escrow: no unowed funds"):
        escrow.reconcile_authorization(paid, sender=operator)
